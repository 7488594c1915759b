"""The step logic of SPEC §3 (DBCache; TeaCache's §6 and DBPrune's §7 decisions too), as tensor
functions called from the rewritten graph and from the block-by-block path.

All inputs and outputs are device tensors; counters are updated in place. Nothing here returns a
Python value that depends on the step, so the same graph (eager, compiled or exported) serves
every step of every request.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .. import kernels

__all__ = [
    "begin_step", "decide_step", "step_gate", "decide", "teacache_decide", "fixed_decision", "finish_step", "position", "since_last_compute",
    "forecast",
    "prune_decide", "add_residual", "prune_store", "finish_prune",
]  # fmt: skip

def _kernel(name: str, x: torch.Tensor) -> Callable:
    """The custom op `name`; while torch.compile traces for a device the Triton kernels do not
    serve, the op's torch implementation instead: inductor fuses it with the code around it, where
    the op is an opaque call (on CPU the diff alone was ~0.1 ms of a ~5 ms cached step)."""
    if torch.compiler.is_compiling() and not kernels.use_triton(x):
        return kernels.TORCH_IMPLEMENTATIONS[getattr(torch.ops.dittofx, name).default]
    return getattr(kernels, name)


def _sum_over(t: torch.Tensor, group: str | None) -> torch.Tensor:
    """`t` summed over the ranks of a context/sequence-parallel group (each holds a shard)."""
    if group is None:
        return t
    return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(t, "sum", group))


# gate codes understood by the residual_diff kernel
GATE_DIFF, GATE_COMPUTE, GATE_CACHE = 0, 1, 2


def begin_step(
    step: torch.Tensor,
    num_steps: torch.Tensor,
    last_ts: torch.Tensor,
    valid: torch.Tensor,
    cached_count: torch.Tensor,
    cont_count: torch.Tensor,
    acc: torch.Tensor,
    hist_diff: torch.Tensor,
    hist_cached: torch.Tensor,
    timestep: torch.Tensor | None,
) -> None:
    """Start a new request when the known step count is used up, or (count unknown) when the
    timestep went up: a stale cache is never applied to a new image."""
    ts = timestep.reshape(-1)[0].to(torch.float32) if timestep is not None else torch.full_like(last_ts, -math.inf)
    new = torch.where(num_steps > 0, step >= num_steps, ts > last_ts)
    zero = torch.zeros_like(step)
    for counter in (step, valid, cached_count, cont_count):
        counter.copy_(torch.where(new, zero, counter))
    acc.copy_(torch.where(new, torch.zeros_like(acc), acc))
    hist_diff.copy_(torch.where(new, torch.full_like(hist_diff, math.nan), hist_diff))
    hist_cached.copy_(torch.where(new, torch.full_like(hist_cached, -1), hist_cached))
    last_ts.copy_(ts)


def decide_step(
    step: torch.Tensor,
    num_steps: torch.Tensor,
    last_ts: torch.Tensor,
    valid: torch.Tensor,
    cached_count: torch.Tensor,
    cont_count: torch.Tensor,
    acc: torch.Tensor,
    mask: torch.Tensor,
    p: torch.Tensor,
    times: torch.Tensor,
    h_fn: torch.Tensor,
    h0: torch.Tensor,
    *,
    decision: str,
    in_timesteps: bool,
    threshold: float,
    acc_limit: float,
    group: str | None,
    teacache_coefficients: tuple[float, ...] | None,
    **gate_options: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """After begin_step: where this step sits, how far the last compute is, and the decision, made
    on the device (`decision="device"`: gates and diff, SPEC §3 or TeaCache's §6) or taken from the
    host ("compute" / "cache": no diff). The one sequence the rewritten graph (a node) and the
    block-by-block path (a call) both run. Returns (diff, cache, elapsed, position)."""
    now = position(step, last_ts, in_timesteps=in_timesteps)
    elapsed = since_last_compute(now, times)
    if decision != "device":
        diff, cache = fixed_decision(step, cache=decision == "cache")
    else:
        gate = step_gate(step, valid, cached_count, cont_count, mask, num_steps, **gate_options)
        if teacache_coefficients is not None:
            diff, cache = teacache_decide(h_fn, p, gate, acc, coefficients=teacache_coefficients, threshold=threshold, group=group)
        else:
            diff, cache = decide(h_fn, h0, p, gate, acc, threshold=threshold, acc_limit=acc_limit, group=group)
    return diff, cache, elapsed, now


def step_gate(
    step: torch.Tensor,
    valid: torch.Tensor,
    cached_count: torch.Tensor,
    cont_count: torch.Tensor,
    mask: torch.Tensor,
    num_steps: torch.Tensor,
    *,
    max_warmup_steps: int,
    warmup_interval: int,
    max_cached_steps: int,
    max_continuous_cached_steps: int,
    has_mask: bool,
    static_mask: bool,
    last_step_computes: bool = False,
) -> torch.Tensor:
    """Gates 1-5 of SPEC §3 as an int32 code: compute, cache, or let the diff decide (TeaCache
    adds: the last step of a request of known length computes)."""
    warm = (step < max_warmup_steps) & (step % warmup_interval == 0)
    first = warm | (valid == 0)  # gates 1-2
    if last_step_computes:
        first = first | (step == num_steps - 1)
    capped = torch.zeros_like(first)  # gates 4-5
    if max_cached_steps >= 0:
        capped = capped | (cached_count >= max_cached_steps)
    if max_continuous_cached_steps >= 0:
        capped = capped | (cont_count >= max_continuous_cached_steps)
    if not has_mask:
        return torch.where(first | capped, GATE_COMPUTE, GATE_DIFF).to(torch.int32)
    # gate 3; one-hot read of mask[step] (no data-dependent index); past the mask's end it is 0
    here = torch.arange(mask.shape[0], device=step.device) == step
    compute_step = (mask * here).sum() > 0
    if static_mask:  # a 0 caches without measuring a diff, before gates 4-5
        return torch.where(first | compute_step, GATE_COMPUTE, GATE_CACHE).to(torch.int32)
    return torch.where(first | compute_step | capped, GATE_COMPUTE, GATE_DIFF).to(torch.int32)


def decide(
    h_fn: torch.Tensor,
    h0: torch.Tensor,
    p: torch.Tensor,
    gate: torch.Tensor,
    acc: torch.Tensor,
    *,
    threshold: float,
    acc_limit: float,
    group: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates 6-7: relative L1 of the Fn residual against the stored one, per sample; one bool.

    With `group` (the name of a context/sequence-parallel process group, each rank holding a shard
    of the sequence) the two sums are all-reduced before the division, so all ranks decide alike."""
    if group is None:
        return _kernel("residual_diff", h_fn)(h_fn, p[0], h0, gate, acc, threshold, acc_limit, True)
    sums = _kernel("l1_sums", h_fn)(h_fn, p[0], h0, True)
    return _kernel("cache_decision", sums)(_sum_over(sums, group), gate, acc, threshold, acc_limit)


def teacache_decide(
    m: torch.Tensor,
    prev: torch.Tensor,
    gate: torch.Tensor,
    acc: torch.Tensor,
    *,
    coefficients: tuple[float, ...],
    threshold: float,
    group: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §6: the rescaled distance `poly(sum|m - m_prev| / sum|m_prev|)` per sample; cache while
    `acc + distance < threshold` for every sample. Returns the largest rescaled distance (what the
    accumulator adds on a cached step; NaN when gated) and the cache flag."""
    sums = _kernel("l1_sums", m)(m, prev[0], None, True)
    sums = _sum_over(sums, group)
    rel = sums[:, 0] / sums[:, 1]
    rescaled = torch.zeros_like(rel)
    for c in coefficients:  # Horner, highest degree first (numpy poly1d order)
        rescaled = rescaled * rel + c
    distance = rescaled.max()
    gated = gate != 0
    ok = torch.isfinite(distance) & (acc + distance < threshold)
    return torch.where(gated, math.nan, distance), torch.where(gated, gate == GATE_CACHE, ok)


def fixed_decision(step: torch.Tensor, *, cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A decision the host already made (warmup, static mask): no diff is measured."""
    return torch.full((), math.nan, device=step.device), torch.full((), cache, dtype=torch.bool, device=step.device)


def finish_step(
    cache: torch.Tensor,
    diff: torch.Tensor,
    step: torch.Tensor,
    elapsed: torch.Tensor,
    valid: torch.Tensor,
    cached_count: torch.Tensor,
    cont_count: torch.Tensor,
    acc: torch.Tensor,
    hist_diff: torch.Tensor,
    hist_cached: torch.Tensor,
    p: torch.Tensor,
    h_fn: torch.Tensor,
    h0: torch.Tensor,
    residuals: list[torch.Tensor],
    outs: list[torch.Tensor],
    ins: list[torch.Tensor],
    times: torch.Tensor,
    now: torch.Tensor,
    *,
    signal_every_step: bool = False,
    newton: bool = False,
    cached_only: bool = False,
) -> None:
    """Store what a computed step produced (Fn residual, middle residuals or Taylor derivatives)
    and advance the counters. The stores are no-ops on cached steps (flag read on the device).
    `signal_every_step` (TeaCache): `p` takes `h_fn` itself on every step, cached ones included.
    `cached_only` (the split head, which finishes the step before the host has read whether it
    caches): a cached step's updates, and nothing on a step that computes, whose tail then
    runs this again in full (TeaCache's `p` takes the same `h_fn` twice)."""
    compute = ~cache
    gap = elapsed.to(torch.float32)  # since the last compute, in steps or in timestep units
    if signal_every_step:
        p[0].copy_(h_fn)
    elif not cached_only:
        _kernel("taylor_update_", h_fn)(p, h_fn, h0, torch.zeros_like(valid), gap, compute)
    if not cached_only:
        for res, out, inp in zip(residuals, outs, ins):
            if newton:
                kernels.newton_update_(res, out, inp, valid, times, now, compute)
            else:
                _kernel("taylor_update_", out)(res, out, inp, valid, gap, compute)
        # this compute's position joins the front (the Newton update above used the older ones)
        times.copy_(torch.where(compute, torch.cat([now.reshape(1).to(times.dtype), times[:-1]]), times))
        levels = residuals[0].shape[0] if residuals else 1
        valid.copy_(torch.where(compute, torch.clamp(valid + 1, max=levels), valid))
    measured = torch.nan_to_num(diff, nan=0.0)
    acc.copy_(torch.where(cache, acc + measured, acc if cached_only else torch.zeros_like(acc)))
    cached_count.copy_(cached_count + cache.to(cached_count.dtype))
    cont_count.copy_(torch.where(cache, cont_count + 1, cont_count if cached_only else torch.zeros_like(cont_count)))
    here = torch.arange(hist_diff.shape[0], device=step.device) == step  # one-hot write, no data-dependent index
    if cached_only:
        here = here & cache
    hist_diff.copy_(torch.where(here, diff, hist_diff))
    hist_cached.copy_(torch.where(here, cache.to(hist_cached.dtype), hist_cached))
    step.copy_(step + cache.to(step.dtype) if cached_only else step + 1)


def position(step: torch.Tensor, ts: torch.Tensor, *, in_timesteps: bool) -> torch.Tensor:
    """Where this step sits, in the units TaylorSeer measures gaps in: the step index, or minus
    the timestep (timesteps fall as sampling goes on, positions grow)."""
    return -ts if in_timesteps else step.to(torch.float32)


def since_last_compute(now: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """The gap from the last computed step to this one (`times[0]` is its position)."""
    return now - times[0]


def forecast(
    residual: torch.Tensor,
    carried: torch.Tensor,
    valid: torch.Tensor,
    elapsed: torch.Tensor,
    times: torch.Tensor | None = None,
    now: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cache branch: the carried value after the middle = after Fn + stored residual (or its
    Taylor forecast `elapsed` after the last compute; with `times`, the Newton polynomial at `now`)."""
    if times is not None:
        return kernels.newton_forecast(residual, carried, valid, times, now)
    return _kernel("taylor_forecast", carried)(residual, carried, valid, elapsed)


# ---- DBPrune (SPEC §7) -------------------------------------------------------------------------


def prune_decide(
    x: torch.Tensor,
    snapshots: torch.Tensor,
    norms: torch.Tensor,
    valid: torch.Tensor,
    step: torch.Tensor,
    *,
    threshold: float,
    max_warmup_steps: int,
    warmup_interval: int,
    group: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All prunable blocks at once, from one reduction: block j is pruned when, for every sample,
    sum|x - x_j| / sum|input_j| < threshold, where x is the middle's input now, x_j the middle's
    input and input_j block j's own input when block j last ran. Returns per-block diffs (the
    largest over samples) and the prune flags, on the device. With `group` (ranks holding shards
    of the sequence) both sums are all-reduced first, so all ranks prune alike."""
    blocks, batch = norms.shape
    change = (x.unsqueeze(0).float() - snapshots.float()).abs().reshape(blocks, batch, -1).sum(-1)
    if group is not None:
        change, norms = _sum_over(torch.stack([change, norms]), group).unbind(0)
    d = change / (norms + 1e-12)
    warm = (step < max_warmup_steps) & (step % warmup_interval == 0)
    ok = torch.isfinite(d).all(1) & (d < threshold).all(1) & (valid > 0) & ~warm
    measured = (valid > 0) & ~warm
    return torch.where(measured, d.max(1).values, math.nan), ok


def add_residual(base: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """A pruned block's output: its input plus its stored residual (`[1, *shape]`, as DBCache's)."""
    return (base + residual[0]).to(base.dtype)


def prune_store(
    pruned: torch.Tensor,
    j: int,
    residuals: list[torch.Tensor],
    outs: list[torch.Tensor],
    ins: list[torch.Tensor],
    snapshots: torch.Tensor,
    x: torch.Tensor,
    norms: torch.Tensor,
    hidden_in: torch.Tensor,
) -> None:
    """After block j ran (not pruned): store its residuals, the middle's input and its input norm."""
    ran = ~pruned[j]
    for res, out, inp in zip(residuals, outs, ins):  # D0 = out - inp where ran; the op skips the data otherwise
        _kernel("taylor_update_", out)(res, out, inp, torch.zeros_like(pruned[j], dtype=torch.int64), torch.ones((), device=out.device), ran)
    snapshots[j].copy_(torch.where(ran, x, snapshots[j]))
    norm = hidden_in.float().abs().reshape(hidden_in.shape[0], -1).sum(1)
    norms[j].copy_(torch.where(ran, norm, norms[j]))


def finish_prune(
    step: torch.Tensor,
    valid: torch.Tensor,
    hist_diff: torch.Tensor,
    hist_cached: torch.Tensor,
    diffs: torch.Tensor,
    pruned: torch.Tensor,
) -> None:
    """Every block has run once after the first step; history: largest diff, blocks pruned."""
    valid.copy_(torch.ones_like(valid))
    here = torch.arange(hist_diff.shape[0], device=step.device) == step
    largest = diffs.max() if diffs.numel() else torch.full((), math.nan, device=step.device)
    hist_diff.copy_(torch.where(here, largest, hist_diff))
    count = torch.clamp(pruned.sum(), max=torch.iinfo(hist_cached.dtype).max).to(hist_cached.dtype)
    hist_cached.copy_(torch.where(here, count, hist_cached))
    step.copy_(step + 1)
