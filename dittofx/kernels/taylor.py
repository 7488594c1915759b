"""TaylorSeer calibrator (SPEC.md section 4) as custom ops: in-place derivative update and forecast.

``derivs`` holds the ``k + 1`` levels ``D0..Dk`` stacked as ``[k + 1, *S]``; each element carries all
levels in registers, so one update or forecast is one pass over ``k + 1`` buffers.
"""

from __future__ import annotations

import torch

__all__ = ["taylor_update_", "taylor_forecast"]


def _update_torch(
    derivs: torch.Tensor, x: torch.Tensor, base: torch.Tensor, valid: torch.Tensor, gap: torch.Tensor, flag: torch.Tensor
) -> None:
    """fp32 reference of ``taylor_update_``; reads ``flag``/``valid`` on the host (free on CPU)."""
    if not bool(flag):
        return
    top = min(int(valid), derivs.shape[0] - 1)  # highest level computed by this update
    cur = x.float() - base.float()
    g = gap.float()
    for i in range(1, top + 1):
        old = derivs[i - 1].to(torch.float32, copy=True)  # read before it is overwritten
        derivs[i - 1].copy_(cur)
        cur = (cur - old) / g
    derivs[top].copy_(cur)


def _forecast_torch(derivs: torch.Tensor, base: torch.Tensor, valid: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """fp32 reference of ``taylor_forecast``: ``base + sum_{i < valid} D(i) e^i / i!``."""
    out = base.float()
    coef = torch.ones((), dtype=torch.float32, device=base.device)
    ef = e.float()
    for i in range(min(int(valid), derivs.shape[0])):
        if i:
            coef = coef * ef / i
        out = out + derivs[i].float() * coef
    return out.to(base.dtype)


@torch.library.custom_op("dittofx::taylor_update_", mutates_args=("derivs",))
def taylor_update_(
    derivs: torch.Tensor, x: torch.Tensor, base: torch.Tensor, valid: torch.Tensor, gap: torch.Tensor, flag: torch.Tensor
) -> None:
    """If ``flag``: ``D0 = x - base``, ``D(i) = (D(i-1)_new - D(i-1)_old) / gap`` for ``i <= min(valid, k)``."""
    _update_torch(derivs, x, base, valid, gap, flag)


@taylor_update_.register_fake
def _(derivs, x, base, valid, gap, flag):
    return None


@torch.library.custom_op("dittofx::taylor_forecast", mutates_args=())
def taylor_forecast(derivs: torch.Tensor, base: torch.Tensor, valid: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``base + sum_{i < valid} derivs[i] * e^i / i!`` computed in fp32, returned in ``base.dtype``."""
    return _forecast_torch(derivs, base, valid, e)


@taylor_forecast.register_fake
def _(derivs, base, valid, e):
    return torch.empty(base.shape, dtype=base.dtype, device=base.device)
