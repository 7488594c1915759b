"""Cache configurations and their validation.

A config is a frozen dataclass; `parse_config` also takes the plain dicts that cache-dit and
vLLM-omni users already write (`{"Fn_compute_blocks": 1, "residual_diff_threshold": 0.12}`).
Validation happens before anything touches the model, so bad input never half-applies.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .masks import PRESETS
from .runtime.state import HISTORY

__all__ = ["DBCacheConfig", "DBPruneConfig", "TeaCacheConfig", "merge_config", "parse_config"]


@dataclass(frozen=True)
class DBCacheConfig:
    """DBCache: run the first `Fn_compute_blocks` blocks every step, skip the middle when the
    relative L1 change of their residual is below `residual_diff_threshold` (SPEC §3)."""

    Fn_compute_blocks: int = 1
    Bn_compute_blocks: int = 0
    residual_diff_threshold: float = 0.08
    max_warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    max_accumulated_residual_diff_threshold: float | None = None
    enable_separate_cfg: bool | None = None
    cfg_compute_first: bool = False
    cfg_diff_compute_separate: bool = True
    num_inference_steps: int | None = None
    # Which `nn.ModuleList`s form the block chain, in run order (e.g. ["transformer_blocks",
    # "single_transformer_blocks"]). None: detected from the captured graph.
    blocks: tuple[str, ...] | None = None
    # Steps computation mask (SPEC §5): an explicit 0/1 list, or a preset ("slow", "medium",
    # "fast", "ultra") generated for num_inference_steps. "dynamic": a 0 only lets the other gates
    # decide; "static": a 0 caches without measuring a diff.
    steps_computation_mask: tuple[int, ...] | None = None
    steps_mask_policy: str | None = None
    steps_computation_policy: str = "dynamic"
    # TaylorSeer (SPEC §4): forecast the middle residual from k derivatives instead of reusing it.
    enable_taylorseer: bool = False
    taylorseer_order: int = 1
    # TaylorSeer's step gap: "steps" (step indices, SPEC §4 and cache-dit: the default, exact on
    # any scheduler's grid), or "timestep" (the model's timestep input: on a non-uniform schedule
    # the derivatives follow the scheduler's own spacing)
    taylorseer_gap: str = "steps"
    # "taylor": SPEC §4 (cache-dit's: differences over the latest gap, sum D(i) e^i / i!; exact for a
    # residual linear in the step); "newton": divided differences over the actual compute steps and
    # the Newton polynomial through them (exact for a degree-k polynomial; torch ops, no Triton kernel)
    taylorseer_interpolation: str = "taylor"

    last_step_computes = False  # (not a field) SPEC §3 has no such gate; TeaCache has

    def short_name(self) -> str:
        """cache-dit style tag, e.g. `DBCache_F1B0_W4I1M-1MC3_R0.12_T0O0`."""
        return (
            f"DBCache_F{self.Fn_compute_blocks}B{self.Bn_compute_blocks}_"
            f"W{self.max_warmup_steps}I{self.warmup_interval}M{self.max_cached_steps}"
            f"MC{self.max_continuous_cached_steps}_R{self.residual_diff_threshold:g}"
            f"_T{int(self.enable_taylorseer)}O{self.taylorseer_order if self.enable_taylorseer else 0}"
            + (f"_SCM{self.steps_mask_policy or 'mask'}{self.steps_computation_policy[:1].upper()}" if self.has_mask else "")
        )

    @property
    def has_mask(self) -> bool:
        return self.steps_computation_mask is not None or self.steps_mask_policy is not None

    @property
    def levels(self) -> int:
        """Stored residual levels: the residual itself, or k+1 Taylor derivatives."""
        return self.taylorseer_order + 1 if self.enable_taylorseer else 1


class _DBCacheFieldsOff:
    """The DBCache schedule fields a method does not expose, at the values that switch them off
    (the engine reads one schedule for every method)."""

    max_accumulated_residual_diff_threshold = None
    max_cached_steps = -1
    max_continuous_cached_steps = -1
    steps_computation_mask = None
    steps_mask_policy = None
    steps_computation_policy = "dynamic"
    enable_taylorseer = False
    taylorseer_gap = "steps"
    taylorseer_interpolation = "taylor"
    has_mask = False
    levels = 1
    last_step_computes = False


@dataclass(frozen=True)
class TeaCacheConfig(_DBCacheFieldsOff):
    """TeaCache (SPEC §6): skip every block while the accumulated, polynomially rescaled relative L1
    change of block 0's modulated input stays under `rel_l1_thresh`.

    It runs on the DBCache step schedule with no Fn/Bn blocks (the whole chain is cached), step 0
    and the last step computed; only the decision differs. `coefficients`: numpy `poly1d` order
    (highest degree first), a name from `dittofx.teacache.COEFFICIENTS`, or None for the entry of
    the model's class."""

    rel_l1_thresh: float = 0.2
    coefficients: tuple[float, ...] | str | None = None
    num_inference_steps: int | None = None
    enable_separate_cfg: bool | None = None
    cfg_compute_first: bool = False
    cfg_diff_compute_separate: bool = True
    blocks: tuple[str, ...] | None = None

    # the fixed DBCache schedule TeaCache runs on: the whole chain, one warmup step, the last step
    Fn_compute_blocks = 0
    Bn_compute_blocks = 0
    max_warmup_steps = 1
    warmup_interval = 1
    last_step_computes = True

    def short_name(self) -> str:
        return f"TeaCache_R{self.rel_l1_thresh:g}"


@dataclass(frozen=True)
class DBPruneConfig(_DBCacheFieldsOff):
    """DBPrune (SPEC §7): each middle block (outside Fn/Bn and `non_prune_block_ids`, indices in the
    chain) is replaced by its stored residual while its input changed by less than
    `residual_diff_threshold` (relative L1) since the block last ran. All of a step's decisions come
    from one reduction made where the middle starts, so a step syncs the host at most once: the
    change of block j's input is taken as the change of the middle's input since block j last ran,
    relative to block j's input then."""

    Fn_compute_blocks: int = 1
    Bn_compute_blocks: int = 0
    residual_diff_threshold: float = 0.08
    max_warmup_steps: int = 8
    warmup_interval: int = 1
    non_prune_block_ids: tuple[int, ...] = ()
    num_inference_steps: int | None = None
    enable_separate_cfg: bool | None = None
    cfg_compute_first: bool = False
    cfg_diff_compute_separate: bool = True
    blocks: tuple[str, ...] | None = None

    def short_name(self) -> str:
        return (
            f"DBPrune_F{self.Fn_compute_blocks}B{self.Bn_compute_blocks}_W{self.max_warmup_steps}I{self.warmup_interval}"
            f"_R{self.residual_diff_threshold:g}" + (f"_NP{len(self.non_prune_block_ids)}" if self.non_prune_block_ids else "")
        )


_METHODS = {"dbcache": DBCacheConfig, "teacache": TeaCacheConfig, "dbprune": DBPruneConfig}
CacheConfig = DBCacheConfig | TeaCacheConfig | DBPruneConfig

# vLLM-omni's spellings of our fields
_ALIASES = {"scm_steps_mask_policy": "steps_mask_policy", "scm_steps_policy": "steps_computation_policy"}


def config_field_names() -> set[str]:
    """Every key a cache_config dict may hold, for any method (aliases and "method" included)."""
    return {f.name for cls in _METHODS.values() for f in dataclasses.fields(cls)} | set(_ALIASES) | {"method"}


def _check_int(name: str, value: Any, low: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} ({type(value).__name__}): must be an int, {what}")
    if value < low:
        raise ValueError(f"{name}={value!r}: must be {what}")


def _check_float(name: str, value: Any, what: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} ({type(value).__name__}): must be a float, {what}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r}: must be {what}")


def _check_list(name: str, value: Any, what: str) -> None:
    """A list or tuple: an array's (or a tensor's) truth value would raise its own error, naming no field."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}={value!r} ({type(value).__name__}): must be {what} (an array or a tensor: pass .tolist())")


def _check_optional_bool(name: str, value: Any, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        allowed = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"{name}={value!r}: must be {allowed}")


def _check_common(cfg: CacheConfig) -> None:
    """Fields every method shares: CFG branches, request length, block lists."""
    _check_optional_bool("enable_separate_cfg", cfg.enable_separate_cfg, allow_none=True)
    _check_optional_bool("cfg_compute_first", cfg.cfg_compute_first, allow_none=False)
    _check_optional_bool("cfg_diff_compute_separate", cfg.cfg_diff_compute_separate, allow_none=False)
    if not cfg.cfg_diff_compute_separate and not isinstance(cfg, DBCacheConfig):
        method = "teacache" if isinstance(cfg, TeaCacheConfig) else "dbprune"
        raise ValueError(
            f"cfg_diff_compute_separate=False: reusing one CFG branch's decision in the other is available for "
            f"method='dbcache' only (here: method='{method}'); allowed: True"
        )
    if cfg.num_inference_steps is not None:
        _check_int("num_inference_steps", cfg.num_inference_steps, 1, ">= 1 or None")
    if cfg.blocks is not None:
        if not isinstance(cfg.blocks, (list, tuple)) or not all(isinstance(b, str) and b for b in cfg.blocks):
            raise TypeError(
                f"blocks={cfg.blocks!r}: must be a list of ModuleList attribute paths, "
                "e.g. ['transformer_blocks', 'single_transformer_blocks'], or None"
            )


def _validate_teacache(cfg: TeaCacheConfig) -> TeaCacheConfig:
    _check_float("rel_l1_thresh", cfg.rel_l1_thresh, "a finite number >= 0")
    _check_common(cfg)
    coefficients = cfg.coefficients
    if coefficients is None or isinstance(coefficients, str):
        return cfg  # resolved against the model's class (or the table) by `teacache.coefficients_for`
    _check_list("coefficients", coefficients, "a list of numbers, a name from dittofx.teacache.COEFFICIENTS, or None")
    if not coefficients or not all(
        isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in coefficients
    ):
        raise ValueError(
            f"coefficients={coefficients!r}: must be a non-empty list of finite numbers (numpy poly1d order, "
            f"highest degree first), a name from dittofx.teacache.COEFFICIENTS, or None"
        )
    return cfg


def _check_blocks_threshold_warmup(cfg: DBCacheConfig | DBPruneConfig) -> None:
    """The fields DBCache and DBPrune share."""
    _check_int("Fn_compute_blocks", cfg.Fn_compute_blocks, 1, ">= 1")
    _check_int("Bn_compute_blocks", cfg.Bn_compute_blocks, 0, ">= 0")
    _check_float("residual_diff_threshold", cfg.residual_diff_threshold, "a finite number >= 0")
    _check_int("max_warmup_steps", cfg.max_warmup_steps, 0, ">= 0")
    _check_int("warmup_interval", cfg.warmup_interval, 1, ">= 1")


def _validate_dbprune(cfg: DBPruneConfig) -> DBPruneConfig:
    _check_blocks_threshold_warmup(cfg)
    ids = cfg.non_prune_block_ids
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"non_prune_block_ids={ids!r}: must be a list of block indices >= 0 (positions in the chain)")
    _check_common(cfg)
    return cfg


def _python_numbers(cfg: CacheConfig) -> CacheConfig:
    """`cfg` with numpy scalars (a threshold computed with numpy, a count read from an array), alone
    or in a list field, as the Python numbers the checks and the graph take."""

    def plain(value: Any) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, (list, tuple)) and any(isinstance(v, np.generic) for v in value):
            return type(value)(plain(v) for v in value)
        return value

    changes = {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    changes = {name: value for name, value in changes.items() if value is not getattr(cfg, name)}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def validate(cfg: CacheConfig) -> CacheConfig:
    """Raise a ValueError/TypeError naming the field, the value and what is allowed; numpy scalars
    become Python numbers."""
    cfg = _python_numbers(cfg)
    if isinstance(cfg, TeaCacheConfig):
        return _validate_teacache(cfg)
    if isinstance(cfg, DBPruneConfig):
        return _validate_dbprune(cfg)
    _check_blocks_threshold_warmup(cfg)
    _check_int("max_cached_steps", cfg.max_cached_steps, -1, ">= 0, or -1 for no limit")
    _check_int(
        "max_continuous_cached_steps", cfg.max_continuous_cached_steps, -1, ">= 0, or -1 for no limit"
    )
    _check_float(
        "max_accumulated_residual_diff_threshold",
        cfg.max_accumulated_residual_diff_threshold,
        "a finite number >= 0 or None",
        allow_none=True,
    )
    _check_common(cfg)
    if cfg.steps_computation_mask is not None:
        mask = cfg.steps_computation_mask
        _check_list("steps_computation_mask", mask, "a list of 0/1 ints")
        if not mask or not all(m in (0, 1) and not isinstance(m, float) for m in mask):
            raise ValueError(f"steps_computation_mask={mask!r}: must be a non-empty list of 0/1 ints")
        if len(mask) > HISTORY:  # the device reads the mask from a buffer of HISTORY steps
            raise ValueError(f"steps_computation_mask=({len(mask)} steps): must be at most {HISTORY} steps long")
        if cfg.steps_mask_policy is not None:
            raise ValueError(
                f"steps_computation_mask and scm_steps_mask_policy={cfg.steps_mask_policy!r}: give one of them, not both"
            )
    if cfg.steps_mask_policy is not None and cfg.steps_mask_policy not in PRESETS:
        raise ValueError(f"scm_steps_mask_policy={cfg.steps_mask_policy!r}: must be one of {sorted(PRESETS)} or None")
    if cfg.steps_computation_policy not in ("dynamic", "static"):
        raise ValueError(f"scm_steps_policy={cfg.steps_computation_policy!r}: must be 'dynamic' or 'static'")
    _check_optional_bool("enable_taylorseer", cfg.enable_taylorseer, allow_none=False)
    _check_int("taylorseer_order", cfg.taylorseer_order, 1, ">= 1")
    if cfg.taylorseer_interpolation not in ("taylor", "newton"):
        raise ValueError(f"taylorseer_interpolation={cfg.taylorseer_interpolation!r}: must be 'taylor' or 'newton'")
    if cfg.taylorseer_gap not in ("steps", "timestep"):
        raise ValueError(f"taylorseer_gap={cfg.taylorseer_gap!r}: must be 'steps' or 'timestep'")
    return cfg


def _from_cache_dit(config: Any) -> Any:
    """cache-dit's own config objects (`cache_dit.DBCacheConfig`, `cache_dit.DBPruneConfig`) as the
    dict of their fields (cache-dit's defaults included: the object is cache-dit's; a field set to
    None, as its `reset(...)` leaves every field it is not given, is unset), and a cache-dit
    `ParamsModifier` as its cache config; `config` as it is if it is none of them."""
    kind = type(config)
    if kind.__module__.startswith("cache_dit.") and kind.__name__ == "ParamsModifier":
        held = getattr(config, "_context_kwargs", {})
        if held.get("calibrator_config") is not None:
            raise ValueError(
                f"ParamsModifier(calibrator_config={type(held['calibrator_config']).__name__}(...)): in dittofx TaylorSeer "
                f"is part of the cache config: {{..., 'enable_taylorseer': True, 'taylorseer_order': k}}"
            )
        return _from_cache_dit(held.get("cache_config", {}))
    if not (kind.__module__.startswith("cache_dit.") and dataclasses.is_dataclass(config)):
        return config
    if kind.__name__ == "TaylorSeerCalibratorConfig":
        raise TypeError(
            f"cache_config={kind.__name__}(taylorseer_order={getattr(config, 'taylorseer_order', '?')}): cache-dit's "
            f"calibrator config is no cache config; in dittofx TaylorSeer is part of it: "
            f"{{..., 'enable_taylorseer': True, 'taylorseer_order': k}}"
        )
    if kind.__name__ == "BasicCacheConfig":  # what cache-dit's deprecated ParamsModifier(max_warmup_steps=2, ...) makes
        raise TypeError(
            "cache_config=cache_dit.BasicCacheConfig(...): cache-dit's base class (its deprecated ParamsModifier keywords "
            "make one, with every other field at cache-dit's defaults); give ParamsModifier(cache_config="
            "cache_dit.DBCacheConfig().reset(...)) or a dict of the fields to change"
        )
    method = {"DBCacheConfig": "dbcache", "DBPruneConfig": "dbprune"}.get(kind.__name__)
    if method is None:
        return config
    ours = {f.name for f in dataclasses.fields(_METHODS[method])}
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "cache_type" and getattr(config, f.name) is not None}
    defaults = {f.name: f.default for f in dataclasses.fields(kind)}
    unsupported = sorted(k for k, v in values.items() if k not in ours and v != defaults[k])
    if unsupported:
        raise ValueError(
            f"cache_config=cache_dit.{kind.__name__} sets {', '.join(f'{k}={values[k]!r}' for k in unsupported)}: "
            f"not supported by dittofx; its fields for method={method!r}: {sorted(ours)}"
        )
    return {"method": method, **{k: v for k, v in values.items() if k in ours}}


def parse_config(cache_config: Any) -> CacheConfig:
    """Turn a config object (ours or cache-dit's) or a cache-dit / vLLM-omni style dict into a
    validated config."""
    cache_config = _from_cache_dit(cache_config)
    if isinstance(cache_config, tuple(_METHODS.values())):
        return validate(cache_config)
    if not isinstance(cache_config, Mapping):
        raise TypeError(
            f"cache_config={cache_config!r} ({type(cache_config).__name__}): must be one of "
            f"{[c.__name__ for c in _METHODS.values()]} or a dict of its fields (with \"method\")"
        )
    cls, options = _fields(cache_config)
    return validate(cls(**options))


def merge_config(base: CacheConfig, changes: Any) -> CacheConfig:
    """`base` with the fields a partial dict names replaced (a whole config, or a dict naming
    another method, replaces it all), as cache-dit's `ParamsModifier` overwrites the shared config
    with only what it sets."""
    changes = _from_cache_dit(changes)
    if isinstance(changes, tuple(_METHODS.values())):
        return validate(changes)
    if not isinstance(changes, Mapping):
        raise TypeError(
            f"{changes!r} ({type(changes).__name__}): must be one of {[c.__name__ for c in _METHODS.values()]} "
            f"or a dict of its fields"
        )
    method = next(m for m, c in _METHODS.items() if isinstance(base, c))
    cls, options = _fields({"method": method, **changes})
    return validate(dataclasses.replace(base, **options) if isinstance(base, cls) else cls(**options))


def _other_method_hint(cache_config: Mapping, options: dict) -> str:
    """For a dict with no "method" whose keys are all another method's (a vLLM-omni TeaCache dict,
    `{"rel_l1_thresh": 0.2, ...}`): which method to name."""
    if "method" in cache_config:
        return ""
    others = [m for m, c in _METHODS.items() if options.keys() <= {f.name for f in dataclasses.fields(c)}]
    return f"; all of these keys belong to method={others[0]!r}: add \"method\": \"{others[0]}\"" if others else ""


def _fields(cache_config: Mapping) -> tuple[type, dict[str, Any]]:
    """The config class a dict names and its options under our field names (unknown keys raise)."""
    options = dict(cache_config)
    spelled = {}  # our field name -> the key as the user wrote it
    for alias, name in _ALIASES.items():
        if alias in options:
            if name in options and options[name] != options[alias]:
                raise ValueError(f"{alias}={options[alias]!r} and {name}={options[name]!r}: the same setting twice, with different values")
            options[name] = options.pop(alias)
            spelled[name] = alias
    method = options.pop("method", "dbcache")
    if method not in _METHODS:
        raise ValueError(f"method={method!r}: must be one of {sorted(_METHODS)}")
    cls = _METHODS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    for key in options:
        if not isinstance(key, str):
            raise TypeError(f"cache_config key {key!r}: keys must be strings")
        if key not in names:
            allowed = sorted(names | {"method"} | {alias for alias, name in _ALIASES.items() if name in names})
            raise ValueError(
                f"unknown cache_config key {spelled.get(key, key)!r} for method={method!r}; allowed keys: {allowed}"
                + _other_method_hint(cache_config, options)
            )
    for key in ("blocks", "steps_computation_mask", "coefficients", "non_prune_block_ids"):
        if isinstance(options.get(key), list):
            options[key] = tuple(options[key])
    return cls, options
