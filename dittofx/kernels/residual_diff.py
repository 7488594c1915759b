"""Relative-L1 residual diff and the DBCache decision (SPEC.md section 3) as custom ops.

``l1_sums`` reduces ``sum|x - base - ref|`` and ``sum|ref|`` in fp32; ``cache_decision`` turns the
sums and the core's gate (a device int) into a device bool; ``residual_diff`` fuses both, so the
predicate for ``torch.cond`` comes out without a host sync. Reductions are two-stage (fixed
partition, fixed order, no atomics): bitwise reproducible run to run.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._layout import CUDA_REDUCE, INTERPRETER, TRITON_AVAILABLE, Config, Layout, collapse, use_triton

__all__ = ["l1_sums", "cache_decision", "residual_diff"]

_EPS = 1e-12  # SPEC.md section 3: diff = sum|r - p| / (sum|p| + 1e-12)

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from ._layout import strided_offsets

    @triton.jit
    def _l1_partials_kernel(
        x_ptr, r_ptr, b_ptr, gate_ptr, part_ptr, n, n_tiles, D1, D2,
        xsb, xs0, xs1, xs2, rsb, rs0, rs1, rs2, bsb, bs0, bs1, bs2,
        HAS_BASE: tl.constexpr, USE_GATE: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Stage 1: program ``(p, b)`` sums tiles ``p, p + P, ...`` of sample ``b`` into ``part[b, p, :]``."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        b = tl.program_id(1).to(tl.int64)
        run = True
        if USE_GATE:
            run = tl.load(gate_ptr) == 0  # gated steps skip the data entirely
        if run:
            acc_d = tl.zeros([BLOCK], dtype=tl.float32)
            acc_r = tl.zeros([BLOCK], dtype=tl.float32)
            for t in range(pid, n_tiles, nprog):
                j = t * BLOCK + tl.arange(0, BLOCK)
                m = j < n
                xv = tl.load(x_ptr + b * xsb + strided_offsets(j, D1, D2, xs0, xs1, xs2, CONTIG), mask=m, other=0)
                rv = tl.load(r_ptr + b * rsb + strided_offsets(j, D1, D2, rs0, rs1, rs2, CONTIG), mask=m, other=0)
                d = xv.to(tl.float32)
                if HAS_BASE:
                    bv = tl.load(b_ptr + b * bsb + strided_offsets(j, D1, D2, bs0, bs1, bs2, CONTIG), mask=m, other=0)
                    d = d - bv.to(tl.float32)
                rf = rv.to(tl.float32)
                acc_d += tl.abs(d - rf)
                acc_r += tl.abs(rf)
            out = part_ptr + (b * nprog + pid) * 2
            tl.store(out, tl.sum(acc_d, axis=0))
            tl.store(out + 1, tl.sum(acc_r, axis=0))

    @triton.jit
    def _finish_kernel(
        part_ptr, P, B, gate_ptr, acc_ptr, sums_ptr, diff_ptr, cache_ptr, threshold, acc_limit,
        DECIDE: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """Stage 2 (one program): fixed-order sum of the partials; then the sums or the decision.

        The decision issues every load up front: the gate, ``acc`` and the partials do not wait on one
        another (the gate selects the result at the end), so the launch costs one memory latency, not three.
        On a gated step the partials are unwritten; they are read and ignored.
        """
        p = tl.arange(0, BLOCK_P)
        if DECIDE:
            g = tl.load(gate_ptr)
            acc = tl.load(acc_ptr).to(tl.float32)
            nan = tl.full([], float("nan"), tl.float32)
            dmax = tl.full([], float("-inf"), tl.float32)
            bad = g != 0  # True on gated steps: the diff is NaN there
            ok = g == 0
            for b in range(B):
                row = part_ptr + (b * P + p) * 2
                s_d = tl.sum(tl.load(row, mask=p < P, other=0), axis=0)
                s_r = tl.sum(tl.load(row + 1, mask=p < P, other=0), axis=0)
                d = s_d / (s_r + 1e-12)
                finite = tl.abs(d) < float("inf")  # False for NaN and +-inf
                bad = bad | (finite == 0)
                ok = ok & finite & (d < threshold) & (acc + d <= acc_limit)
                dmax = tl.maximum(dmax, d)
            tl.store(diff_ptr, tl.where(bad, nan, dmax))
            tl.store(cache_ptr, tl.where(g != 0, g == 2, ok))
        else:
            for b in range(B):
                row = part_ptr + (b * P + p) * 2
                tl.store(sums_ptr + b * 2, tl.sum(tl.load(row, mask=p < P, other=0), axis=0))
                tl.store(sums_ptr + b * 2 + 1, tl.sum(tl.load(row + 1, mask=p < P, other=0), axis=0))


def _config(t: torch.Tensor) -> Config:
    return CUDA_REDUCE if t.is_cuda else INTERPRETER


def _plan(
    ts: list[torch.Tensor], per_sample: bool
) -> tuple[list[torch.Tensor], int, int, Layout, list[int]]:
    """Operands, samples B, elements per sample, their collapsed layout, and per-tensor batch strides."""
    for _ in range(2):  # a layout beyond MAX_RANK dims is made contiguous once
        if per_sample:
            b, shape, strides, bstr = ts[0].shape[0], ts[0].shape[1:], [t.stride()[1:] for t in ts], [t.stride(0) for t in ts]
        else:
            b, shape, strides, bstr = 1, ts[0].shape, [t.stride() for t in ts], [0] * len(ts)
        lay = collapse(shape, strides)
        if lay is not None:
            return ts, b, ts[0].numel() // max(b, 1), lay, bstr
        ts = [t.contiguous() for t in ts]
    raise AssertionError("contiguous tensors always collapse")


def _partials(
    x: torch.Tensor, ref: torch.Tensor, base: Optional[torch.Tensor], gate: Optional[torch.Tensor], per_sample: bool, cfg: Config
) -> torch.Tensor:
    """Launch stage 1; returns fp32 ``[B, P, 2]`` partial sums (unwritten when ``gate != 0``)."""
    ts, b, n, lay, bstr = _plan([x, ref] + ([base] if base is not None else []), per_sample)
    n_tiles = triton.cdiv(n, cfg.block)
    nprog = max(1, min(n_tiles, cfg.max_programs // max(b, 1)))
    part = torch.empty((b, nprog, 2), dtype=torch.float32, device=x.device)
    st = [(bs,) + s for bs, s in zip(bstr, lay.strides)]
    xs, rs = st[0], st[1]
    bs = st[2] if base is not None else xs
    if b > 0:
        _l1_partials_kernel[(nprog, b)](
            ts[0], ts[1], ts[2] if base is not None else ts[0], gate if gate is not None else part, part,
            n, n_tiles, lay.sizes[1], lay.sizes[2], *xs, *rs, *bs,
            HAS_BASE=base is not None, USE_GATE=gate is not None, CONTIG=lay.contig, BLOCK=cfg.block,
            num_warps=cfg.num_warps,
        )
    return part


def _finish(
    part: torch.Tensor, sums: Optional[torch.Tensor], decision: Optional[tuple[torch.Tensor, torch.Tensor]],
    gate: Optional[torch.Tensor] = None, acc: Optional[torch.Tensor] = None, threshold: float = 0.0, acc_limit: float = 0.0,
) -> None:
    """Launch stage 2: writes ``sums`` (``l1_sums``) or ``decision`` (the other two ops); unused pointers get ``part``."""
    diff, cache = decision if decision is not None else (part, part)
    _finish_kernel[(1,)](
        part, part.shape[1], part.shape[0], gate if gate is not None else part, acc if acc is not None else part,
        sums if sums is not None else part, diff, cache, float(threshold), float(acc_limit),
        DECIDE=decision is not None, BLOCK_P=triton.next_power_of_2(part.shape[1]),
    )


def l1_sums_triton(
    x: torch.Tensor, ref: torch.Tensor, base: Optional[torch.Tensor], per_sample: bool,
    *, out: Optional[torch.Tensor] = None, config: Optional[Config] = None,
) -> torch.Tensor:
    """Triton ``l1_sums`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``); ``out`` for tests/benchmarks."""
    part = _partials(x, ref, base, None, per_sample, config or _config(x))
    out = out if out is not None else torch.empty((part.shape[0], 2), dtype=torch.float32, device=x.device)
    _finish(part, out, None)
    return out


def _decision_outs(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty((), dtype=torch.float32, device=device), torch.empty((), dtype=torch.bool, device=device)


def cache_decision_triton(
    sums: torch.Tensor, gate: torch.Tensor, acc: torch.Tensor, threshold: float, acc_limit: float,
    *, out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``cache_decision``: the sums are stage-2 partials with one partial per sample."""
    out = out or _decision_outs(sums.device)
    _finish(sums.float().contiguous().view(-1, 1, 2), None, out, gate, acc, threshold, acc_limit)
    return out


def residual_diff_triton(
    x: torch.Tensor, ref: torch.Tensor, base: Optional[torch.Tensor], gate: torch.Tensor, acc: torch.Tensor,
    threshold: float, acc_limit: float, per_sample: bool,
    *, out: Optional[tuple[torch.Tensor, torch.Tensor]] = None, config: Optional[Config] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``residual_diff``: one pass over the data (none when ``gate != 0``), then the decision."""
    part = _partials(x, ref, base, gate, per_sample, config or _config(x))
    out = out or _decision_outs(x.device)
    _finish(part, None, out, gate, acc, threshold, acc_limit)
    return out


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
    """fp32 reference implementation of ``cache_decision``; no host sync, no host-to-device copy (graph-capturable)."""
    d = sums[:, 0] / (sums[:, 1] + _EPS)
    finite = torch.isfinite(d)
    ok = finite & (d < threshold) & (acc.float() + d <= acc_limit)
    gated = gate != 0
    diff = torch.where(gated | ~finite.all(), float("nan"), d.max())
    cache = torch.where(gated, gate == 2, ok.all())
    return diff, cache


def _residual_diff_torch(
    x: torch.Tensor,
    ref: torch.Tensor,
    base: Optional[torch.Tensor],
    gate: torch.Tensor,
    acc: torch.Tensor,
    threshold: float,
    acc_limit: float,
    per_sample: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 reference implementation of ``residual_diff``; no host read (traceable)."""
    return _decide_torch(_sums_torch(x, ref, base, per_sample), gate, acc, threshold, acc_limit)


@torch.library.custom_op("dittofx::l1_sums", mutates_args=())
def l1_sums(x: torch.Tensor, ref: torch.Tensor, base: Optional[torch.Tensor], per_sample: bool) -> torch.Tensor:
    """fp32 ``[B, 2]``: ``[:, 0] = sum|x - base - ref|`` (``|x - ref|`` without base), ``[:, 1] = sum|ref|``."""
    if use_triton(x):
        return l1_sums_triton(x, ref, base, per_sample)
    return _sums_torch(x, ref, base, per_sample)


@l1_sums.register_fake
def _(x, ref, base, per_sample):
    return x.new_empty((_num_samples(x, per_sample), 2), dtype=torch.float32)


@torch.library.custom_op("dittofx::cache_decision", mutates_args=())
def cache_decision(
    sums: torch.Tensor, gate: torch.Tensor, acc: torch.Tensor, threshold: float, acc_limit: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(diff fp32 0-d, cache bool 0-d)`` from ``[B, 2]`` sums; gate 0 = by diff, 1 = compute, 2 = cache."""
    if use_triton(sums):
        return cache_decision_triton(sums, gate, acc, threshold, acc_limit)
    return _decide_torch(sums, gate, acc, threshold, acc_limit)


@cache_decision.register_fake
def _(sums, gate, acc, threshold, acc_limit):
    return _decision_outs(sums.device)


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
    if use_triton(x):
        return residual_diff_triton(x, ref, base, gate, acc, threshold, acc_limit, per_sample)
    if x.device.type == "cpu" and int(gate) != 0:  # a host read is free on CPU: skip the reduction
        sums = x.new_zeros((_num_samples(x, per_sample), 2), dtype=torch.float32)
        return _decide_torch(sums, gate, acc, threshold, acc_limit)
    return _residual_diff_torch(x, ref, base, gate, acc, threshold, acc_limit, per_sample)


@residual_diff.register_fake
def _(x, ref, base, gate, acc, threshold, acc_limit, per_sample):
    return _decision_outs(x.device)
