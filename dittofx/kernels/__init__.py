"""Custom ops (namespace ``dittofx``) for the cache decision and the TaylorSeer calibrator.

Importing this package registers ``torch.ops.dittofx.{l1_sums, cache_decision, residual_diff,
taylor_update_, taylor_forecast}``. CUDA tensors run Triton kernels when Triton is importable
(``TRITON_AVAILABLE``); everything else runs the fp32 torch implementation of the same op.
"""

from ._layout import TRITON_AVAILABLE
from .residual_diff import cache_decision, l1_sums, residual_diff
from .taylor import taylor_forecast, taylor_update_

__all__ = ["TRITON_AVAILABLE", "l1_sums", "cache_decision", "residual_diff", "taylor_update_", "taylor_forecast"]
