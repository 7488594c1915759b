"""Steps computation masks (SCM, SPEC §5): which denoising steps must compute (1) and which may be
cached (0).

Presets are cache-dit's bins at 28 steps and its masks at 50 steps, so users who tuned with
cache-dit get the same schedules there. For any other step count T we scale the 28-step bins
(our rule, not cache-dit's, whose truncation can grow a cache run to 13 steps at T = 16):

* each cache run becomes round(run * T / 28), so no run exceeds ceil(longest run * T / 28);
* each compute run becomes max(1, round(run * T / 28)), so the compute fraction stays close;
* the difference to T is taken from (or given to) the first compute run, the warmup, and when
  that is down to 1, from the longest cache runs; the last step always computes.
"""

from __future__ import annotations

import operator
from typing import Any

__all__ = ["PRESETS", "as_count", "steps_mask"]

# compute bins / cache bins at T = 28 (SPEC §5); bins alternate compute, cache, compute, ...
PRESETS: dict[str, tuple[list[int], list[int]]] = {
    "slow": ([8, 3, 3, 2, 1, 1], [1, 2, 2, 2, 3]),
    "medium": ([6, 2, 2, 2, 2, 1], [1, 3, 3, 3, 3]),
    "fast": ([6, 1, 1, 1, 1, 1], [1, 3, 4, 5, 4]),
    "ultra": ([4, 1, 1, 1, 1], [2, 5, 6, 7]),
}

# cache-dit 1.5.3's preset masks at T = 50 (its bin expansion), kept verbatim
_AT_50 = {
    "slow": "11111111111111111111110011111000111110001110001101",
    "medium": "11111111111111110011100000111000001110000011100001",
    "fast": "11111111111001100000110000000110000000001100000001",
    "ultra": "11111110001100000000011000000000001100000000000001",
}


def _from_bins(compute_bins: list[int], cache_bins: list[int], total_steps: int | None) -> list[int]:
    """Bins taken literally (as cache-dit does): alternate compute and cache runs, cut at T."""
    mask: list[int] = []
    for i, run in enumerate(compute_bins):
        mask += [1] * run
        if i < len(cache_bins):
            mask += [0] * cache_bins[i]
    mask += [0] * sum(cache_bins[len(compute_bins) :])
    if total_steps is None:
        return mask
    if len(mask) < total_steps:
        raise ValueError(
            f"compute_bins + cache_bins cover {len(mask)} steps: must cover total_steps={total_steps}"
        )
    return mask[:total_steps]


def _scaled(policy: str, total_steps: int) -> list[int]:
    compute, cache = PRESETS[policy]
    scale = total_steps / 28
    compute = [max(1, round(c * scale)) for c in compute]
    cache = [round(c * scale) for c in cache]
    excess = sum(compute) + sum(cache) - total_steps
    if excess < 0:
        compute[0] -= excess
    else:
        take = min(excess, compute[0] - 1)
        compute[0] -= take
        excess -= take
        while excess > 0 and any(cache):
            longest = max(range(len(cache)), key=lambda i: cache[i])
            cache[longest] -= 1
            excess -= 1
        while excess > 0:  # T smaller than the number of compute runs: drop middle compute runs
            for i in range(len(compute) - 2, 0, -1):
                if excess and compute[i]:
                    compute[i] -= 1
                    excess -= 1
    mask = _from_bins(compute, cache, total_steps)
    mask[-1] = 1
    return mask


def as_count(value: Any) -> int | None:
    """A step count as a Python int: numpy's ints and 0-d integer tensors too (diffusers takes
    them); None for None, a bool, or what is no integer."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def steps_mask(
    compute_bins: list[int] | None = None,
    cache_bins: list[int] | None = None,
    total_steps: int | None = None,
    mask_policy: str | None = "medium",
) -> list[int]:
    """A steps computation mask: explicit bins, else a preset (`mask_policy`) for `total_steps`.
    cache-dit's signature: its positional order and its default preset."""
    if compute_bins is not None or cache_bins is not None:
        for name, bins in (("compute_bins", compute_bins), ("cache_bins", cache_bins)):
            if not isinstance(bins, (list, tuple)) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in bins):
                raise ValueError(f"{name}={bins!r}: must be a list of ints >= 0 (and given together with the other bins)")
        if total_steps is not None and (as_count(total_steps) or 0) < 1:
            raise ValueError(f"total_steps={total_steps!r}: must be an int >= 1 or None")
        return _from_bins(list(compute_bins), list(cache_bins), as_count(total_steps))
    if mask_policy not in PRESETS:
        raise ValueError(f"mask_policy={mask_policy!r}: must be one of {sorted(PRESETS)}")
    if (as_count(total_steps) or 0) < 1:
        raise ValueError(f"total_steps={total_steps!r}: a preset mask needs an int >= 1")
    total_steps = as_count(total_steps)
    if total_steps == 1:  # e.g. a two-expert pipeline's share of a short request: the last step computes
        return [1]
    if total_steps == 50:
        return [int(c) for c in _AT_50[mask_policy]]
    return _scaled(mask_policy, total_steps)
