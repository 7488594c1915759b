"""TaylorSeer calibrator (SPEC.md section 4) as custom ops: in-place derivative update and forecast.

``derivs`` holds the ``k + 1`` levels ``D0..Dk`` stacked as ``[k + 1, *S]``; each element carries all
levels in registers, so one update or forecast is one pass over ``k + 1`` buffers.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._layout import CUDA_ELEMENTWISE, INTERPRETER, TRITON_AVAILABLE, Config, Layout, collapse, use_triton

__all__ = ["taylor_update_", "taylor_forecast", "newton_update_", "newton_forecast"]

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from ._layout import strided_offsets

    @triton.jit
    def _taylor_update_kernel(
        d_ptr, x_ptr, b_ptr, valid_ptr, gap_ptr, flag_ptr, n, D1, D2,
        d_lvl, ds0, ds1, ds2, xs0, xs1, xs2, bs0, bs1, bs2,
        LEVELS: tl.constexpr, LEVELS_P2: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Each element reads ``D0..D(top-1)`` once and writes ``D0..D(top)``, ``top = min(valid, k)``.

        The levels are one ``[LEVELS_P2, BLOCK]`` tile: a single load issued before any store. Level-by-level
        loads interleaved with the stores cannot be hoisted over them (same buffer), which serialised
        them on memory latency and halved the bandwidth (bench/results, 2026-11-22).
        """
        if tl.load(flag_ptr) != 0:
            top = tl.minimum(tl.load(valid_ptr), LEVELS - 1)
            gap = tl.load(gap_ptr).to(tl.float32)
            j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            m = j < n
            lv = tl.arange(0, LEVELS_P2)[:, None]
            ptrs = d_ptr + lv * d_lvl + strided_offsets(j, D1, D2, ds0, ds1, ds2, CONTIG)[None, :]
            old = tl.load(ptrs, mask=(lv < top) & m[None, :], other=0).to(tl.float32)
            xv = tl.load(x_ptr + strided_offsets(j, D1, D2, xs0, xs1, xs2, CONTIG), mask=m, other=0)
            bv = tl.load(b_ptr + strided_offsets(j, D1, D2, bs0, bs1, bs2, CONTIG), mask=m, other=0)
            cur = xv.to(tl.float32) - bv.to(tl.float32)
            new = tl.where(lv == 0, cur[None, :], 0.0)
            for i in tl.static_range(1, LEVELS):
                prev = tl.sum(tl.where(lv == i - 1, old, 0.0), axis=0)  # row i - 1 of the tile, exactly
                cur = (cur - prev) / gap
                new = tl.where(lv == i, cur[None, :], new)
            tl.store(ptrs, new.to(d_ptr.dtype.element_ty), mask=(lv <= top) & m[None, :])

    @triton.jit
    def _taylor_forecast_kernel(
        out_ptr, d_ptr, b_ptr, valid_ptr, e_ptr, n, D1, D2, d_lvl, ds0, ds1, ds2, bs0, bs1, bs2,
        LEVELS: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """``out = base + sum_{i < valid} D(i) e^i / i!`` in fp32; levels past ``valid`` are not read."""
        valid = tl.load(valid_ptr)
        e = tl.load(e_ptr).to(tl.float32)
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = j < n
        do = strided_offsets(j, D1, D2, ds0, ds1, ds2, CONTIG)
        acc = tl.load(b_ptr + strided_offsets(j, D1, D2, bs0, bs1, bs2, CONTIG), mask=m, other=0).to(tl.float32)
        coef = e * 0 + 1
        for i in tl.static_range(LEVELS):
            if i > 0:
                coef = coef * e / i
            dv = tl.load(d_ptr + i * d_lvl + do, mask=j < tl.where(valid > i, n, 0), other=0)
            acc += dv.to(tl.float32) * coef
        tl.store(out_ptr + j, acc.to(out_ptr.dtype.element_ty), mask=m)


def _elementwise_plan(derivs: torch.Tensor, others: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor], Layout]:
    """Collapsed layout over ``S`` of ``derivs[i]`` and ``others``; non-collapsible operands are made contiguous."""
    for _ in range(2):
        lay = collapse(others[0].shape, [derivs.stride()[1:]] + [t.stride() for t in others])
        if lay is not None:
            return derivs, others, lay
        derivs, others = derivs.contiguous(), [t.contiguous() for t in others]
    raise AssertionError("contiguous tensors always collapse")


def _config(t: torch.Tensor) -> Config:
    return CUDA_ELEMENTWISE if t.is_cuda else INTERPRETER


def taylor_update_triton(
    derivs: torch.Tensor, x: torch.Tensor, base: torch.Tensor, valid: torch.Tensor, gap: torch.Tensor, flag: torch.Tensor,
    *, config: Optional[Config] = None,
) -> None:
    """Triton ``taylor_update_`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``); no host sync."""
    cfg = config or _config(x)
    work, (xx, bb), lay = _elementwise_plan(derivs, [x, base])
    n = x.numel()
    _taylor_update_kernel[(triton.cdiv(n, cfg.block),)](
        work, xx, bb, valid, gap, flag, n, lay.sizes[1], lay.sizes[2], work.stride(0), *lay.strides[0],
        *lay.strides[1], *lay.strides[2], LEVELS=derivs.shape[0], LEVELS_P2=triton.next_power_of_2(derivs.shape[0]),
        CONTIG=lay.contig, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )
    if work is not derivs:  # derivs had a layout beyond MAX_RANK dims: write the result back
        derivs.copy_(work)


def taylor_forecast_triton(
    derivs: torch.Tensor, base: torch.Tensor, valid: torch.Tensor, e: torch.Tensor,
    *, out: Optional[torch.Tensor] = None, config: Optional[Config] = None,
) -> torch.Tensor:
    """Triton ``taylor_forecast``; ``out`` (contiguous, ``base.dtype``) for tests and benchmarks."""
    cfg = config or _config(base)
    work, (bb,), lay = _elementwise_plan(derivs, [base])
    out = out if out is not None else torch.empty(base.shape, dtype=base.dtype, device=base.device)
    n = base.numel()
    _taylor_forecast_kernel[(triton.cdiv(n, cfg.block),)](
        out, work, bb, valid, e, n, lay.sizes[1], lay.sizes[2], work.stride(0), *lay.strides[0], *lay.strides[1],
        LEVELS=derivs.shape[0], CONTIG=lay.contig, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )
    return out


def _update_torch(
    derivs: torch.Tensor, x: torch.Tensor, base: torch.Tensor, valid: torch.Tensor, gap: torch.Tensor, flag: torch.Tensor
) -> None:
    """fp32 reference of ``taylor_update_``, with no host read (traceable, e.g. by ``dittofx.export``):
    every level is worked out from the old ones, then written where ``flag`` and ``i <= min(valid, k)``;
    the other levels keep their bits."""
    top = torch.clamp(valid, max=derivs.shape[0] - 1)  # highest level this update writes
    cur = x.float() - base.float()
    new = [cur]
    for i in range(1, derivs.shape[0]):  # `gap`: one for every level, or one per level (Newton)
        cur = (cur - derivs[i - 1].float()) / (gap if gap.dim() == 0 else gap[i - 1]).float()
        new.append(cur)
    for i, value in enumerate(new):
        derivs[i].copy_(torch.where(flag & (top >= i), value.to(derivs.dtype), derivs[i]))


def _forecast_torch(derivs: torch.Tensor, base: torch.Tensor, valid: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """fp32 reference of ``taylor_forecast``: ``base + sum_{i < valid} D(i) e^i / i!``; fresh and
    contiguous; no host read (traceable)."""
    ef = e.float()
    coefs, coef = [], torch.ones((), dtype=torch.float32, device=base.device)
    for i in range(derivs.shape[0]):
        coef = coef * ef / i if i else coef
        coefs.append(coef)
    return _series_torch(derivs, base, valid, coefs)


def _series_torch(derivs: torch.Tensor, base: torch.Tensor, valid: torch.Tensor, coefs: list[torch.Tensor]) -> torch.Tensor:
    """``base + sum_{i < valid} coefs[i] * D(i)`` in fp32, fresh and contiguous."""
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device).copy_(base)
    for i, coef in enumerate(coefs):
        out = torch.where(valid > i, torch.addcmul(out, derivs[i], coef), out)
    return out.to(base.dtype, memory_format=torch.contiguous_format)


def newton_update_(
    derivs: torch.Tensor, x: torch.Tensor, base: torch.Tensor, valid: torch.Tensor, times: torch.Tensor,
    now: torch.Tensor, flag: torch.Tensor,
) -> None:
    """If ``flag``: Newton divided differences over the last ``k + 1`` computes (``times``: their
    positions, newest first; the caller then puts ``now`` in front):
    ``D(i) = (D(i-1)_new - D(i-1)_old) / (now - times[i-1])``. Exact for a residual that is a
    degree-k polynomial of the position, where SPEC §4's single gap is exact for degree 1 only.
    torch ops only (no Triton kernel)."""
    k = derivs.shape[0] - 1
    _update_torch(derivs, x, base, valid, now.float() - times[:k].float() if k else now.float(), flag)


def newton_forecast(derivs: torch.Tensor, base: torch.Tensor, valid: torch.Tensor, times: torch.Tensor, now: torch.Tensor) -> torch.Tensor:
    """``base + sum_{i < valid} D(i) prod_{m < i} (now - times[m])``: the Newton polynomial through
    the stored computes, at ``now``."""
    coefs, coef = [], torch.ones((), dtype=torch.float32, device=base.device)
    for i in range(derivs.shape[0]):
        coef = coef * (now.float() - times[i - 1].float()) if i else coef
        coefs.append(coef)
    return _series_torch(derivs, base, valid, coefs)


@torch.library.custom_op("dittofx::taylor_update_", mutates_args=("derivs",))
def taylor_update_(
    derivs: torch.Tensor, x: torch.Tensor, base: torch.Tensor, valid: torch.Tensor, gap: torch.Tensor, flag: torch.Tensor
) -> None:
    """If ``flag``: ``D0 = x - base``, ``D(i) = (D(i-1)_new - D(i-1)_old) / gap`` for ``i <= min(valid, k)``."""
    if use_triton(x):
        taylor_update_triton(derivs, x, base, valid, gap, flag)
    elif flag.device.type != "cpu" or bool(flag):  # a host read is free on CPU only: cached steps skip the pass
        _update_torch(derivs, x, base, valid, gap, flag)


@taylor_update_.register_fake
def _(derivs, x, base, valid, gap, flag):
    return None


@torch.library.custom_op("dittofx::taylor_forecast", mutates_args=())
def taylor_forecast(derivs: torch.Tensor, base: torch.Tensor, valid: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``base + sum_{i < valid} derivs[i] * e^i / i!`` computed in fp32, returned in ``base.dtype``."""
    if use_triton(base):
        return taylor_forecast_triton(derivs, base, valid, e)
    return _forecast_torch(derivs, base, valid, e)


@taylor_forecast.register_fake
def _(derivs, base, valid, e):
    return torch.empty(base.shape, dtype=base.dtype, device=base.device)
