"""dittofx: make diffusion transformers skip what barely changes between denoising steps.

    import dittofx
    dittofx.optimize(transformer, {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.12})
"""

from . import kernels  # registers the torch.ops.dittofx custom ops
from . import teacache
from .aot import aoti_configs
from .api import CacheStats, disable, explain, export, optimize, refresh, reset, summary
from .masks import steps_mask
from .config import CacheConfig, DBCacheConfig, DBPruneConfig, TeaCacheConfig

__all__ = [
    "aoti_configs",
    "CacheConfig",
    "CacheStats",
    "DBCacheConfig",
    "DBPruneConfig",
    "disable",
    "explain",
    "export",
    "kernels",
    "optimize",
    "refresh",
    "reset",
    "steps_mask",
    "summary",
    "teacache",
    "TeaCacheConfig",
]
__version__ = "0.1.0"
