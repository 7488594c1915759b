"""End-to-end 28-step denoising loop: compiled baseline, the ideal for the schedule, cache-dit, dittofx.

The ideal for a schedule (issue 7) = computed steps x a full compiled step + cached steps x a
compiled step of only prologue + Fn + Bn + epilogue (the same architecture built with Fn + Bn
blocks; FLUX with F1B0: one double block, no single block). Rows, per cache config (cache-dit's
static "fast" and "ultra" masks; a dynamic threshold, vLLM-omni's default F1B0 W4 MC3 R0.24) and
per torch.compile mode: cache-dit eager, cache-dit with its regional compile (diffusers'
`compile_repeated_blocks`, where the model class has repeated blocks), cache-dit with full-model
torch.compile, dittofx + torch.compile(fullgraph=True). Columns: request time; speed vs ideal
(ideal s / row s); speed vs cache-dit (fastest cache-dit row of the config, s / row s: > 1 is
ahead); cached-step cost (the row's median cached step / the ideal's cached step) and
computed-step cost (/ the baseline's step); graph breaks and frames compiled while warming up;
recompiles after warm-up; peak memory above what was allocated before the request (CUDA only);
cache-state bytes. Every dittofx row's output is checked against the same config run eagerly, and
the compiled baseline's against the eager baseline's (the drift compiling alone brings). A
cache row that raises (cache-dit under CUDA graphs did) is recorded with its error and left out.

All rows hold their own module objects over one seeded weight set (FLUX.1-dev is 24 GB in bf16:
one copy per row would not fit), so every row is built and warmed up (one request) first; then the
rows are timed in interleaved rounds, one request per row per round, so that load changes on a
shared machine fall on all rows alike. Times are medians over the rounds, per step (CUDA events,
or time.perf_counter on CPU); a request is the sum of its steps' medians. On CPU the compiled rows
use inductor's C++ backend and there are no CUDA-graph rows; the figures are ratios measured on a
shared machine, not speed claims.

    python bench/e2e.py --device cuda --out bench/results/e2e.json          # PixArt-alpha-512 shape
    python bench/e2e.py --model flux-1024 --only static --modes default --repeats 3 --out ...
    python bench/e2e.py --device cpu     # small Wan for 2 cores -> bench/results/e2e_cpu_<date>.{json,md}
    python bench/e2e.py --device cpu --smoke                        # tiny PixArt: every row runs
    python bench/e2e.py --device cpu --smoke --model flux-tiny      # tiny FLUX: every row runs

bench/gpu_session.sh splits the GPU runs into device calls of under 10 minutes.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, bench/ is on sys.path and bench/kernels.py would pass for the `kernels` package
# that diffusers probes for at import: the repository root (this checkout's dittofx) takes its place
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH.parent) if Path(p or ".").resolve() == _BENCH else p for p in sys.path]

import argparse
import copy
import functools
import itertools
import json
import os
import platform
import signal
import statistics
import time
import traceback
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import cache_dit
import diffusers
import torch
from cache_dit.caching.patch_functors import FluxPatchFunctor
from torch._dynamo.utils import counters
from torch.utils._pytree import tree_map

import dittofx
from dittofx.runtime.engine import with_own_code

STEPS = 28
FN, BN = 1, 0  # blocks computed at every step, first and last: the F1B0 of every row
RESULTS = _BENCH / "results"
OTHERS_TOLERATED = 0.2  # cores other processes may keep busy, on average, before a run's table says it was perturbed


@dataclass(frozen=True)
class Spec:
    """A transformer shape to benchmark, its call inputs and how cache-dit adapts it."""

    cls: str  # diffusers class
    config: dict
    latent: tuple[int, ...]  # hidden_states (batch 1): the Euler loop's state
    conditioning: Callable[[torch.Generator], dict]  # the call's other inputs, timestep aside (CPU, fp32)
    cachedit_blocks: Callable[[torch.nn.Module], dict]  # cache-dit BlockAdapter fields: blocks and forward pattern
    fn_bn_layers: dict  # config fields that leave only the Fn + Bn blocks (the ideal's cached step)
    timestep_scale: float = 1000.0  # timestep at the start of the request (FLUX scales it by 1000 itself)

    def build(self, device: str, dtype: torch.dtype, **layers: int) -> torch.nn.Module:
        """Random weights, seeded, initialized on `device` in `dtype` (FLUX.1-dev: 24 GB of bf16
        never passes through 48 GB of fp32 on the host)."""
        torch.manual_seed(0)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = getattr(diffusers, self.cls)(**dict(self.config, **layers))
        finally:
            torch.set_default_dtype(default_dtype)
        return model.to(device, dtype).eval()  # fp32 buffers (PixArt's pos_embed) too, as a bf16 load casts them

    def request_inputs(self, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
        """A request's starting latents and its other call inputs, seeded, on `device` in `dtype`."""
        g = torch.Generator().manual_seed(1)
        latents = torch.randn(*self.latent, generator=g).to(device, dtype)
        return latents, tree_map(lambda t: t.to(device, dtype) if isinstance(t, torch.Tensor) else t, self.conditioning(g))


def _on_cpu(model: torch.nn.Module) -> bool:
    return next(model.parameters()).device.type == "cpu"


def sharing_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A new module object (its own forward, attributes and submodules for a library to patch or
    compile) over `model`'s parameter and buffer tensors: all rows of a run hold one weight set."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return copy.deepcopy(model, {id(t): t for t in tensors})


def compiled_alone(model: torch.nn.Module, **how: Any) -> torch.nn.Module:
    """`torch.compile(model, **how)` with `model.forward` running a code object of its own (the
    outer frame only: frames that graph breaks open inside, as in cache-dit's rows, stay shared).
    On the H100 (2026-11-23) the baseline and Fn+Bn rows, which shared their class's forward with
    other rows, took 0.3-3.4 ms more host time per step than in a process of their own
    (bench/step_overhead.py); on CPU a tiny PixArt's compiled call went from 1.04 to 1.30 ms
    beside a cache-dit and a dittofx row, and stays at 1.04 ms with this. The cause was not established (dynamo's cache entries are
    checked most recently used first, so it is not a walk over the other rows' guards per call)."""
    bound = model.forward  # a method, or cache-dit's functools.partial of its patched forward
    if isinstance(bound, types.MethodType):
        model.forward = types.MethodType(with_own_code(bound.__func__), bound.__self__)
    elif isinstance(bound, functools.partial) and isinstance(bound.func, types.FunctionType):
        model.forward = functools.update_wrapper(functools.partial(with_own_code(bound.func), *bound.args, **bound.keywords), bound)
    else:
        raise TypeError(f"{type(model).__name__}.forward is a {type(bound).__name__}: compiled_alone takes a method or a functools.partial")
    return torch.compile(model, **how)


def text_inputs(tokens: int, channels: int, **constants: Any) -> Callable[[torch.Generator], dict]:
    return lambda g: {"encoder_hidden_states": torch.randn(1, tokens, channels, generator=g), **constants}


def flux_inputs(side: int, text_tokens: int, config: dict) -> Callable[[torch.Generator], dict]:
    """FluxPipeline's transformer inputs for a side x side grid of packed latent tokens."""

    def make(g: torch.Generator) -> dict:
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
        return {
            "encoder_hidden_states": torch.randn(1, text_tokens, config["joint_attention_dim"], generator=g),
            "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=g),
            "img_ids": img_ids, "txt_ids": torch.zeros(text_tokens, 3), "guidance": torch.full((1,), 3.5),
        }  # fmt: skip

    return make


def one_block_list(name: str, pattern: str) -> Callable[[torch.nn.Module], dict]:
    return lambda model: {"blocks": model.get_submodule(name), "forward_pattern": getattr(cache_dit.ForwardPattern, pattern)}


def flux_block_chain(model: torch.nn.Module) -> dict:
    """cache-dit 1.5.3's own FLUX adapter in its default form (caching/block_adapters/adapters.py,
    CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS=1): the double then the single blocks as one chain in one
    context, Pattern_1 (the single blocks take and return the text stream too), as dittofx chains
    them. Its other form, two lists, gives each list its own context and its own F1B0, so a cached
    step would compute a double and a single block: not the ideal below."""
    return {
        "blocks": model.transformer_blocks + model.single_transformer_blocks, "blocks_name": "transformer_blocks",
        "dummy_blocks_names": ["single_transformer_blocks"], "patch_functor": FluxPatchFunctor(),
        "forward_pattern": cache_dit.ForwardPattern.Pattern_1,
    }  # fmt: skip


# PixArt-alpha 512 (0.6 B): 28 blocks, 16 heads x 72, 64x64 latents -> 1024 tokens, 120 text tokens
PIXART = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    sample_size=64, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
)  # fmt: skip
PIXART_TINY = dict(PIXART, num_attention_heads=2, attention_head_dim=16, num_layers=6, sample_size=16, cross_attention_dim=32, caption_channels=32)
PIXART_COND = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
# Wan 2.1 layout at a size where 2 CPU cores spend their time in the blocks, not in Python:
# 12 blocks, 3 heads x 64, 24x24 latents -> 144 tokens, 64 text tokens
WAN_CPU = dict(
    patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=64, in_channels=16, out_channels=16,
    text_dim=256, freq_dim=256, ffn_dim=768, num_layers=12, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
)  # fmt: skip
# FLUX.1-dev (12 B): 19 double + 38 single blocks, 24 heads x 128; packed 2x2 latents: 64x64 tokens
# at 1024^2, 32x32 at 512^2; 512 T5 text tokens (4096 channels), CLIP pooled projection (768), guidance
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
FLUX_TINY = dict(FLUX_DEV, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))  # fmt: skip
ONE_LIST_FN_BN = {"num_layers": FN + BN}
FLUX_FN_BN = {"num_layers": FN, "num_single_layers": BN}  # Fn double blocks first, Bn single blocks last


def flux(config: dict, side: int, text_tokens: int) -> Spec:
    return Spec("FluxTransformer2DModel", config, (1, side * side, config["in_channels"]), flux_inputs(side, text_tokens, config),
                flux_block_chain, FLUX_FN_BN, timestep_scale=1.0)  # fmt: skip


SPECS = {
    "pixart": Spec("PixArtTransformer2DModel", PIXART, (1, 4, 64, 64), text_inputs(120, 4096, **PIXART_COND),
                   one_block_list("transformer_blocks", "Pattern_3"), ONE_LIST_FN_BN),
    "pixart-tiny": Spec("PixArtTransformer2DModel", PIXART_TINY, (1, 4, 16, 16), text_inputs(120, 32, **PIXART_COND),
                        one_block_list("transformer_blocks", "Pattern_3"), ONE_LIST_FN_BN),
    "wan-cpu": Spec("WanTransformer3DModel", WAN_CPU, (1, 16, 1, 24, 24), text_inputs(64, 256),
                    one_block_list("blocks", "Pattern_2"), ONE_LIST_FN_BN),
    "flux-1024": flux(FLUX_DEV, 64, 512),
    "flux-512": flux(FLUX_DEV, 32, 512),
    "flux-tiny": flux(FLUX_TINY, 8, 32),
}  # fmt: skip


def static_mask(policy: str) -> tuple[dict, dict]:
    """cache-dit's preset steps mask: compute the 1 steps, cache the 0 steps without measuring a diff."""
    return (
        {"residual_diff_threshold": 1e9, "max_warmup_steps": 0, "scm_steps_mask_policy": policy, "scm_steps_policy": "static"},
        {"residual_diff_threshold": 0.24, "max_warmup_steps": 0, "steps_computation_policy": "static",
         "steps_computation_mask": cache_dit.steps_mask(mask_policy=policy, total_steps=STEPS)},
    )  # fmt: skip


# name -> (dittofx config, cache-dit DBCacheConfig fields): the same schedule rules on both sides
CONFIGS = {
    "static fast": static_mask("fast"),
    "static ultra": static_mask("ultra"),
    "dynamic F1B0 W4 MC3 R0.24": (
        {"residual_diff_threshold": 0.24, "max_warmup_steps": 4, "max_continuous_cached_steps": 3},
        {"residual_diff_threshold": 0.24, "max_warmup_steps": 4, "max_continuous_cached_steps": 3},
    ),
}  # fmt: skip


class Clock:
    """Marks between steps: CUDA events, or time.perf_counter on CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, marks: list) -> list[float]:
        if not self.cuda:
            return [b - a for a, b in zip(marks, marks[1:])]
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]


@dataclass
class Row:
    name: str
    config: str | None  # cache config name; None for baseline / Fn+Bn only
    mode: str | None  # torch.compile mode; None: eager
    kind: str  # "baseline", "chain", "cache-dit", "dittofx"
    model: Callable | None
    cached_steps: Callable[[], list[int]] = lambda: []
    state_bytes: Callable[[], int] = lambda: 0
    before_request: Callable[[], None] = lambda: None
    eager: Callable | None = None  # the module before torch.compile (dittofx and baseline rows): the output's reference
    steps: list[list[float]] = field(default_factory=list)  # per timed request, seconds per step
    schedule: list[int] = field(default_factory=list)  # the steps its last finished request cached
    stats: dict = field(default_factory=dict)
    error: str | None = None  # the exception that stopped the row: it is left out of the timing

    def step_medians(self) -> list[float]:
        return [statistics.median(s) for s in zip(*self.steps)]

    def seconds(self) -> float:
        """A request: the sum of its steps' medians (a load spike in one round moves one step's
        sample, not a whole request's)."""
        return sum(self.step_medians())


def denoise(model: Callable, spec: Spec, latents: torch.Tensor, inputs: dict, clock: Clock) -> tuple[torch.Tensor, list[float]]:
    """A 28-step Euler loop (the scheduler's math is negligible next to the transformer)."""
    x = latents
    marks = [clock.mark()]
    for i in range(STEPS):
        t = torch.full((1,), spec.timestep_scale * (1 - i / STEPS), device=x.device, dtype=x.dtype)
        v = model(hidden_states=x, timestep=t, return_dict=False, **inputs)[0]
        x = x - v[:, : x.shape[1]] / STEPS  # PixArt also predicts variance channels: the latent's only
        marks.append(clock.mark())
    return x, clock.seconds(marks)


def _compile_stats() -> tuple[int, int]:
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _cachedit_context(model: torch.nn.Module):
    model = getattr(model, "_orig_mod", model)
    (name,) = model._context_names  # one block chain -> one cache-dit context (FLUX too: flux_block_chain)
    return model._context_manager.get_context(name)


CACHEDIT_WAYS = ("regional", "compile")


def _cachedit_row(spec: Spec, weights: torch.nn.Module, cname: str, how: str, mode: str | None) -> Row | None:
    """cache-dit on a bare transformer, as tests/test_cachedit_differential.py drives it; `how`:
    "eager", "regional" (compile_repeated_blocks, after enable_cache as cache-dit's own tools do)
    or "compile" (torch.compile of the whole cached transformer)."""
    model = sharing_weights(weights)
    if how == "regional" and not getattr(model, "_repeated_blocks", None):
        return None
    fields = dict(CONFIGS[cname][1], Fn_compute_blocks=FN, Bn_compute_blocks=BN, num_inference_steps=STEPS, enable_separate_cfg=False)
    adapter = cache_dit.BlockAdapter(transformer=model, check_forward_pattern=False, **spec.cachedit_blocks(model))
    cache_dit.enable_cache(adapter, cache_config=cache_dit.DBCacheConfig(**fields))
    run = model
    if how == "regional":
        model.compile_repeated_blocks(mode=mode)
    elif how == "compile":
        run = compiled_alone(model, mode=mode)
    buffers = lambda: sum(b.numel() * b.element_size() for b in _cachedit_context(model).buffers.values() if isinstance(b, torch.Tensor))  # noqa: E731
    return Row(
        f"cache-dit {how} {cname}" + (f" ({mode})" if mode else ""), cname, mode, "cache-dit", run,
        cached_steps=lambda: sorted(int(s) for s in _cachedit_context(model).get_cached_steps()),
        state_bytes=buffers,
        # cache-dit's own refresh of a bare transformer's context is one call late (see
        # tests/test_cachedit_differential.py): refresh before each request, as vLLM-omni does
        before_request=lambda: cache_dit.refresh_context(model, num_inference_steps=STEPS),
    )  # fmt: skip


# Dynamic decisions under CUDA graphs (issue 7 item 3). Inductor's CUDA graphs skip a graph holding
# a torch.cond (its cond reads the predicate on the host), so the dynamic graph runs without them
# under mode="reduce-overhead": since split_at_decision's default, the plain reduce-overhead row
# runs split (its head compiled by the model's compile) and split_at_decision=False keeps the cond.
# Other ways, timed against the reduce-overhead ideal, as (dittofx.optimize arguments,
# torch.compile arguments):
# - split_at_decision: the head (prologue, Fn, gates, diff, a cached step's path) runs before the
#   forward, the host reads its decision, the forward runs a cond-free tail: CUDA graphs hold every graph; the head
#   compiled with reduce-overhead too, or eager;
# - dynamo's "cudagraphs" backend (no inductor), with the cond: cudagraph trees record it as CUDA-graph
#   conditional nodes, so nothing syncs, but the kernels are eager ones, unfused;
# - inductor's graph partitions, with the cond: the parts around it are CUDA-graphed, the cond itself (the
#   middle blocks, on computed steps) runs outside them after a host read of the predicate;
# - cuda_graphs=True: dittofx compiles its graphs and replays them from CUDA graphs of its own, with
#   no dynamo frame or cudagraph tree per call (no torch.compile: None); a step decided on the device
#   is one graph, its tails under conditional nodes (no host read), or with split_at_decision=True a
#   head replay, the host's read, a tail replay.
CUDAGRAPH_VARIANTS: dict[str, tuple[dict, dict | None]] = {
    "split_at_decision, head reduce-overhead": ({"split_at_decision": {"mode": "reduce-overhead"}}, {"mode": "reduce-overhead"}),
    "split_at_decision, head eager": ({"split_at_decision": True}, {"mode": "reduce-overhead"}),
    "split_at_decision=False (the torch.cond graph)": ({"split_at_decision": False}, {"mode": "reduce-overhead"}),
    "backend=cudagraphs": ({"split_at_decision": False}, {"backend": "cudagraphs"}),
    "graph_partition": ({"split_at_decision": False}, {"options": {"triton.cudagraphs": True, "graph_partition": True}}),
    "cuda_graphs=True, no torch.compile": ({"cuda_graphs": True}, None),
    "cuda_graphs=True split_at_decision=True, no torch.compile": ({"cuda_graphs": True, "split_at_decision": True}, None),
}
# The same cut under the other modes (e.g. "default" on CPU, where reading the decision on the host
# costs nothing): the cache tail takes no middle weight, the device graph takes all of them.
NO_CUDAGRAPH_VARIANTS = {
    "split_at_decision, head compiled alike": ({"split_at_decision": {}}, {}),
    "split_at_decision, head eager": ({"split_at_decision": True}, {}),
}


def variants_for(mode: str, cpu: bool) -> dict[str, tuple[dict, dict | None]]:
    """The variants a dynamic config also runs under `mode`: (dittofx.optimize arguments,
    torch.compile arguments, the mode included; None: not compiled). The other modes' only on CPU: on the GPU the
    question is CUDA graphs (and the device calls' time is counted)."""
    if mode == "reduce-overhead":
        return CUDAGRAPH_VARIANTS
    return {name: (options, {"mode": mode, **how}) for name, (options, how) in NO_CUDAGRAPH_VARIANTS.items()} if cpu else {}


def _dittofx_row(weights: torch.nn.Module, cname: str, mode: str, variant: str | None = None) -> Row:
    cfg = dict(CONFIGS[cname][0], Fn_compute_blocks=FN, Bn_compute_blocks=BN, num_inference_steps=STEPS)
    options, how = variants_for(mode, _on_cpu(weights))[variant] if variant else ({}, {"mode": mode})
    model = dittofx.optimize(sharing_weights(weights), cfg, **options)
    run = model if how is None else compiled_alone(model, fullgraph=True, **how)
    return Row(
        f"dittofx {cname} ({mode}{', ' + variant if variant else ''})", cname, mode, "dittofx", run,
        cached_steps=lambda: dittofx.summary(model, log_table=False)[0].cached_steps,
        state_bytes=lambda: sum(s.bytes() for s in model._dittofx.states.values()),
        eager=model,
    )  # fmt: skip


def build_rows(
    spec: Spec, full: torch.nn.Module, fn_bn: torch.nn.Module, modes: list[str], only: str | None, variants: str | None = None,
    cachedit: tuple[str, ...] = CACHEDIT_WAYS,
) -> list[Row]:
    """Every row gets its own module objects over `full`'s (or `fn_bn`'s) weights; `cachedit`: the
    ways cache-dit's compiled rows run (eager always runs: it is the schedule they are checked against)."""
    rows = []
    for mode in modes:
        rows.append(Row(f"baseline compiled ({mode})", None, mode, "baseline", compiled_alone(sharing_weights(full), mode=mode, fullgraph=True),
                        eager=full))  # fmt: skip
        rows.append(Row(f"Fn+Bn only compiled ({mode})", None, mode, "chain", compiled_alone(sharing_weights(fn_bn), mode=mode, fullgraph=True)))
    for cname in CONFIGS:
        if only is not None and only not in cname:
            continue
        rows.append(_cachedit_row(spec, full, cname, "eager", None))
        for mode in modes:
            rows += [_cachedit_row(spec, full, cname, how, mode) for how in CACHEDIT_WAYS if how in cachedit]
            rows.append(_dittofx_row(full, cname, mode))
            if variants is not None and cname.startswith("dynamic"):
                chosen = variants.split(",")
                rows += [_dittofx_row(full, cname, mode, v) for v in variants_for(mode, _on_cpu(full)) if any(t in v for t in chosen)]
    return [r for r in rows if r is not None]


class OutOfTime(BaseException):
    """SIGTERM (the device call's time is nearly up; bench/gpu_session.sh leaves a minute before it
    kills): stop and report the rounds that finished, or, cut while warming up, time the rows that
    warmed up in one round. A BaseException, so that no `except Exception` on the way (dynamo's,
    inductor's, _stop's) takes it."""


def _out_of_time(signum: int, frame: Any) -> None:
    raise OutOfTime


def _stop(row: Row, err: Exception) -> None:
    """A cache row that raises (e.g. cache-dit under CUDA graphs) stops; the run goes on without it.
    The baseline and the Fn+Bn-only rows are the ideal's parts: their errors end the run."""
    if row.kind in ("baseline", "chain"):
        raise err
    traceback.print_exc()
    message = str(err).strip()
    row.error = f"{type(err).__name__}: {message.splitlines()[0][:300]}" if message else type(err).__name__
    row.model = row.eager = None
    print(f"stopped {row.name}: {row.error}", flush=True)


def measure(
    rows: list[Row], spec: Spec, latents: torch.Tensor, inputs: dict, clock: Clock, repeats: int, skip_guard_eval: bool = False
) -> tuple[dict, dict, str | None, float | None]:
    """Warm every row up (compiles), then time interleaved rounds. Before its warm-up, the first
    dittofx row of each config runs its module eagerly: that config's reference (one capture serves
    both). Returns each row's last output, per config the reference (output, cached steps), how
    the run was cut short by OutOfTime (None: it was not), and the cores other processes kept busy
    while the rounds ran (`_others_cores`)."""
    outputs, references, cut = {}, {}, None
    start = time.perf_counter()
    try:
        _warm_up(rows, spec, latents, inputs, clock, outputs, references, start)
    except OutOfTime:
        if any(r.kind in ("baseline", "chain") and "warmup_s" not in r.stats for r in rows):
            raise  # no ideal to hold the other rows against: nothing to report
        for row in rows:
            if row.error is None and "warmup_s" not in row.stats:
                row.error, row.model, row.eager = "not warmed up: the time ran out", None, None
        cut = "while warming up: the rows that had warmed up were timed in one round"
        print(f"out of time {cut}", flush=True)
        repeats = 1
    before = _cpu_seconds()
    for round_ in range(repeats):
        try:
            _time_round(rows, spec, latents, inputs, clock, outputs, skip_guard_eval)
        except OutOfTime:
            if any(r.kind in ("baseline", "chain") and not r.steps for r in rows):
                raise  # no ideal to hold the other rows against: nothing to report
            for row in rows:
                if row.error is None and not row.steps:
                    row.error, row.model, row.eager = "not timed: the time ran out", None, None
            cut = f"in round {round_ + 1} of {repeats}: {round_} whole rounds and the requests of round {round_ + 1} that finished"
            print(f"out of time {cut}", flush=True)
            break
        print(f"[{time.perf_counter() - start:.0f} s] timed round {round_ + 1} of {repeats}", flush=True)
    return outputs, references, cut, _others_cores(before, _cpu_seconds())


def _warm_up(rows: list[Row], spec: Spec, latents: torch.Tensor, inputs: dict, clock: Clock, outputs: dict, references: dict,
             start: float) -> None:  # fmt: skip
    for row in rows:
        try:
            if row.eager is not None and row.config not in references:
                out, _ = denoise(row.eager, spec, latents, inputs, clock)
                references[row.config] = (out, row.cached_steps())
            graphs, breaks = _compile_stats()
            row.before_request()
            began = time.perf_counter()
            outputs[row.name], _ = denoise(row.model, spec, latents, inputs, clock)
            warmup_s = time.perf_counter() - began
            row.schedule = row.cached_steps()
        except Exception as err:
            _stop(row, err)
            continue
        graphs_after, breaks_after = _compile_stats()
        row.stats = {"frames_compiled": graphs_after - graphs, "graph_breaks": breaks_after - breaks, "recompiles_after_warmup": 0,
                     "warmup_s": warmup_s}  # fmt: skip
        memory = f", {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated" if clock.cuda else ""
        print(f"[{time.perf_counter() - start:.0f} s] warmed up {row.name}: {row.stats}{memory}", flush=True)


def _time_round(rows: list[Row], spec: Spec, latents: torch.Tensor, inputs: dict, clock: Clock, outputs: dict,
                skip_guard_eval: bool = False) -> None:  # fmt: skip
    """One request per row. A round cut short by OutOfTime leaves some rows one request ahead:
    their medians take one more sample, nothing else. `skip_guard_eval`: every row but cache-dit's
    under skip_guard_eval_unsafe (cache-dit's compiled rows raise "Recompilation triggered with
    skip_guard_eval_unsafe stance" under it, though with full guards they do not recompile)."""
    for row in rows:
        if row.error is not None:
            continue
        try:
            graphs, _ = _compile_stats()
            row.before_request()
            if clock.cuda:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip_guard_eval and row.kind != "cache-dit"):
                outputs[row.name], seconds = denoise(row.model, spec, latents, inputs, clock)
        except Exception as err:
            _stop(row, err)
            continue
        row.steps.append(seconds)
        row.schedule = row.cached_steps()
        if clock.cuda:
            row.stats["peak_mem_mb"] = max(row.stats.get("peak_mem_mb", 0), (torch.cuda.max_memory_allocated() - before) / 2**20)
        row.stats["recompiles_after_warmup"] += _compile_stats()[0] - graphs


def report(rows: list[Row], outputs: dict, references: dict) -> list[dict]:
    """One record per row, and per config and mode one "ideal" record for dittofx's schedule."""
    full = {r.mode: statistics.median(r.step_medians()) for r in rows if r.kind == "baseline"}
    chain = {r.mode: statistics.median(r.step_medians()) for r in rows if r.kind == "chain"}
    first_mode = next(iter(full))  # cache-dit eager is held against the ideal of the first mode

    def ideal(n_cached: int, mode: str) -> float:
        return (STEPS - n_cached) * full[mode] + n_cached * chain[mode]

    # cache-dit's eager schedule per config: a compiled cache-dit row that caches other steps (under
    # CUDA graphs, probably because its buffers are overwritten between replays) is reported, not
    # taken as the one to beat
    cachedit_eager = {r.config: r.schedule for r in rows if r.kind == "cache-dit" and r.mode is None and r.error is None}
    checked = lambda row: row.kind == "cache-dit" and row.mode is not None and row.config in cachedit_eager  # noqa: E731
    cachedit_best: dict[str, float] = {}
    for row in rows:
        if row.kind == "cache-dit" and row.error is None and not (checked(row) and row.schedule != cachedit_eager[row.config]):
            cachedit_best[row.config] = min(cachedit_best.get(row.config, float("inf")), row.seconds())
    vs_cachedit = lambda config, seconds: cachedit_best[config] / seconds if config in cachedit_best else None  # noqa: E731
    records = []
    for row in rows:
        if row.error is not None:
            records.append({"row": row.name, "kind": row.kind, "config": row.config, "mode": row.mode, "error": row.error})
            continue
        rec = {"row": row.name, "kind": row.kind, "config": row.config, "mode": row.mode, "seconds": row.seconds(), **row.stats,
               "step_medians_s": row.step_medians()}  # fmt: skip
        if row.kind in ("cache-dit", "dittofx"):
            cached, medians, mode = row.schedule, row.step_medians(), row.mode or first_mode
            computed = [m for s, m in enumerate(medians) if s not in cached]
            ideal_row = f"ideal {row.config} ({mode})"
            if row.kind == "dittofx" and all(r["row"] != ideal_row for r in records):  # once per config and mode
                records.append({"row": ideal_row, "kind": "ideal", "config": row.config, "mode": mode,
                                "seconds": ideal(len(cached), mode), "cached": len(cached), "speed_vs_ideal": 1.0,
                                "speed_vs_cachedit": vs_cachedit(row.config, ideal(len(cached), mode))})  # fmt: skip
            rec.update(
                cached=len(cached), cached_steps=cached,
                ideal_s=ideal(len(cached), mode), speed_vs_ideal=ideal(len(cached), mode) / row.seconds(),
                speed_vs_cachedit=vs_cachedit(row.config, row.seconds()),
                cached_step_vs_ideal=statistics.median(medians[s] for s in cached) / chain[mode] if cached else None,
                computed_step_vs_baseline=statistics.median(computed) / full[mode],
                state_bytes=row.state_bytes(),
            )  # fmt: skip
        if checked(row):
            rec["same_schedule_as_eager"] = rec["cached_steps"] == cachedit_eager[row.config]
        if row.kind in ("dittofx", "baseline"):  # the baseline's: how far compiling alone moves the output
            ref_out, ref_cached = references[row.config]
            out = outputs[row.name]
            rec["rel_err_vs_eager"] = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
            if row.kind == "dittofx":
                rec["same_schedule_as_eager"] = row.schedule == ref_cached
        records.append(rec)
    return records


def schedule_problems(records: list[dict]) -> list[str]:
    """What says a row did not run the schedule it should: a stopped row; a dittofx or cache-dit row
    whose compiled schedule is not the same library's eager one; under a static mask, two rows
    caching different steps."""
    problems = [f"{r['row']}: stopped ({r['error']})" for r in records if "error" in r]
    problems += [f"{r['row']}: schedule differs from eager {r['kind']}" for r in records if r.get("same_schedule_as_eager") is False]
    for cname, (cfg, _) in CONFIGS.items():
        schedules = {r["row"]: r["cached_steps"] for r in records if r["config"] == cname and "cached_steps" in r}
        if cfg.get("scm_steps_policy") == "static" and len({tuple(s) for s in schedules.values()}) > 1:
            problems.append(f"{cname}: rows cached different steps: {schedules}")
    return problems


def markdown(meta: dict, records: list[dict], problems: list[str], cpu: bool) -> str:
    lines = [f"# End-to-end, {meta['model']}, {meta['device']} — {meta['date']}", ""]
    if cpu:
        lines += [
            "**CPU wall-clock figures are not speed claims.** They were measured on a shared 2-core machine; only the "
            "ratios between rows of this one run mean anything, and the table gives ratios only (seconds are in the JSON).",
            "",
        ]
    if (meta.get("other_processes_cores") or 0) > OTHERS_TOLERATED:
        lines += [f"**Other processes kept {meta['other_processes_cores']} cores busy on average while the rows were timed: "
                  "the ratios may be perturbed; run again on a quiet machine before quoting them.**", ""]  # fmt: skip
    lines += [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in meta.items()]
    lines += [
        "- timing: every row holds its own module objects over one seeded weight set; all rows were built and warmed up, "
        "then timed in interleaved rounds (one request per row per round); a request = the sum of its steps' medians over the rounds.",
        "- speed vs ideal = ideal s / row s; speed vs cache-dit = fastest cache-dit row of the config that cached the steps cache-dit's eager run cached, s / row s (> 1: ahead); "
        "cached step = the row's median cached step / the Fn+Bn-only compiled step; computed step = the row's median computed step / the baseline's; recompiles counted after the warm-up request.",
        *(["- skip_guard_eval: every row but cache-dit's was timed under torch.compiler.set_stance(skip_guard_eval_unsafe=True), "
           "cache-dit's with its guards (it raises under that stance): speed vs cache-dit includes the guard checks only "
           "cache-dit paid."] if meta["skip_guard_eval"] else []),
        "- peak memory: " + ("not measured on CPU (no allocator statistics without tracemalloc, which would slow every row)." if cpu else "CUDA bytes above what was allocated before the request."),
        "",
        "| row | cached | speed vs ideal | speed vs cache-dit | cached step vs ideal | computed step vs baseline | graph breaks | frames (warm-up) | recompiles | state KiB | "
        + ("" if cpu else "peak MiB | ")
        + "schedule = eager / rel err |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("" if cpu else "---|") + "---|",
    ]  # fmt: skip
    fmt = lambda v, f="{:.3f}": "" if v is None else f.format(v)  # noqa: E731
    for r in records:
        if r["kind"] in ("baseline", "chain") or "error" in r:
            continue
        if r["kind"] == "ideal":
            lines.append(f"| *{r['row']}* | {r['cached']} | 1 | {fmt(r['speed_vs_cachedit'])} | 1 | 1 | | | | |" + ("" if cpu else " |") + " |")
            continue
        check = f"{r['same_schedule_as_eager']} / {r['rel_err_vs_eager']:.1e}" if r["kind"] == "dittofx" else str(r.get("same_schedule_as_eager", ""))
        peak = "" if cpu else f"{fmt(r.get('peak_mem_mb'), '{:.0f}')} | "
        lines.append(
            f"| {r['row']} | {r['cached']} | {fmt(r['speed_vs_ideal'])} | {fmt(r['speed_vs_cachedit'])} | {fmt(r['cached_step_vs_ideal'])} | "
            f"{fmt(r['computed_step_vs_baseline'])} | "
            f"{r['graph_breaks']} | {r['frames_compiled']} | {r['recompiles_after_warmup']} | {r['state_bytes'] / 1024:.0f} | {peak}{check} |"
        )
    step = {(r["kind"], r["mode"]): statistics.median(r["step_medians_s"]) for r in records if r["kind"] in ("baseline", "chain")}
    ratios = [f"{step[('baseline', m)] / step[('chain', m)]:.2f} ({m})" for k, m in step if k == "baseline"]
    drift = [f"{r['rel_err_vs_eager']:.1e} ({r['mode']})" for r in records if r["kind"] == "baseline"]
    lines += ["", f"The ideal's parts: one baseline step costs {', '.join(ratios)} Fn+Bn-only steps.",
              f"The compiled baseline's output differs from the eager baseline's by {', '.join(drift)} (relative L2 over the "
              "request): compiling alone moves the output that much, the scale for the dittofx rows' rel err."]  # fmt: skip
    if problems:
        lines += ["", "Checks failed:", *[f"- {p}" for p in problems]]
    else:
        lines += ["", "Checks: every row ran; dittofx's compiled schedules are its eager ones; under static masks all rows cached the same steps."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, choices=sorted(SPECS), help="default: pixart on CUDA, wan-cpu on CPU, pixart-tiny with --smoke")
    ap.add_argument("--smoke", action="store_true", help="tiny model: checks that every row runs, no speed claims; exits 1 on a failed check")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None, help="JSON path (CPU default: bench/results/e2e_cpu_<date>.json, with a .md beside it)")
    ap.add_argument("--only", default=None, help='run only the configs whose name contains this ("static": fast and ultra)')
    ap.add_argument("--variants", nargs="?", const="", default=None, metavar="TEXT",
                    help="dynamic configs: also the other ways to run them (with reduce-overhead CUDAGRAPH_VARIANTS: "
                    "split_at_decision, the cudagraphs backend, graph partitions, cuda_graphs=True; with the other modes, on CPU, "
                    "NO_CUDAGRAPH_VARIANTS: split_at_decision); with TEXT (comma-separated), only the variants whose name contains one "
                    "(a variant whose CUDA-graph capture fails leaves the CUDA context broken for the rows after it)")
    ap.add_argument("--cachedit", default=",".join(CACHEDIT_WAYS),
                    help="comma-separated ways cache-dit's compiled rows run (default: all); its eager row always runs")
    ap.add_argument("--skip-guard-eval", action="store_true",
                    help="time every row but cache-dit's (which raises under it) under torch.compiler.set_stance("
                    "skip_guard_eval_unsafe=True), after the warm-up request: dynamo checks only the guards that tell a "
                    "frame's compiled entries apart (unsafe: a call that needs another entry can run a wrong one; the "
                    "schedule and output checks would show it)")
    ap.add_argument("--modes", default=None, help="comma-separated torch.compile modes (default: both on CUDA)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: on a shared 2-core machine two "
                    "threads per process made steps 2-4x slower and far noisier than one)")  # fmt: skip
    args = ap.parse_args()
    unknown = set(args.cachedit.split(",")) - set(CACHEDIT_WAYS)
    if unknown:
        ap.error(f"--cachedit: {sorted(unknown)} not among {list(CACHEDIT_WAYS)}")
    signal.signal(signal.SIGTERM, _out_of_time)
    device = args.device
    cpu = device == "cpu"
    if cpu:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if cpu else torch.bfloat16
    model_name = args.model or ("pixart-tiny" if args.smoke else "wan-cpu" if cpu else "pixart")
    spec = SPECS[model_name]
    modes = args.modes.split(",") if args.modes else ["default"] if cpu else ["default", "reduce-overhead"]
    # rows share the model class's forward (and dittofx's) code objects: room for all their frames
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)

    latents, inputs = spec.request_inputs(device, dtype)
    clock = Clock(device)
    with torch.no_grad():
        full = spec.build(device, dtype)
        fn_bn = spec.build(device, dtype, **spec.fn_bn_layers)
        rows = build_rows(spec, full, fn_bn, modes, args.only, args.variants, tuple(args.cachedit.split(",")))
        outputs, references, cut, others = measure(rows, spec, latents, inputs, clock, args.repeats, args.skip_guard_eval)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # what was measured gets written: the runbook kills a minute later
    records = report(rows, outputs, references)
    for r in records:
        print(json.dumps({k: v for k, v in r.items() if k not in ("cached_steps", "step_medians_s")}), flush=True)
    problems = schedule_problems(records)
    print("checks:", "ok" if not problems else "\n  ".join(["FAILED", *problems]), flush=True)

    meta = {
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if not cpu else f"CPU: {_cpu_name()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "cache-dit": getattr(cache_dit, "__version__", "?"),
        "dtype": str(dtype), "model": model_name, "weights_gib": round(sum(p.numel() * p.element_size() for p in full.parameters()) / 2**30, 2),
        "steps": STEPS, "repeats": args.repeats, "rounds_timed": max(len(r.steps) for r in rows), "cut_short": cut,
        "skip_guard_eval": args.skip_guard_eval, "other_processes_cores": others, "command": "python " + " ".join(sys.argv),
    }  # fmt: skip
    out = Path(args.out) if args.out else (RESULTS / f"e2e_cpu_{meta['date']}.json" if cpu and not args.smoke else None)
    if out is not None:
        out.write_text(json.dumps({"meta": meta, "rows": records, "problems": problems}, indent=1))
        out.with_suffix(".md").write_text(markdown(meta, records, problems, cpu))
        print(f"wrote {out} and {out.with_suffix('.md')}")
    if args.smoke and problems:
        sys.exit(1)


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(CPU seconds every process spent busy, this process's and its reaped children's (inductor's
    compiler runs), wall seconds), or None off Linux."""
    try:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), sum(own[:4]), time.perf_counter()


def _others_cores(before: tuple | None, after: tuple | None) -> float | None:
    """How many cores other processes kept busy, on average, while the rows were timed: on a shared
    machine, a run another job overlapped is not one to quote."""
    if before is None or after is None:
        return None
    busy, own, wall = (a - b for a, b in zip(after, before))
    return round(max(busy - own, 0.0) / wall, 2)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
