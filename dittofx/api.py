"""The public verbs: optimize, refresh, reset, summary, explain, disable (SPEC §1), and export."""

from __future__ import annotations

import inspect
import io
import logging
import math
import os
import weakref
from dataclasses import dataclass, is_dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .aot import export_program
from .config import CacheConfig, DBPruneConfig, TeaCacheConfig, config_field_names, merge_config, parse_config
from .masks import as_count
from .passes.partition import fn_bn_too_large
from .patterns.chain import module_lists
from .runtime.engine import UNDER_CUDA_GRAPHS, EAGER, Engine, context_parallel_group
from .runtime.state import HISTORY
from .runtime.pipeline import attach_refresh, detach_refresh, is_pipeline, pipeline_transformers

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = ["CacheStats", "optimize", "refresh", "reset", "summary", "explain", "disable", "export"]

log = logging.getLogger("dittofx")

# Each graph variant of the engine (compute, cache, device decision: shared by the CFG branches,
# whose states are inputs) and each input structure / static shape is its own dynamo graph of the
# model's forward; the default limit (8) is hit by e.g. 3 variants x 4 resolutions. Only raised.
_RECOMPILE_LIMIT = 64
_TORCH_RECOMPILE_LIMIT = 8  # torch's default
_ACCUMULATED_RECOMPILE_LIMIT = 512


def _tune_dynamo() -> None:
    cfg = torch._dynamo.config
    user_set = getattr(cfg, "recompile_limit", _TORCH_RECOMPILE_LIMIT) < _TORCH_RECOMPILE_LIMIT
    if user_set:  # below torch's own default: set on purpose (e.g. to catch recompiles), so said
        log.warning(
            "dittofx: torch._dynamo.config.recompile_limit=%d (below torch's default %d) raised to %d: each graph variant "
            "of an optimized model is a compile of its forward; set a lower limit after dittofx.optimize to keep it",
            cfg.recompile_limit, _TORCH_RECOMPILE_LIMIT, _RECOMPILE_LIMIT,
        )  # fmt: skip
    for name, value in (
        ("recompile_limit", _RECOMPILE_LIMIT),
        ("cache_size_limit", _RECOMPILE_LIMIT),
        ("accumulated_recompile_limit", _ACCUMULATED_RECOMPILE_LIMIT),
        ("accumulated_cache_size_limit", _ACCUMULATED_RECOMPILE_LIMIT),
    ):
        if hasattr(cfg, name) and getattr(cfg, name) < value:
            setattr(cfg, name, value)


def _unwrapped(model: Any) -> Any:
    """The module itself where `model` is what torch.compile returned for it (an OptimizedModule
    forwards some attribute writes to its module and keeps others: dittofx's all go to the module)."""
    return getattr(model, "_orig_mod", model)


def _find_engine(model: Any) -> Engine | None:
    target = _unwrapped(model)
    return target.__dict__.get("_dittofx") if isinstance(target, torch.nn.Module) else None


def _engine(model: torch.nn.Module) -> Engine:
    engine = _find_engine(model)
    if engine is None:
        raise ValueError(f"model={type(model).__name__}: not optimized by dittofx (call dittofx.optimize first)")
    return engine


def _modules(obj: Any) -> list[tuple[str, torch.nn.Module]]:
    """The optimized transformers behind `obj`: itself, or those of a pipeline still optimized (one
    disabled on its own, or replaced by another module, is left out)."""
    names = getattr(type(obj), "_dittofx_names", None)
    if names is None:
        return [("", obj)]
    found = [(name, getattr(obj, name)) for name in names if _find_engine(getattr(obj, name, None)) is not None]
    if not found:
        raise ValueError(
            f"pipeline {type(obj).__name__}: none of its transformers {names} is optimized any more (disabled on its own, "
            f"or replaced): dittofx.disable(pipe), then dittofx.optimize(pipe, ...) to cache again"
        )
    return found


def optimize(
    model: torch.nn.Module | DiffusionPipeline,
    cache_config: CacheConfig | dict[str, Any] | None = None,
    *,
    example_inputs: tuple[tuple, dict] | None = None,
    process_group: Any = None,
    params_modifiers: Mapping[str, Any] | list[Any] | None = None,
    split_at_decision: bool | dict[str, Any] | None = None,
    cuda_graphs: bool = False,
    **cache_dit_arguments: Any,
) -> torch.nn.Module | DiffusionPipeline:
    """Enable step caching on `model` in place and return it.

    `model` is a transformer (any `nn.Module` with a chain of blocks) or a diffusers pipeline: then
    every transformer in it is optimized and each call of that pipeline refreshes the request
    length: the number of timesteps the pipeline sets on its scheduler for the loop (custom
    sigmas, img2img strength, order-2 schedulers), else its `num_inference_steps`. The forward is
    captured lazily on the first call (with the real inputs), or now when
    `example_inputs=(args, kwargs)` is given. Bad input raises
    before anything is touched. `process_group`: the context/sequence-parallel group whose ranks
    each see a shard of the sequence; the diff's sums are all-reduced over it (SPEC §3). None:
    the group of diffusers' own context parallelism when it is enabled on the model, else none.
    `params_modifiers` (pipelines only, cache-dit's name): a different config per transformer,
    `{"transformer_2": {"max_warmup_steps": 2}}` or a list with one entry per transformer in
    pipeline order (None keeps the shared config); a dict changes only the fields it names, a
    config object (or a dict naming another "method") replaces the whole config.
    `split_at_decision`: a step decided on the device (the threshold gates) runs in two graphs
    instead of one with a torch.cond: a head (prologue, Fn, gates, diff; with Bn=0 also a cached
    step's path up to the outputs, run before its decision is known) run before the forward, the
    host's read of its decision (the one sync the cond makes too), then a cond-free tail that
    computes the middle (Bn, epilogue) or finishes the cached step (a copy of the head's outputs):
    inductor runs no CUDA graph for a graph holding a torch.cond, so this is the way to CUDA
    graphs (`mode="reduce-overhead"`) with dynamic decisions. None (the default): split where the
    model's call runs under a torch.compile that records CUDA graphs (`mode="reduce-overhead"` or
    `"max-autotune"`, of `torch.compile(model, ...)` or `model.compile(...)`), the head compiled by
    that same compile; else the torch.cond stays. False: never split. True: split, the head run
    eagerly. A dict `d`: split, the head compiled with `torch.compile(head, fullgraph=True, **d)`
    (`{}` under a default-mode compile: a cached step then passes no weight of the middle to a
    cond). DBCache and TeaCache (DBPrune never splits).
    `cuda_graphs` (experimental): dittofx compiles each of its graphs with inductor and replays
    it from a CUDA graph of its own, captured once per graph, state and input sizes. A step decided
    on the device is one capture: the head, then each tail under a CUDA-graph conditional node
    that reads the decision on the GPU, so the host never waits for it (CUDA >= 12.4 and a torch
    with the bindings: not 2.11); without them, or with `split_at_decision=True`, the host reads it
    between a head replay and a tail replay. No dynamo
    guard check or cudagraph-tree bookkeeping runs per call. Call the model without torch.compile
    (with fullgraph=True torch.compile refuses it, otherwise it compiles nothing). Off CUDA the
    compiled graphs run without capture. Its outputs are copies. DBCache and TeaCache.
    `cache_dit_arguments`: keywords of `cache_dit.enable_cache` that dittofx takes elsewhere (its
    calibrator, parallelism, attention and quantize configs; None passes), cache config fields given
    as keywords (cache-dit's deprecated form) and any other keyword are refused, saying where their
    setting goes.
    """
    _refuse_other_arguments(cache_dit_arguments)
    if is_pipeline(model):
        if example_inputs is not None:
            raise ValueError(
                f"example_inputs: model={type(model).__name__} is a pipeline, whose transformers are captured at their "
                f"first call; to capture now, optimize each transformer with its own inputs (e.g. pipe.transformer)"
            )
        return _optimize_pipeline(model, cache_config, process_group, params_modifiers, split_at_decision, cuda_graphs)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model={type(model).__name__}: must be a torch.nn.Module (a diffusers transformer) or a DiffusionPipeline")
    module = _unwrapped(model)  # what torch.compile returned: its module gets the engine
    if "_dittofx" in module.__dict__:
        raise ValueError(f"model={type(model).__name__}: already optimized; call dittofx.disable(model) first")
    if params_modifiers is not None:
        raise ValueError(f"params_modifiers: model={type(model).__name__} is one transformer; {_ONE_CONFIG_PER_TRANSFORMER}")
    cfg = parse_config({} if cache_config is None else cache_config)
    split = _split_option(split_at_decision, cfg, cuda_graphs)
    group = _group_name(context_parallel_group(module) if process_group is None else process_group)
    _check_cuda_graphs(cuda_graphs, split, cfg, group)
    if example_inputs is not None:
        _check_example_inputs(example_inputs)
    _check_block_lists(module, cfg)
    _warn_if_never_caches(cfg)
    engine = Engine(module, cfg, group, split, cuda_graphs)
    if example_inputs is not None:
        args, kwargs = example_inputs  # captured now (raises before anything is attached), keywords as calls get them
        engine.prepare(args, engine.in_signature_order(kwargs))
    engine.attach()
    _tune_dynamo()
    return model


# cache_dit.enable_cache's keywords -> where dittofx takes their setting
_CACHE_DIT_ARGUMENTS = {
    "calibrator_config": "in dittofx TaylorSeer is part of the cache config: {..., 'enable_taylorseer': True, "
    "'taylorseer_order': k}",
    "parallelism_config": "dittofx sets up no parallelism: enable diffusers' context parallelism on the transformer "
    "(transformer.enable_parallelism(config=ContextParallelConfig(...))) and optimize finds its group, or pass "
    "process_group=",
    "attention_backend": "set it on the transformer with diffusers: transformer.set_attention_backend(name)",
    "quantize_config": "quantize the transformer first (e.g. torchao's quantize_), then optimize it",
}


def _refuse_other_arguments(arguments: dict[str, Any]) -> None:
    """cache_dit.enable_cache's keywords left at their default (None) pass; any other refuses, saying
    where its setting goes (a cache config field, as cache-dit's deprecated keywords: in cache_config)."""
    for name, value in arguments.items():
        if name in _CACHE_DIT_ARGUMENTS and value is None:
            continue
        shown = f"{type(value).__name__}(...)" if is_dataclass(value) else repr(value)[:80]
        if name in _CACHE_DIT_ARGUMENTS:
            why = f"a cache_dit.enable_cache argument; {_CACHE_DIT_ARGUMENTS[name]}"
        elif name in config_field_names():
            why = f"a cache config field: pass it in cache_config, dittofx.optimize(model, {{{name!r}: {shown}, ...}})"
        else:
            allowed = ", ".join(n for n in inspect.signature(optimize).parameters if n not in ("model", "cache_dit_arguments"))
            why = f"no such argument; dittofx.optimize takes {allowed}"
        raise TypeError(f"dittofx.optimize({name}={shown}): {why}")


def _split_option(split_at_decision: Any, cfg: CacheConfig, cuda_graphs: Any) -> str | dict | None:
    """`split_at_decision` as the engine takes it: None (off), EAGER, torch.compile arguments for
    the head, or UNDER_CUDA_GRAPHS (the default, where a split is possible: not DBPrune, nor with
    cuda_graphs, whose graphs dittofx compiles and replays without torch.compile)."""
    if split_at_decision is None:
        return None if isinstance(cfg, DBPruneConfig) or cuda_graphs is True else UNDER_CUDA_GRAPHS
    if split_at_decision is False:
        return None
    if split_at_decision is not True and not isinstance(split_at_decision, Mapping):
        raise TypeError(
            f"split_at_decision={split_at_decision!r}: must be None (split under CUDA graphs), True, False or a dict of "
            "torch.compile arguments for the head"
        )
    if isinstance(cfg, DBPruneConfig):
        raise ValueError(
            "split_at_decision with method='dbprune': DBPrune already reads its decisions on the host "
            "(one copy per step; its per-block torch.conds branch on those host values) and has no head to cut "
            "off; allowed with 'dbcache' and 'teacache'"
        )
    if split_at_decision is True:
        return EAGER
    allowed = sorted(set(inspect.signature(torch.compile).parameters) - {"model"})
    unknown = sorted(set(split_at_decision) - set(allowed))
    if unknown:
        raise ValueError(f"split_at_decision={dict(split_at_decision)!r}: {unknown} are not torch.compile arguments; allowed: {allowed}")
    try:  # backend, mode and options are looked up now, not at the first decided step
        torch.compile(lambda: None, **{"fullgraph": True, **split_at_decision})
    except Exception as err:
        raise ValueError(f"split_at_decision={dict(split_at_decision)!r}: torch.compile refuses it ({type(err).__name__}: {err})") from None
    return dict(split_at_decision)


def _check_cuda_graphs(cuda_graphs: Any, split: str | dict | None, cfg: CacheConfig, group: str | None) -> None:
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"cuda_graphs={cuda_graphs!r}: must be True or False")
    if cuda_graphs and isinstance(split, dict):
        raise ValueError(
            f"cuda_graphs=True with split_at_decision={split!r}: cuda_graphs compiles the head itself, so "
            "torch.compile arguments for it do not apply; give split_at_decision=True (the host reads each decision "
            "between the head's replay and the tail's) or leave it out (the GPU reads it: conditional nodes)"
        )
    if cuda_graphs and group is not None:
        raise ValueError(
            f"cuda_graphs=True with process_group={group!r}: the diff's all-reduce inside a CUDA graph of dittofx's own "
            "is not supported; one process only"
        )
    if cuda_graphs and isinstance(cfg, DBPruneConfig):
        raise ValueError(
            "cuda_graphs=True with method='dbprune': DBPrune's graph branches per block on host values (torch.cond "
            "per block), which no single CUDA graph holds; allowed with 'dbcache' and 'teacache'"
        )


def _check_example_inputs(example_inputs: Any) -> None:
    if not (
        isinstance(example_inputs, tuple) and len(example_inputs) == 2
        and isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], dict)
    ):  # fmt: skip
        if isinstance(example_inputs, tuple):  # name its parts' types (tensors' reprs are long)
            got = f"({', '.join(type(x).__name__ for x in example_inputs)})"
        else:
            got = type(example_inputs).__name__
        raise TypeError(f"example_inputs={got}: must be a tuple (args: tuple, kwargs: dict), e.g. ((), {{'hidden_states': x, ...}})")


def _group_name(group: Any) -> str | None:
    if group is None:
        return None
    if not isinstance(group, torch.distributed.ProcessGroup):
        raise TypeError(f"process_group={group!r}: must be a torch.distributed.ProcessGroup or None")
    return group.group_name


_ONE_CONFIG_PER_TRANSFORMER = (
    "params_modifiers give one config per transformer of a pipeline (e.g. Wan 2.2's transformer_2); "
    "a config per block list inside one transformer (e.g. FLUX's single_transformer_blocks) is not supported"
)


def _optimize_pipeline(
    pipe: Any, cache_config: Any, process_group: Any, params_modifiers: Any, split_at_decision: Any, cuda_graphs: Any
) -> Any:
    if hasattr(type(pipe), "_dittofx_names"):
        raise ValueError(f"pipeline {type(pipe).__name__}: already optimized; call dittofx.disable(pipe) first")
    cfg = parse_config({} if cache_config is None else cache_config)
    names = pipeline_transformers(pipe)
    configs = _component_configs(pipe, names, cfg, params_modifiers)
    engines = {name: _find_engine(getattr(pipe, name)) for name in names}
    if all(engines.values()):  # shared with a pipeline optimized before (from_pipe): its calls refresh them too
        given = cache_config is not None or params_modifiers is not None
        other = [n for n in names if given and configs[n] != engines[n].cfg]
        if other or split_at_decision is not None or cuda_graphs:
            raise ValueError(
                f"pipeline {type(pipe).__name__}.{other[0] if other else names[0]}: already optimized with "
                f"{engines[names[0]].cfg.short_name()} (optimized on its own, or shared with another pipeline, e.g. through "
                f"from_pipe): optimize this "
                f"pipeline with no config (or the same one) and no other options to have its calls set the request length "
                f"too, or dittofx.disable the transformer first"
            )
        attach_refresh(pipe, names, _refresh_component, _in_pipeline_call, _pipeline_call_failed)
        return pipe
    for name in names:
        if engines[name] is not None:
            raise ValueError(f"pipeline {type(pipe).__name__}.{name}: already optimized; call dittofx.disable on it first")
    done = []
    for name in names:
        try:
            optimize(
                getattr(pipe, name), configs[name], process_group=process_group, split_at_decision=split_at_decision, cuda_graphs=cuda_graphs
            )
        except Exception as err:  # never half-applied: the transformers optimized so far are restored
            for other in done:
                disable(getattr(pipe, other))
            if isinstance(err, (ValueError, TypeError)):
                raise type(err)(f"pipeline {type(pipe).__name__}.{name}: {err}") from None
            raise
        done.append(name)
    attach_refresh(pipe, names, _refresh_component, _in_pipeline_call, _pipeline_call_failed)
    return pipe


def _component_configs(pipe: Any, names: list[str], cfg: CacheConfig, params_modifiers: Any) -> dict[str, CacheConfig]:
    """Each pipeline transformer's config: the shared one, as `params_modifiers` changes it."""
    configs = dict.fromkeys(names, cfg)
    if params_modifiers is None:
        return configs
    where = f"pipeline {type(pipe).__name__}"
    if isinstance(params_modifiers, (list, tuple)):  # cache-dit's form: one entry per transformer, in order
        if len(params_modifiers) != len(names):
            raise ValueError(
                f"params_modifiers has {len(params_modifiers)} entries; {where} has {len(names)} transformers "
                f"{names}: one entry each (None keeps the shared config). {_ONE_CONFIG_PER_TRANSFORMER}"
            )
        params_modifiers = {name: m for name, m in zip(names, params_modifiers) if m is not None}
    elif not isinstance(params_modifiers, Mapping):
        raise TypeError(
            f"params_modifiers={params_modifiers!r}: must be a dict {{transformer name: config changes}}, "
            f"a list with one entry per transformer, or None"
        )
    for name, changes in params_modifiers.items():
        if name not in names:
            raise ValueError(f"params_modifiers key {name!r}: not a transformer of {where}; allowed: {names}. {_ONE_CONFIG_PER_TRANSFORMER}")
        try:
            configs[name] = merge_config(cfg, changes)
        except (ValueError, TypeError) as err:
            raise type(err)(f"params_modifiers[{name!r}]: {err}") from None
    return configs


def _refresh_component(module: torch.nn.Module, num_inference_steps: int | None) -> None:
    """Per pipeline call: a transformer that runs no step this time (e.g. a short request that
    never reaches the low-noise expert) only forgets its state. One no longer optimized (disabled
    on its own, or another module put in the pipeline) runs as it is: said once."""
    engine = _find_engine(module)  # also through the module torch.compile put in the pipeline
    if engine is None:
        if module not in _said_uncached:
            _said_uncached.add(module)
            log.warning(
                "dittofx: the pipeline's %s is not optimized (disabled, or put in after dittofx.optimize): it runs "
                "uncached; dittofx.disable(pipe), then dittofx.optimize(pipe, ...) to cache it", type(_unwrapped(module)).__name__
            )
        return
    if num_inference_steps == 0:
        reset(module)
        engine.length_from_pipeline = True
    else:
        engine.refresh(_request_length(num_inference_steps), from_pipeline=True)


_said_uncached: weakref.WeakSet = weakref.WeakSet()


def _in_pipeline_call(module: torch.nn.Module, pipeline: str | None) -> bool:
    engine = _find_engine(module)
    if engine is not None:
        engine.pipeline_call = pipeline
    return engine is not None


def _pipeline_call_failed(pipe: Any, optimized: list[str]) -> None:
    """A transformer whose first call failed in dittofx (its config refused: `non_prune_block_ids`
    past its chain) restored itself: the pipeline is restored whole, never left half cached. (The
    model's own error on bad inputs leaves every transformer optimized: Engine._pre_hook.)"""
    lost = [name for name in optimized if _find_engine(getattr(pipe, name)) is None]
    if lost and hasattr(type(pipe), "_dittofx_names"):
        disable(pipe)
        log.warning(
            "dittofx: pipeline %s: %s failed at its first call and was restored; so is the whole pipeline "
            "(dittofx.disable(pipe)) rather than run half cached", type(pipe).__name__, ", ".join(lost),
        )


def _check_block_lists(module: torch.nn.Module, cfg: CacheConfig) -> None:
    """What can be told of the block chain before a capture: it is made of ModuleLists (the named
    ones, if `blocks` names them), so it has no more blocks than they hold. The rest is checked
    in the captured graph, at the first call (or at once with `example_inputs`)."""
    lists = module_lists(module)
    if not lists:
        raise ValueError(
            f"no transformer block chain found in {type(module).__name__}: it has no nn.ModuleList (the chain is the "
            f"children of one or more nn.ModuleLists run one after another in index order)"
        )
    # lists inside another list's blocks (an attention's to_out, a feed-forward's net) are no chain
    # of their own here: counted, FLUX's 57 blocks would bound Fn + Bn by ~170 (a list that is
    # itself a list's element, `stages.0`, is kept: the chain may be made of those)
    outer = {name: n for name, n in lists.items() if not any(_inside_a_block(module, other, name) for other in lists)}
    if cfg.blocks is not None:
        missing = [b for b in cfg.blocks if b not in lists]
        if missing:
            raise ValueError(f"blocks={list(cfg.blocks)!r}: {missing} not found as non-empty ModuleLists; ModuleLists: {sorted(outer)}")
        outer = {b: lists[b] for b in cfg.blocks}
    lists = outer
    if cfg.Fn_compute_blocks + cfg.Bn_compute_blocks > sum(lists.values()):
        raise ValueError(fn_bn_too_large(cfg.Fn_compute_blocks, cfg.Bn_compute_blocks, sum(lists.values()), sorted(lists), upper_bound=True))


def _inside_a_block(module: torch.nn.Module, block_list: str, name: str) -> bool:
    """Whether the module `name` sits inside one of `block_list`'s elements, that element being no
    ModuleList itself."""
    if not name.startswith(block_list + "."):
        return False
    element = name[len(block_list) + 1 :].split(".", 1)[0]
    return not isinstance(module.get_submodule(f"{block_list}.{element}"), torch.nn.ModuleList)


def _warn_if_never_caches(cfg: CacheConfig) -> None:
    reasons = []
    if isinstance(cfg, TeaCacheConfig):
        if cfg.num_inference_steps is not None and cfg.num_inference_steps <= 2:
            reasons.append(f"num_inference_steps={cfg.num_inference_steps}: the first and last steps always compute")
        if reasons:
            log.warning("dittofx: this config can never cache a step: %s", "; ".join(reasons))
        return
    if isinstance(cfg, DBPruneConfig):
        if cfg.residual_diff_threshold == 0:
            log.warning("dittofx: this config can never prune a block: residual_diff_threshold=0 (no diff is ever < 0)")
        return
    if not (cfg.has_mask and cfg.steps_computation_policy == "static"):  # a static mask's 0s cache whatever
        if cfg.residual_diff_threshold == 0:  # the diff-based gates say (SPEC §3: gate 3 decides first)
            reasons.append("residual_diff_threshold=0 (no diff is ever < 0)")
        if cfg.max_cached_steps == 0 or cfg.max_continuous_cached_steps == 0:
            reasons.append("max_cached_steps or max_continuous_cached_steps is 0")
        if cfg.max_accumulated_residual_diff_threshold == 0:
            reasons.append("max_accumulated_residual_diff_threshold=0 (a step caches only if its diff is exactly 0; None turns that gate off)")
    mask, steps = cfg.steps_computation_mask, cfg.num_inference_steps
    if mask is not None and steps is not None and len(mask) >= steps and all(mask[:steps]):
        reasons.append(f"steps_computation_mask has no 0 in its first num_inference_steps={steps} steps")
    if cfg.num_inference_steps is not None and cfg.max_warmup_steps >= cfg.num_inference_steps and cfg.warmup_interval == 1:
        reasons.append(f"max_warmup_steps={cfg.max_warmup_steps} >= num_inference_steps={cfg.num_inference_steps}")
    if reasons:
        log.warning("dittofx: this config can never cache a step: %s", "; ".join(reasons))


def refresh(model: torch.nn.Module | DiffusionPipeline, num_inference_steps: int | None = None) -> None:
    """Set the request length (None: detect new requests from the timestep) and reset state."""
    steps = _request_length(num_inference_steps)
    for _, module in _modules(model):
        _engine(module).refresh(steps)


def _request_length(num_inference_steps: Any) -> int | None:
    if num_inference_steps is not None and (as_count(num_inference_steps) or 0) < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps!r}: must be an int >= 1 or None")
    return as_count(num_inference_steps)


def reset(model: torch.nn.Module | DiffusionPipeline) -> None:
    """Forget all cached state (a new request of the same length)."""
    for _, module in _modules(model):
        engine = _engine(module)
        engine.start_request()
        for state in engine.states.values():
            state.reset()


def disable(model: torch.nn.Module | DiffusionPipeline) -> torch.nn.Module | DiffusionPipeline:
    """Restore the original forward exactly (and drop all cache state). Returns the pipeline, or
    the module: for what torch.compile returned, the module inside it (the wrapper, still compiled,
    runs the restored module)."""
    if hasattr(type(model), "_dittofx_names"):  # a pipeline: its transformers still optimized, then its calls
        for name in type(model)._dittofx_names:
            engine = _find_engine(getattr(model, name, None))
            if engine is not None:
                engine.detach()
        detach_refresh(model)
        return model
    _engine(model).detach()
    return _unwrapped(model)


@dataclass
class CacheStats:
    """One cached region and CFG branch in the latest request (SPEC §8); steps count from 0."""

    name: str
    branch: str
    config: str
    cached_steps: list[int]
    computed_steps: list[int]
    diffs: list[float]  # per step, NaN where not measured (DBPrune: the largest over its blocks)
    pruned_blocks: list[int] | None = None  # DBPrune: blocks pruned per step (cached_steps: steps with any)


class Summary(list):
    """What `summary` returns: a list of CacheStats, printed as the table it logs."""

    def __str__(self) -> str:
        return _table(self)


def summary(model: torch.nn.Module | DiffusionPipeline, log_table: bool = True) -> list[CacheStats]:
    """Stats of the latest request, one entry per cached region and CFG branch (and, for a
    pipeline, per transformer: names like `transformer_2:blocks`); `print` shows the table."""
    stats = Summary()
    for component, module in _modules(model):
        stats += _stats(_engine(module), f"{component}:" if component else "")
    if log_table:
        log.info("%s", _table(stats))
    return stats


def _stats(engine: Engine, prefix: str) -> list[CacheStats]:
    lists = engine.blockwise.chain.lists if engine.blockwise else engine.entries[-1].chain.lists if engine.entries else ["chain"]
    name = prefix + "+".join(lists)
    stats = []
    for branch, state in engine.states.items():
        flags = state.hist_cached.tolist()
        diffs = state.hist_diff.tolist()
        ran = [i for i, f in enumerate(flags) if f >= 0]
        stats.append(
            CacheStats(
                name=name,
                branch=branch,
                config=engine.cfg.short_name(),
                cached_steps=[i for i in ran if flags[i] > 0],
                computed_steps=[i for i in ran if flags[i] == 0],
                diffs=[diffs[i] for i in ran],
                pruned_blocks=[flags[i] for i in ran] if engine.prune else None,
            )
        )
    return stats


def _percentiles(values: list[float]) -> str:
    finite = sorted(v for v in values if not math.isnan(v))
    if not finite:
        return "no diffs measured"
    pick = lambda q: finite[min(len(finite) - 1, int(q * (len(finite) - 1) + 0.5))]  # noqa: E731
    return "  ".join(f"P{int(q * 100)}={pick(q):.4f}" for q in (0.0, 0.25, 0.5, 0.75, 0.95, 1.0))


def _table(stats: list[CacheStats]) -> str:
    lines = ["dittofx summary" + ("" if stats else ": no step has run yet")]
    for s in stats:
        lines.append(
            f"  {s.name} [{s.branch}] {s.config}: cached {len(s.cached_steps)}/{len(s.cached_steps) + len(s.computed_steps)} "
            f"steps {s.cached_steps}; diffs {_percentiles(s.diffs)}"
        )
    return "\n".join(lines)


def explain(model: torch.nn.Module | DiffusionPipeline) -> str:
    """Human-readable account of what the passes found and decided."""
    return "\n".join(_explain(_engine(module), component) for component, module in _modules(model))


def _explain(engine: Engine, component: str) -> str:
    cfg = engine.cfg
    where = f" ({component})" if component else ""
    lines = [f"dittofx: {type(engine.model).__name__}{where}, {cfg.short_name()}, path: {engine.path}"]
    if engine.blockwise is not None:
        lines += _explain_blockwise(engine.blockwise)
    elif not engine.entries:
        lines.append("  not captured yet: the graph is captured on the first call")
    for i, entry in enumerate(engine.entries):
        part, chain = entry.partition, entry.chain
        n = len(chain)
        names = [node.name for node in entry.captured.user_placeholders()]
        symbolic = ", ".join(f"{names[j]}{list(dims) if dims else ''}" for j, dims in entry.captured.dynamic_dims.items())
        lines.append(f"graph {i}: {len(entry.captured.gm.graph.nodes)} nodes, symbolic inputs (dims, or int value): {symbolic or 'none'}")
        lines.append(f"  block lists seen: {chain.candidates}; chain: {' -> '.join(chain.lists)} ({n} blocks)")
        first_mid, last_mid = chain.blocks[part.fn_blocks].path if part.fn_blocks < n else "-", (
            chain.blocks[n - part.bn_blocks - 1].path if n - part.bn_blocks - 1 >= part.fn_blocks else "-"
        )
        lines.append(
            f"  Fn = {part.fn_blocks} blocks"
            + (f" ({chain.blocks[0].path}..{chain.blocks[part.fn_blocks - 1].path})" if part.fn_blocks else "")
            + ", "
            f"middle = {n - part.fn_blocks - part.bn_blocks} blocks ({first_mid}..{last_mid}), Bn = {part.bn_blocks} blocks"
        )
        lines.append("  nodes per region: " + ", ".join(f"{r}={c}" for r, c in entry.region_counts.items()))
        if engine.teacache:
            stack = list(part.h_fn.meta.get("nn_module_stack", {}).values())
            where = f" in {stack[-1][0]}" if stack else ""
            lines.append(f"  TeaCache signal: block 0's modulated input {part.h_fn.name}{where} {_shape(part.h_fn)}")
        elif engine.prune:
            lines.append(f"  decisions on the middle's input {part.h_fn.name} {_shape(part.h_fn)}; prunable blocks: {entry.pruned_blocks}")
        else:
            lines.append(f"  residual diff on: {part.h_fn.name} - {part.h0.name} {_shape(part.h_fn)}")
        carried = ", ".join(f"{o.name} <- {part.base[o].name} {_shape(o)}" for o in part.middle_outputs)
        lines.append(f"  carried through the middle (out <- base it is cached as base + residual): {carried}")
        if part.glue:
            lines.append(f"  code between middle blocks kept on cached steps: {[n.name for n in part.glue]}")
        lines.append(f"  carried into the middle: {[i.name for i in part.carried_inputs]}")
        weights = set(entry.captured.weight_placeholders())
        invariant = [i.name for i in part.middle_inputs if i not in part.carried_inputs and i not in weights]
        lines.append(f"  loop-invariant inputs of the middle (besides weights): {invariant}")
        if part.hoisted:
            lines.append(f"  moved to the prologue: {[h.name for h in part.hoisted]}")
    for branch, state in engine.states.items():
        lines.append(f"state [{branch}]: {state.bytes() / 2**20:.2f} MiB")
    return "\n".join(lines)


def _explain_blockwise(blockwise) -> list[str]:
    chain, lo, hi = blockwise.chain, blockwise.lo, blockwise.hi
    middle = f"{chain.paths[lo]}..{chain.paths[hi]}" if lo <= hi else "-"
    fn = f" ({chain.paths[0]}..{chain.paths[lo - 1]})" if lo else ""
    if blockwise.engine.teacache:
        found = "; ".join(f"torch call {i} ({name!r})" for i, name in blockwise.signal_calls.values()) or "not found yet (no call)"
        signal = f"  TeaCache signal: {chain.paths[0]}'s modulated input of the largest stream entering it, per input sizes: {found}"
    else:
        signal = (
            f"  residual diff on: the largest stream entering {chain.paths[0]} (first call: {chain.hidden!r}) as {chain.paths[lo - 1]} "
            "returns it, minus as it entered"
        )
    return [
        f"  block lists seen: {chain.candidates}; chain: {' -> '.join(chain.lists)} ({len(chain)} blocks)",
        f"  Fn = {lo} blocks{fn}, middle = {max(hi - lo + 1, 0)} blocks ({middle}), Bn = {len(chain) - max(hi, lo - 1) - 1} blocks",
        signal,
        f"  carried through the middle (cached as what reaches its last block + residual): {blockwise.carried}",
        *(["  code between middle blocks changes the streams: kept on cached steps (skeleton pass on computed ones)"] if blockwise.glue else []),
        "  block outputs -> the arguments they update: "
        + "; ".join(f"{p}: {list(s)}" for p, s in zip(chain.paths, chain.streams)),
    ]


def _shape(node) -> str:
    val = node.meta.get("val")
    return f"{tuple(val.shape)} {val.dtype}" if isinstance(val, torch.Tensor) else ""


def export(
    model: torch.nn.Module,
    example_inputs: tuple[tuple, dict],
    path: str | os.PathLike | io.IOBase | None = None,
    inductor_configs: dict[str, Any] | None = None,
) -> torch.export.ExportedProgram:
    """The optimized `model` as a `torch.export` program, and an AOTInductor package at `path`.

    The program runs the step caching inside (gates, diff, torch.cond, its cache state as buffers
    mutated in place) on plain aten ops, so the package loads with
    `torch._inductor.aoti_load_package(path)` where dittofx is not installed. It holds one state (one
    CFG branch: export one per branch), is specialized to the shapes of `example_inputs=(args,
    kwargs)`, returns the tuple of the model's output tensors, and starts a new request by itself
    every `num_inference_steps` calls (which the config must set). `path=None`: no package;
    `inductor_configs` go to its compile, with `dittofx.aoti_configs()` (which a package of the
    program needs: compile the returned program yourself only with them).
    Returns the program (its `.module()` runs it eagerly on the program's own state buffers: run a
    `copy.deepcopy(ep).module()` to try it, or a package compiled or saved after starts mid-request).
    """
    if is_pipeline(model):
        raise ValueError(f"model={type(model).__name__}: export one transformer of the pipeline (e.g. pipe.transformer), not the pipeline")
    engine = _engine(model)
    _check_example_inputs(example_inputs)
    _check_package_path(path)
    mask = engine.mask() if engine.num_steps is not None else None
    if mask is not None and len(mask) > HISTORY:  # the Python path decides mask steps on the host; a program cannot
        raise ValueError(
            f"num_inference_steps={engine.num_steps} with a steps computation mask: an exported program reads its mask "
            f"from a buffer of {HISTORY} steps; export requests of at most {HISTORY} steps"
        )
    if inductor_configs is not None and not isinstance(inductor_configs, dict):
        raise TypeError(f"inductor_configs={inductor_configs!r}: must be a dict of inductor settings or None")
    return export_program(engine, example_inputs, path, inductor_configs)


def _check_package_path(path: Any) -> None:
    """Said before the (long) capture and export, in the words of what is allowed."""
    if path is None or (isinstance(path, io.IOBase) and not isinstance(path, io.TextIOBase) and path.writable() and path.seekable()):
        return
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path={path!r}: must be a file path ending in .pt2, a writable seekable binary buffer, or None")
    name = os.fspath(path)
    if not str(name).endswith(".pt2"):
        raise ValueError(f"path={name!r}: an AOTInductor package's path must end in .pt2")
    folder = os.path.dirname(os.path.abspath(name))
    if not os.path.isdir(folder):
        raise ValueError(f"path={name!r}: its folder {folder!r} does not exist")
    if os.path.isdir(name):
        raise ValueError(f"path={name!r}: is a folder; a package is one file (an existing file is written over)")
