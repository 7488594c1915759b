"""Relative-L1 residual diff and the DBCache decision (SPEC.md section 3) as custom ops.

``l1_sums`` reduces ``sum|x - base - ref|`` and ``sum|ref|`` in fp32; ``cache_decision`` turns the
sums and the host-side gate into a device bool; ``residual_diff`` fuses both, so the predicate
for ``torch.cond`` comes out of the device without a host sync.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["l1_sums", "cache_decision", "residual_diff"]

_EPS = 1e-12  # SPEC.md section 3: diff = sum|r - p| / (sum|p| + 1e-12)


def _num_samples(x: torch.Tensor, per_sample: bool) -> int:
    return x.shape[0] if per_sample else 1


def _sums_torch(
    x: torch.Tensor, ref: torch.Tensor, base: Optional[torch.Tensor], per_sample: bool
) -> torch.Tensor:
    """fp32 reference implementation of ``l1_sums`` (what CPU users run)."""
    b = _num_samples(x, per_sample)
    xf, rf = x.float(), ref.float()
    d = xf - base.float() - rf if base is not None else xf - rf
    return torch.stack([d.abs().reshape(b, -1).sum(1), rf.abs().reshape(b, -1).sum(1)], 1)


def _decide_torch(
    sums: torch.Tensor, gate: torch.Tensor, acc: torch.Tensor, threshold: float, acc_limit: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 reference implementation of ``cache_decision``; no host sync."""
    d = sums[:, 0] / (sums[:, 1] + _EPS)
    finite = torch.isfinite(d)
    ok = finite & (d < threshold) & (acc.float() + d <= acc_limit)
    by_diff_val = torch.where(finite.all(), d.max(), d.new_tensor(float("nan")))
    gated = gate != 0
    diff = torch.where(gated, d.new_tensor(float("nan")), by_diff_val)
    cache = torch.where(gated, gate == 2, ok.all())
    return diff, cache


@torch.library.custom_op("dittofx::l1_sums", mutates_args=())
def l1_sums(x: torch.Tensor, ref: torch.Tensor, base: Optional[torch.Tensor], per_sample: bool) -> torch.Tensor:
    """fp32 ``[B, 2]``: ``[:, 0] = sum|x - base - ref|`` (``|x - ref|`` without base), ``[:, 1] = sum|ref|``."""
    return _sums_torch(x, ref, base, per_sample)


@l1_sums.register_fake
def _(x, ref, base, per_sample):
    return x.new_empty((_num_samples(x, per_sample), 2), dtype=torch.float32)


@torch.library.custom_op("dittofx::cache_decision", mutates_args=())
def cache_decision(
    sums: torch.Tensor, gate: torch.Tensor, acc: torch.Tensor, threshold: float, acc_limit: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(diff fp32 0-d, cache bool 0-d)`` from ``[B, 2]`` sums; gate 0 = by diff, 1 = compute, 2 = cache."""
    return _decide_torch(sums, gate, acc, threshold, acc_limit)


def _decision_fake(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((), dtype=torch.float32, device=device), torch.empty((), dtype=torch.bool, device=device))


@cache_decision.register_fake
def _(sums, gate, acc, threshold, acc_limit):
    return _decision_fake(sums.device)


@torch.library.custom_op("dittofx::residual_diff", mutates_args=())
def residual_diff(
    x: torch.Tensor,
    ref: torch.Tensor,
    base: Optional[torch.Tensor],
    gate: torch.Tensor,
    acc: torch.Tensor,
    threshold: float,
    acc_limit: float,
    per_sample: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cache_decision(l1_sums(...))`` in one pass over the data; skips the data when ``gate != 0``."""
    if x.device.type == "cpu" and int(gate) != 0:  # a host read is free on CPU: skip the reduction
        sums = x.new_zeros((_num_samples(x, per_sample), 2), dtype=torch.float32)
    else:
        sums = _sums_torch(x, ref, base, per_sample)
    return _decide_torch(sums, gate, acc, threshold, acc_limit)


@residual_diff.register_fake
def _(x, ref, base, gate, acc, threshold, acc_limit, per_sample):
    return _decision_fake(x.device)
