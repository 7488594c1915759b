"""Custom ops (namespace ``dittofx``) for the cache decision and the TaylorSeer calibrator.

Importing this package registers ``torch.ops.dittofx.{l1_sums, cache_decision, residual_diff,
taylor_update_, taylor_forecast}``. CUDA tensors run Triton kernels when Triton is importable
(``TRITON_AVAILABLE``); everything else runs the fp32 torch implementation of the same op.
"""

import torch

from ._layout import TRITON_AVAILABLE, use_triton
from .residual_diff import _decide_torch, _residual_diff_torch, _sums_torch, cache_decision, l1_sums, residual_diff
from .taylor import _forecast_torch, _update_torch, newton_forecast, newton_update_, taylor_forecast, taylor_update_

__all__ = [
    "TORCH_IMPLEMENTATIONS",
    "TRITON_AVAILABLE",
    "use_triton",
    "l1_sums",
    "cache_decision",
    "residual_diff",
    "taylor_update_",
    "taylor_forecast",
    "newton_update_",
    "newton_forecast",
]

# Each op's torch implementation, traceable (no host read): what `dittofx.export` puts in place of
# the op, so that an exported program runs where these Python-registered ops do not exist.
TORCH_IMPLEMENTATIONS = {
    torch.ops.dittofx.l1_sums.default: _sums_torch,
    torch.ops.dittofx.cache_decision.default: _decide_torch,
    torch.ops.dittofx.residual_diff.default: _residual_diff_torch,
    torch.ops.dittofx.taylor_update_.default: _update_torch,
    torch.ops.dittofx.taylor_forecast.default: _forecast_torch,
}
