"""What `optimize` attaches to a model: graphs per input structure, states per CFG branch.

A forward pre-hook does the Python-side work before every call, outside dynamo (torch.compile
runs module hooks eagerly and traces only `forward`): recapture when the input structure changes,
pick the CFG branch, (re)allocate state when shapes change. The replaced `forward` then only
feeds the live parameters, the state tensors and the inputs to the rewritten graph, which is
what dynamo traces: no Python value in it changes from step to step. Where the first call finds no
graph to rewrite (the forward cannot be captured, or its middle cannot be paired), the same step
logic runs around the model's own blocks instead (`blockwise.py`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import math
import sys
import traceback
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._dynamo import eval_frame
from torch.utils import _pytree as pytree

from ..config import CacheConfig, DBPruneConfig, TeaCacheConfig
from ..passes.build import rewrite_captured
from ..passes.capture import CapturedGraph, capture, flatten_inputs, input_key, resolve_state
from ..passes.partition import Partition, UnpairedOutputError
from ..passes.rewrite import RewriteOptions
from ..patterns.chain import Chain
from ..patterns.modulation import ModulationNotFound
from ..teacache import coefficients_for
from ..masks import steps_mask
from .blockwise import Blockwise, BlockwiseConfigError, BlockwiseError, bind_arguments, close_at_scale, learn_chain
from . import graphs as own_graphs
from . import structure
from .compile_context import enclosing_compile, records_cuda_graphs
from .graphs import Replays
from .state import HISTORY, SCALARS, CacheState, CacheStates, mark_static, normal_tensors

__all__ = ["Engine", "Entry", "CaptureError", "context_parallel_group"]

log = logging.getLogger("dittofx")

# what diffusers' transformers name their timestep input (most: timestep; Z-Image: t; HiDream:
# timesteps; Cosmos 3: vision_timesteps), first match wins: new requests of unknown length are told
# by it (SPEC §3), and TaylorSeer's gap can be measured in it
TIMESTEP_INPUTS = ("timestep", "timesteps", "t", "vision_timesteps")


def timestep_input(names: Any) -> str | None:
    """Which of the forward's inputs `names` is its timestep (TIMESTEP_INPUTS), if any."""
    return next((n for n in TIMESTEP_INPUTS if n in names), None)

OWN_GRAPHS = (
    "dittofx.optimize(..., cuda_graphs=True) compiles the model's graphs and replays them from CUDA graphs of its own: "
    "call the model without torch.compile"
)


class CaptureError(RuntimeError):
    pass


@dataclass
class Entry:
    """One captured + rewritten graph, valid for one input structure."""

    captured: CapturedGraph
    chain: Chain
    partition: Partition
    # rewritten, per decision: "device" (torch.cond), "compute", "cache"; unless split_at_decision
    # is False, also the device graph's halves: "split-head", "split-compute", "split-cache"
    graphs: dict[str, fx.GraphModule]
    slots: list[tuple[torch.nn.Module, str, bool]]  # (owner module, attribute, is_parameter) per state placeholder
    key: tuple
    state_nodes: list[fx.Node]  # nodes whose shapes size the state: the signal, then each stored residual
    region_counts: dict[str, int] = field(default_factory=dict)
    pruned_blocks: list[int] = field(default_factory=list)  # DBPrune: chain positions of the prunable blocks
    recaptured: bool = False  # captured because the graphs of the same input structure were wrong at new sizes
    head: Callable | None = None  # the split head as run in the pre-hook (compiled if asked)
    head_made_by: Any = None  # how `head` was made (Engine._split_how): made again when that changes
    # concrete input shapes the graph is known to be right for -> the state shapes they need
    # (p, then each carried middle output): worked out once per size, not per step
    state_shapes: dict[tuple, tuple] = field(default_factory=dict)
    context: tuple = ()  # train mode, weights' dtype and device, autocast at its capture (Engine._capture_context)
    # what the graph baked in besides the weights (structure.py), at its capture
    blocks: tuple | None = ()
    switches: tuple = ()
    # the modules the switches were read from, held: a processor freed while its id is in a
    # fingerprint (this graph's, or a shelved one's) could have its address reused by a new one
    held: tuple = ()

    def __post_init__(self) -> None:
        # each slot's dict (the owner's _parameters or _buffers) looked up once: live_state runs at
        # every call, over ~700 tensors for a 28-block DiT
        self._lookups = [((m._parameters if is_p else m._buffers), name) for m, name, is_p in self.slots]
        self._reads: dict[str, tuple[list[int], list[tuple[int, dict, str]], list[int]]] = {}

    def live_state(self) -> list[torch.Tensor]:
        """The weights as they are now (replaced ones included: load_state_dict(assign=True))."""
        return [tensors[name] for tensors, name in self._lookups]

    def leading(self, graph: str, state: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Graph `graph`'s leading inputs: the state, the weights as they are now and the lifted
        constants, by position, None where the graph reads none. A cache step's graph reads a few
        of the ~300-700 weights that the compute graph reads, and gathering the rest cost a cache
        miss or more per weight at every step (~60 us per cached step, wan-cpu)."""
        reads = self._reads.get(graph)
        if reads is None:
            reads = self._reads[graph] = self._leading_reads(graph, len(state))
        states, weights, constants = reads
        out: list[torch.Tensor | None] = [None] * (len(state) + len(self._lookups) + len(self.captured.constants))
        for i in states:
            out[i] = state[i]
        for i, tensors, name in weights:
            out[i] = tensors[name]
        first_constant = len(state) + len(self._lookups)
        for i in constants:
            out[i] = self.captured.constants[i - first_constant]
        return out

    def _leading_reads(self, graph: str, num_state: int) -> tuple[list[int], list[tuple[int, dict, str]], list[int]]:
        """The leading positions `graph` reads, as (state positions, (position, owner's dict, name)
        per weight, constant positions)."""
        first_constant = num_state + len(self._lookups)
        placeholders = self.graphs[graph].graph.find_nodes(op="placeholder")[: first_constant + len(self.captured.constants)]
        read = [i for i, node in enumerate(placeholders) if node.users]
        weights = [(i, *self._lookups[i - num_state]) for i in read if num_state <= i < first_constant]
        return [i for i in read if i < num_state], weights, [i for i in read if i >= first_constant]


def _concrete(shape, bindings: dict) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else int(d.node.expr.xreplace(bindings)) for d in shape)


def _state_shapes(entry: Entry, leaves: list) -> tuple:
    """Concrete shapes of the cache state (p, then each carried middle output) for these inputs."""
    bindings = _symbol_bindings(entry, leaves)
    return tuple(_concrete(n.meta["val"].shape, bindings) for n in entry.state_nodes)


def _measures_the_largest_stream(entry: Entry, leaves: list) -> bool:
    """Whether the stream the graph measures is still the largest carried output of the last Fn
    block at these inputs' sizes (the carried hidden as the block-by-block path and tests/reference.py
    pick it, per call). A symbolic graph keeps the pick of its capture's sizes: FLUX captured with
    more text than image tokens measured the text stream at every later size (helper-52); where
    another stream is now the largest, these sizes get a capture of their own."""
    streams = entry.partition.fn_streams
    if len(streams) < 2:
        return True
    bindings = _symbol_bindings(entry, leaves)
    try:
        numel = {n: math.prod(_concrete(n.meta["val"].shape, bindings)) for n in streams}
    except TypeError:  # a size the inputs do not bind (data-dependent): the capture's pick stands
        return True
    return numel[entry.partition.h_fn] >= max(numel.values())


def _symbol_bindings(entry: Entry, leaves: list) -> dict:
    """Each symbol of the capture -> its value in these inputs (tensor dims, int inputs)."""
    bindings = {}
    for node, leaf in zip(entry.captured.user_placeholders(), leaves):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and isinstance(leaf, torch.Tensor):
            pairs = zip(val.shape, leaf.shape)
        else:
            pairs = [(val, leaf)] if isinstance(val, torch.SymInt) else []
        for symbolic, concrete in pairs:
            if not isinstance(symbolic, int) and symbolic.node.expr.is_Symbol:
                bindings[symbolic.node.expr] = concrete
    return bindings


def _within_ranges(entry: Entry, leaves: list) -> bool:
    """Whether these inputs' sizes lie in the ranges export traced the graph for."""
    ranges = entry.captured.ranges
    return all(value in ranges[symbol] for symbol, value in _symbol_bindings(entry, leaves).items() if symbol in ranges)


def _constants_on_inputs_device(entry: Entry, leaves: list) -> torch.device:
    """The inputs' device, where the graph's lifted constants are moved if they are elsewhere."""
    device = next(x.device for x in leaves if isinstance(x, torch.Tensor))
    captured = entry.captured
    if captured.constants and captured.constants[0].device != device:
        with normal_tensors():  # kept across calls, whatever mode the first one ran in
            captured.constants[:] = [c.to(device) for c in captured.constants]
    return device


def _decision_in(state: CacheState) -> str | None:
    """The decision the state's latest step made ("compute" or "cache"), read on the host; None
    past the history it keeps."""
    step = state.step
    flag, count = torch.stack([state.hist_cached[(step - 1).clamp(0, HISTORY - 1)].to(step.dtype), step]).tolist()
    return None if count > HISTORY else "cache" if flag > 0 else "compute"


@torch.no_grad()
def _go_on_with_request(old: CacheState, new: CacheState) -> None:
    """A state remade within a request (its sizes or dtype changed) keeps the request's counters
    and history: only what was stored goes (the step computes; gate 2), and the request still ends
    after its length, so the next one never starts on this one's residuals."""
    for name in (*SCALARS, "hist_diff", "hist_cached", "taylor_times"):
        if name != "valid":
            getattr(new, name).copy_(getattr(old, name))


def context_parallel_group(model: torch.nn.Module) -> Any:
    """The group diffusers' own context parallelism shards the sequence over
    (`model.enable_parallelism(config=ContextParallelConfig(...))`), or None."""
    cp = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
    return None if cp is None else cp._flattened_mesh.get_group()


def first_parameter(module: torch.nn.Module) -> torch.Tensor | None:
    """`next(module.parameters(), None)` (the same tensor: modules in pre-order, each one's own
    first) without its generators and memo set, which cost ~15 us of a step's pre-hook, cold."""
    for p in module._parameters.values():
        if p is not None:
            return p
    for child in module._modules.values():
        if child is not None and (p := first_parameter(child)) is not None:
            return p
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _blockwise_key(hidden: str, h_fn: torch.Tensor, entering: list[torch.Tensor]) -> tuple:
    return hidden, tuple(h_fn.shape), h_fn.dtype, h_fn.device, tuple(tuple(t.shape) for t in entering)


def _model_frame(err: BaseException) -> str:
    """The innermost traceback line outside torch: the model code that blocked capture."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return "an unknown place"
    f = frames[-1]
    return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}: {f.line}"


class _CacheContext:
    """The model's `cache_context` (diffusers pipelines name the CFG branch with it), telling the
    engine the branch. An object, not a closure: a deep copy of the model tells its own engine."""

    def __init__(self, engine: "Engine", original: Callable | None):
        self.engine, self.original = engine, original

    @contextlib.contextmanager
    def __call__(self, name: str, **kwargs: Any):
        engine = self.engine
        prev, engine.context_name = engine.context_name, name
        try:
            with self.original(name, **kwargs) if self.original is not None else contextlib.nullcontext():
                yield
        finally:
            engine.context_name = prev


@dataclass
class _BranchCall:
    """A CFG branch's latest call (cfg_diff_compute_separate=False)."""

    number: int  # the branch's calls so far, this one included
    decision: str  # "compute", "cache", or "device" (made in the graph: read from the state)
    state: Any


class _TimestepWatch:
    """A branch's first timesteps, copied to the host as they come, without a sync."""

    COUNT = 5

    def __init__(self) -> None:
        self.copies: list[torch.Tensor] = []
        self.copied: Any = None  # on CUDA: an event after the last copy
        self.done = False

    def add(self, timestep: Any) -> None:
        if not isinstance(timestep, torch.Tensor) or timestep.numel() == 0 or timestep.device.type == "meta":
            self.done = True  # nothing to watch
            return
        on_cuda = timestep.is_cuda
        with normal_tensors():
            host = torch.empty(1, dtype=torch.float32, pin_memory=on_cuda)
            host.copy_(timestep.detach().reshape(-1)[:1], non_blocking=on_cuda)
        self.copies.append(host)
        if on_cuda and self.full():
            self.copied = torch.cuda.Event()
            self.copied.record()

    def full(self) -> bool:
        return len(self.copies) == self.COUNT

    def ready(self) -> bool:
        """All copies done (the values are then read once, and the watch is done)."""
        return self.full() and (self.copied is None or self.copied.query())

    def values(self) -> list[float]:
        self.done = True
        return [float(c.numpy()[0]) for c in self.copies]  # read from host memory: no dispatch, no sync


class Engine:
    """Step caching on one model. A call goes:

        _pre_hook -> pre_call: the graph for these inputs (prepare -> _entry_for; at a first call
            _build: capture, then passes/build.py's rewrite_captured), the CFG branch (_branch) and
            its state (_state_for), the step's decision where the host knows it (_host_decision:
            "compute" / "cache", else "device"), the split head where asked (_run_head)
        -> _cached_forward: the chosen graph on (state, live weights, constants, inputs); its gates
            (runtime/gates.py) and the diff / Taylor kernels (kernels/) run inside it.

    Where the forward cannot be captured, the same step logic runs around the model's own blocks
    (`self.blockwise`, runtime/blockwise.py).
    """

    def __init__(
        self, model: torch.nn.Module, cfg: CacheConfig, group: str | None = None, split: Any = None, cuda_graphs: bool = False
    ):
        self.model = model
        self.cfg = cfg
        # split_at_decision: None = the device decision stays in the graph (torch.cond); EAGER (the
        # head runs eagerly), torch.compile arguments for the head, or UNDER_CUDA_GRAPHS (the
        # default: split where the model's call runs under a torch.compile that records CUDA
        # graphs, the head compiled by that compile)
        self.split = split
        # cuda_graphs: dittofx compiles its graphs and replays them from CUDA graphs of its own
        # (graphs.py: a step decided on the device is one capture, its tails under conditional
        # nodes; with split, a head replay, the host's read, a tail replay); the forward is then
        # left out of torch.compile
        self.replays = Replays() if cuda_graphs else None
        self.teacache = isinstance(cfg, TeaCacheConfig)
        self.prune = isinstance(cfg, DBPruneConfig)
        self.coefficients = coefficients_for(model, cfg.coefficients) if self.teacache else None
        self.group = group
        self.num_steps = cfg.num_inference_steps
        self.entries: list[Entry] = []
        self.uncapturable: dict[tuple, Exception] = {}  # input keys whose capture failed -> why
        self._plain_specs: dict[tuple, pytree.TreeSpec] = {}  # flatten_inputs' specs of calls of plain values
        self._shelf: dict[tuple, list[Entry]] = {}  # graphs of earlier adapter/processor switches (oldest first)
        self.states = CacheStates()
        # the graph for this call, its entry and its leading inputs (a plain list, see _leading)
        self.current: tuple[fx.GraphModule, Entry, list[torch.Tensor | None]] | None = None
        self.host: dict[str, tuple[int, bool]] = {}  # per branch: (host step count, residuals stored)
        self._masks: dict[int | None, list[int] | None] = {}
        self.context_name: str | None = None
        self.calls = 0
        self.latest: dict[str, _BranchCall] = {}  # per CFG branch: its latest call (cfg_diff_compute_separate=False)
        self.latest_branch: str | None = None  # the branch of the latest call (cfg_diff_compute_separate=False)
        self.pipeline_call: str | None = None  # the class of the pipeline whose call is running (optimize(pipe))
        self.length_from_pipeline = False  # num_steps was set by a pipeline's call (not the config or dittofx.refresh)
        self._warned: set[str] = set()  # the warnings said once per model
        self._first_timesteps: dict[str, _TimestepWatch] = {}  # per branch, request length unknown: see _watch_timesteps
        self.ran = False  # a call got through the pre-hook (till then a failure of ours detaches)
        self.forward_error: BaseException | None = None  # the model's own forward raised it on a call's inputs
        self.capturing = False
        self.path = "torch.export graph"
        self.blockwise: Blockwise | None = None  # set when the forward cannot be captured
        self.options: RewriteOptions | None = None  # the block-by-block path's step options (a graph's go into its rewrite)
        # instance attributes we replace, as they were (None: not set on the instance)
        self._saved = {attr: model.__dict__.get(attr) for attr in ("forward", "cache_context")}
        self._hook = None
        # an uncached call's branch (Engine.prepare), and whether that call returned (set by the
        # forward): its request ends at the next call then; one that raised changes nothing
        self.uncached_branch: str | None = None
        self.uncached_returned = False
        # the model changed in a way its graphs cannot see (structure.py): why, until the next call captures again
        self.changed: str | None = None
        self.watched = False  # structure.watch has seen the model (a deep copy's engine: not yet)
        self._stateful: list[torch.nn.Module] = []  # the modules whose Python switches the graphs read
        self._own_running = False  # forward_without_pre_hook is running the model's own forward

    # ---- attach / detach -------------------------------------------------------------------
    def attach(self) -> None:
        model = self.model
        model.add_module("_dittofx_states", self.states)
        self._hook = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        model._dittofx = self  # before forward: pickling the model meets the engine (__getstate__) first
        forward = with_own_code(_cached_forward) if self.replays is None else torch._dynamo.disable(_cached_forward, reason=OWN_GRAPHS)
        model.forward = types.MethodType(forward, model)
        self._forward_function = forward  # (a deep copy's engine shares it: functions copy as themselves)
        model.cache_context = _CacheContext(self, getattr(model, "cache_context", None))

    def __getstate__(self) -> dict:
        raise TypeError(
            f"dittofx: an optimized {type(self.model).__name__} cannot be pickled (torch.save(model), multiprocessing): "
            f"its graphs hold export's fake tensors. Save its weights (state_dict() and save_pretrained are unchanged by "
            f"optimize), or dittofx.disable(model) first; copy.deepcopy(model) works"
        )

    def __deepcopy__(self, memo: dict) -> "Engine":
        """The engine of a deep copy of the model: the copy's own state, graphs captured again on
        its first call (a captured graph holds fake tensors, which do not copy), its first
        timesteps watched again (a CUDA event does not copy)."""
        new = memo[id(self)] = object.__new__(type(self))
        fresh = {
            "entries": [], "uncapturable": {}, "_shelf": {}, "current": None, "replays": None if self.replays is None else Replays(), "_first_timesteps": {},
            "changed": None, "watched": False, "_stateful": [],
        }  # fmt: skip
        for name, value in self.__dict__.items():
            setattr(new, name, fresh[name] if name in fresh else copy.deepcopy(value, memo))
        return new

    def detach(self) -> None:
        model = self.model
        structure.unwatch(model)
        if self.blockwise is not None:
            self.blockwise.remove()
        self._hook.remove()
        saved = dict(self._saved)
        if not self._forward_is_ours():  # wrapped after optimize: the wrapper stays, ours inside it runs the model's own
            log.warning(
                "dittofx: %s.forward was replaced after dittofx.optimize (%r): left in place; the dittofx forward it may "
                "call now runs the model's class forward%s", type(model).__name__, model.__dict__.get("forward"),
                "" if saved["forward"] is None else f" (the instance forward it had before optimize, {saved['forward']!r}, is not restored)",
            )  # fmt: skip
            del saved["forward"]
        for attr, value in saved.items():
            if value is None:
                model.__dict__.pop(attr, None)
            else:
                model.__dict__[attr] = value
        del model._modules["_dittofx_states"]
        del model.__dict__["_dittofx"]

    def _forward_is_ours(self) -> bool:
        """Whether the model's instance forward is still the one `attach` installed."""
        forward = self.model.__dict__.get("forward")
        return getattr(forward, "__self__", None) is self.model and getattr(forward, "__func__", None) is self._forward_function

    def _refuse_a_forward_that_moves_weights(self) -> None:
        """accelerate's hooks (offload, device alignment) and diffusers' offloading hooks wrap forward
        and move the weights inside the wrapper, after the pre-hook gathered them for the graph: a
        graph would read them where they were (meta, or the offload device). Wrapped before optimize,
        they are kept. (diffusers' context-parallel hooks move no weights: not refused.)"""
        if self._forward_is_ours():
            return
        registry = self.model.__dict__.get("_diffusers_hook")
        if "_hf_hook" not in self.model.__dict__ and not any("offload" in name for name in getattr(registry, "hooks", {})):
            return
        raise RuntimeError(
            f"dittofx: {type(self.model).__name__}.forward was wrapped after dittofx.optimize by hooks that move its weights "
            f"during the call (accelerate's cpu_offload / enable_model_cpu_offload / enable_sequential_cpu_offload, or "
            f"diffusers' group offloading), after dittofx gathered them: call dittofx.disable(model) and set up the "
            f"offload first, then dittofx.optimize (accelerate's cpu_offload set up first is served block by block)"
        )

    def refresh(self, num_steps: int | None, from_pipeline: bool = False) -> None:
        """A new request length (None: unknown) and a new request (`dittofx.refresh`; a pipeline's
        call: `from_pipeline`); all or nothing (a preset mask that cannot be made for the length
        raises before anything changed)."""
        previous, self.num_steps = self.num_steps, num_steps
        try:
            mask = self.mask()  # a preset mask is regenerated for the new length
        except ValueError:
            self.num_steps = previous
            raise
        self.length_from_pipeline = from_pipeline
        self.start_request()
        for state in self.states.values():
            state.reset(num_steps=num_steps or 0)
            state.set_mask(mask)

    def _outside_its_pipeline(self) -> None:
        """A call outside the pipeline call that set the request length (a pipeline made with
        `from_pipe` shares this transformer; a loop of the user's own): that length does not hold,
        so from here on the config's length holds, or, with none, new requests are told by the
        timestep (SPEC §3 with the length unknown)."""
        if self.cfg.num_inference_steps is not None:
            self.refresh(self.cfg.num_inference_steps)
            return
        try:
            self.refresh(None)
        except ValueError as err:  # a preset mask needs the length
            raise ValueError(f"{type(self.model).__name__} {OUTSIDE_ITS_PIPELINE}. {err}") from None
        self._warn_once(
            "outside its pipeline",
            "dittofx: %s %s; here new requests are told by the timestep (steps past warmup decide on the device).",
            type(self.model).__name__, OUTSIDE_ITS_PIPELINE,
        )

    def start_request(self) -> None:
        """Forget the host's view of the request (its step counts, the latest call per branch) and
        restart enable_separate_cfg=True's call parity: the next call is the first branch's again.
        The states are reset by the caller (`dittofx.reset` / `refresh`)."""
        self.host.clear()
        self.calls = 0
        self.latest.clear()
        self.latest_branch = None

    # ---- per call (eager, outside dynamo) -------------------------------------------------
    def _branch(self) -> str:
        sep = self.cfg.enable_separate_cfg
        if sep is False:
            return "default"
        if self.context_name is not None:
            return self.context_name
        if sep is True:
            self.calls += 1
            even = (self.calls - 1) % 2 == 0
            return "cond" if even != self.cfg.cfg_compute_first else "uncond"
        return "default"

    def _capture_context(self, leaves: list) -> tuple:
        """What a capture bakes in besides the inputs: train or eval mode (dropout), the weights'
        dtype and device (forwards cast their inputs to them in Python: `x.to(self.dtype)`), and
        autocast on the inputs' device."""
        weight = first_parameter(self.model)
        device = next((x.device.type for x in leaves if isinstance(x, torch.Tensor)), "cpu")
        on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)  # (none on "meta")
        autocast = torch.get_autocast_dtype(device) if on else None
        return self.model.training, None if weight is None else (weight.dtype, weight.device), autocast

    def _entry_for(self, args: tuple, kwargs: dict, leaves: list, spec: pytree.TreeSpec) -> tuple[Entry, tuple]:
        """The graph for these inputs (flattened: `leaves`, `spec`) and their concrete-shape key
        (captured or checked if new)."""
        context = self._capture_context(leaves)
        sizes = (context, input_key(args, kwargs, {}, (leaves, spec)))  # every dim concrete
        for entry in self.entries:
            if sizes in entry.state_shapes:
                return entry, sizes
        if sizes in self.uncapturable:  # tried once: not again at every call
            raise self.uncapturable[sizes]
        fitting = [
            e for e in self.entries
            if e.context == context and input_key(args, kwargs, e.captured.dynamic_dims, (leaves, spec)) == e.key
            and _within_ranges(e, leaves)
        ]  # fmt: skip
        same_structure = [e for e in fitting if _measures_the_largest_stream(e, leaves)]
        original = functools.cache(lambda: pytree.tree_leaves(self._original_forward(args, kwargs)))

        def serve(entry: Entry) -> tuple[Entry, tuple]:
            self._warn_if_numbers_change(sizes, entry, checked=True)
            entry.state_shapes[sizes] = _state_shapes(entry, leaves)
            return entry, sizes

        for entry in same_structure:
            if self._still_valid(entry, leaves, original):
                return serve(entry)
        # A symbolic graph wrong at these sizes took a size-dependent branch without a guard, e.g.
        # PixArt's PatchEmbed: its table for the first size, or a new table for any other size. A
        # second symbolic capture, at other sizes, takes the general branch and serves the rest;
        # where a second capture is wrong too, each new size gets a static capture.
        try:
            entry = self._build(args, kwargs, dynamic=not any(e.recaptured for e in same_structure))
        except (CaptureError, UnpairedOutputError) as err:
            # a graph that measures another stream than the largest still caches right (HunyuanVideo
            # with more text than image tokens: no capture at those sizes pairs the middle)
            for entry in fitting:
                if entry not in same_structure and self._still_valid(entry, leaves, original):
                    self._warn_once(
                        "stream kept", "dittofx: %s: at these sizes another stream than the one its graph measures is the "
                        "largest, and no graph measuring that one could be made (%s): the graph goes on measuring its own",
                        type(self.model).__name__, err,
                    )  # fmt: skip
                    return serve(entry)
            self.uncapturable[sizes] = err
            raise
        entry.recaptured = bool(same_structure)
        entry.context = context
        self._warn_if_numbers_change(sizes, entry, checked=False)
        entry.state_shapes[sizes] = _state_shapes(entry, leaves)
        self.entries.append(entry)
        return entry, sizes

    def _warn_if_numbers_change(self, sizes: tuple, serving: Entry, checked: bool) -> None:
        """Python-number inputs that changed value since an earlier call, now served by `serving`
        (`checked`: a graph already there, checked against the model's own forward at these inputs).
        A number the graph bakes in is a capture per value: a timestep passed as a float is a
        capture per call, ints that cannot stay symbolic (NucleusMoE keys an lru_cache on its
        `img_shapes`) a capture per resolution. An int kept symbolic costs a run of the model's own
        forward per new value: said where it changed while no tensor size did (a per-call int)."""
        context, (spec, leaves) = sizes
        for entry in self.entries:
            for other_context, (other_spec, other) in entry.state_shapes:
                if other_context != context or other_spec != spec or len(other) != len(leaves):
                    continue
                differ = {i: (a, b) for i, (a, b) in enumerate(zip(other, leaves)) if a != b}
                numbers = {i: (a[2], b[2]) for i, (a, b) in differ.items() if a[0] == b[0] == "V" and _is_number(a[2]) and _is_number(b[2])}
                sized = [a for a, b in differ.values() if a[0] == b[0] == "T" and a[1:3] == b[1:3]]
                if not numbers or len(numbers) + len(sized) != len(differ):
                    continue
                changed = ", ".join(f"{a!r} -> {b!r}" for a, b in numbers.values())
                if any(i not in serving.captured.dynamic_dims for i in numbers):
                    self._warn_once(
                        "numbers captured",
                        "dittofx: a Python-number input of %s changed value (%s): each value is captured as its own graph "
                        "(seconds per capture on a large model; under torch.compile each is compiled too, and dynamo's "
                        "recompile limit, 64, runs out after about 30 of them). Pass numbers that change per step, such as "
                        "the timestep, as tensors; sizes given as ints that the forward cannot take symbolically make a "
                        "graph per resolution.", type(self.model).__name__, changed,
                    )  # fmt: skip
                elif checked and not sized:
                    self._warn_once(
                        "numbers checked",
                        "dittofx: a Python-number input of %s changed value (%s) with no tensor size changing: the graph "
                        "keeps it symbolic, but each new value is checked once against the model's own forward (an uncached "
                        "run of it): once per value for sizes given as numbers (a new orientation at the same token count), "
                        "at every call for a number that changes per call, such as a timestep, which is better passed as a "
                        "tensor.",
                        type(self.model).__name__, changed,
                    )  # fmt: skip
                return

    def _still_valid(self, entry: Entry, leaves: list, original: Callable[[], list]) -> bool:
        """A graph with symbolic dims runs at new sizes only if export traced no size-dependent
        Python as if it were size-independent (diffusers' PatchEmbed compares its sizes in Python
        and keeps a table for the first ones; export does not always guard that). So the first call
        at new sizes checks the captured graph against the original forward's leaves (`original`,
        run once however many graphs are checked), once."""
        graph = entry.captured
        with torch.no_grad():
            try:
                got = graph.gm(*entry.live_state(), *graph.constants, *leaves)
            except RuntimeError:
                return False
            want = original()
        return len(got) == len(want) and all(close_at_scale(g, w, 1e-3) for g, w in zip(got, want) if isinstance(w, torch.Tensor))

    @contextlib.contextmanager
    def _as_original(self):
        """The model with its own forward back (and our pre-hook idle), e.g. to capture it."""
        model = self.model
        ours = model.__dict__.pop("forward", None)
        if self._saved["forward"] is not None:
            model.forward = self._saved["forward"]
        self.capturing = True
        try:
            yield model
        finally:
            self.capturing = False
            model.__dict__.pop("forward", None)
            if ours is not None:
                model.forward = ours

    def _original_forward(self, args: tuple, kwargs: dict) -> Any:
        """The model's own forward on these inputs, hooks included. Through `_call_impl`: after
        `model.compile()` the module's call is a compiled one, and dynamo would compile the plain
        forward at every size checked (under fullgraph=True, raise on its graph breaks)."""
        with self._as_original() as model:
            return model._call_impl(*args, **kwargs)

    def _capture(self, args: tuple, kwargs: dict, dynamic: bool) -> CapturedGraph:
        self.forward_error = None
        with self._as_original() as model:
            try:
                return capture(model, args, kwargs, dynamic)
            except Exception:
                pass
            # some models build tables lazily on their first eager call (e.g. rope caches); an error
            # of that call is the model's own on these inputs (a wrong shape), raised as it is
            try:
                with torch.no_grad():
                    model._call_impl(*args, **kwargs)  # (not a compiled call: `_original_forward`)
            except Exception as own:
                self.forward_error = own
                raise
            try:
                return capture(model, args, kwargs, dynamic)
            except Exception as err:
                raise CaptureError(
                    f"{type(model).__name__}.forward cannot be captured as one graph with torch.export "
                    f"({type(err).__name__}: {str(err).splitlines()[0][:200]}), at {_model_frame(err)}. "
                    f"Data-dependent Python (.tolist(), .item(), .numpy() driving loops or shapes) blocks capture."
                ) from err

    def _build(self, args: tuple, kwargs: dict, dynamic: bool = True) -> Entry:
        cfg = self.cfg
        if self.group is None and context_parallel_group(self.model) is not None:
            # each rank would decide on its own shard alone, and a rank that skips the middle
            # blocks' collectives while another runs them hangs both
            raise ValueError(
                f"{type(self.model).__name__}: diffusers' context parallelism was enabled after dittofx.optimize; "
                f"enable it first: model.enable_parallelism(...), then dittofx.optimize(model, ...) (diffusers "
                f"allows enable_parallelism once per model, so start from a freshly loaded one)"
            )
        captured = self._capture(args, kwargs, dynamic)
        if captured.static_because:
            self._warn_once(
                "static capture", "dittofx: %s was captured with every size fixed: export could not keep its sizes "
                "symbolic (%s); each new resolution or batch size is a capture of its own (and a recompile under "
                "torch.compile)", type(self.model).__name__, captured.static_because,
            )  # fmt: skip
        self._watch()
        self._stateful = structure.stateful_modules(self.model)
        switches = structure.python_state(self._stateful)
        # inputs that are tensors: a Python number is baked into the graph (no timestep to watch)
        opts = self._options([n.name for n in captured.user_placeholders() if isinstance(n.meta.get("val"), torch.Tensor)])
        built = rewrite_captured(captured, self.model, cfg, opts, split=self.split is not None or self.replays is not None)
        self._warn_if_blocks_compiled(built.chain.lists)
        self._warn_if_middle_empty(len(built.chain.blocks), built.chain.lists)
        return Entry(
            captured=captured,
            chain=built.chain,
            partition=built.partition,
            graphs=built.graphs,
            slots=[resolve_state(self.model, f) for f in captured.state_fqns],
            key=input_key(args, kwargs, captured.dynamic_dims),
            state_nodes=built.state_nodes,
            region_counts=built.region_counts,
            pruned_blocks=built.pruned_blocks,
            blocks=structure.block_ids(self.model, built.chain.lists),
            switches=switches,
            held=tuple(getattr(m, "processor", None) for m in self._stateful),
        )

    def _warn_if_middle_empty(self, n_blocks: int, lists: list[str]) -> None:
        """Fn + Bn = every block of the chain (SPEC allows it): a cached step skips nothing."""
        cfg = self.cfg
        if cfg.Fn_compute_blocks + cfg.Bn_compute_blocks == n_blocks:
            self._warn_once(
                "middle empty",
                "dittofx: %s: this config can never cache a step: Fn_compute_blocks + Bn_compute_blocks = %d + %d = every "
                "block of the chain (%s), so no block is left between them to skip",
                type(self.model).__name__, cfg.Fn_compute_blocks, cfg.Bn_compute_blocks, ", ".join(lists),
            )  # fmt: skip

    def _warn_if_blocks_compiled(self, lists: list[str]) -> None:
        """Blocks compiled on their own (diffusers' `compile_repeated_blocks`, `module.compile()`)
        never run: the rewritten graph runs their ops on their weights, not their modules."""
        compiled = [name for name in lists for block in self.model.get_submodule(name) if getattr(block, "_compiled_call_impl", None)]
        if compiled:
            self._warn_once(
                "blocks compiled",
                "dittofx: blocks of %s (%s) were compiled on their own (diffusers' compile_repeated_blocks, or "
                "module.compile()): dittofx runs a graph of the whole forward, which does not call the block modules, "
                "so that compiles nothing; torch.compile(model, fullgraph=True) compiles the cached forward instead.",
                type(self.model).__name__, ", ".join(dict.fromkeys(compiled)),
            )  # fmt: skip

    def _options(self, input_names: list[str]) -> RewriteOptions:
        """What the step logic needs from the config, for a forward taking `input_names`."""
        cfg = self.cfg
        acc_limit = cfg.max_accumulated_residual_diff_threshold
        opts = RewriteOptions(
            threshold=float(cfg.rel_l1_thresh if self.teacache else cfg.residual_diff_threshold),
            acc_limit=float("inf") if acc_limit is None else float(acc_limit),
            max_warmup_steps=cfg.max_warmup_steps,
            warmup_interval=cfg.warmup_interval,
            max_cached_steps=cfg.max_cached_steps,
            max_continuous_cached_steps=cfg.max_continuous_cached_steps,
            timestep_input=timestep_input(input_names),
            has_mask=cfg.has_mask,
            static_mask=cfg.steps_computation_policy == "static",
            group=self.group,
            teacache_coefficients=self.coefficients,
            last_step_computes=cfg.last_step_computes,
            gap_in_timesteps=cfg.taylorseer_gap == "timestep",
            newton=cfg.enable_taylorseer and cfg.taylorseer_interpolation == "newton",
        )
        if opts.gap_in_timesteps and opts.timestep_input is None:
            raise ValueError(
                f"taylorseer_gap='timestep': {type(self.model).__name__}.forward has no timestep input (named one of "
                f"{TIMESTEP_INPUTS}; inputs: {input_names}); allowed here: 'steps'"
            )
        if opts.timestep_input is None and self.num_steps is None:
            self._warn_once(
                "no timestep",
                "dittofx: %s.forward has no timestep input (a tensor named one of %s; tensor inputs: %s) and the request length is unknown: "
                "a new request cannot be told, so its first steps may be served from the last request's residuals. Set "
                "num_inference_steps in the config, or call dittofx.refresh(model, num_inference_steps=T) (or dittofx.reset) "
                "before each request (dittofx.optimize(pipe) does it at every pipeline call).",
                type(self.model).__name__, TIMESTEP_INPUTS, input_names,
            )  # fmt: skip
        return opts

    def _state_for(self, branch: str, entry: Entry, sizes: tuple, device: torch.device, args: tuple, kwargs: dict) -> CacheState:
        shapes = entry.state_shapes[sizes]
        want = (shapes[0], tuple(shapes[1:]), entry.state_nodes[0].meta["val"].dtype, device)
        state = self.states[branch] if branch in self.states else None
        if state is None or state.shapes != want:  # first call, or new sizes (or dtype): a new state
            new = self.new_state(entry, sizes, device)
            step, _ = self.host.get(branch, (0, False))
            if self.num_steps is not None:  # SPEC §3: the request ends after its length
                goes_on = 0 < step < self.num_steps
            else:  # a new request is told by its timestep
                goes_on = state is not None and not self._timestep_rose(state, args, kwargs)
            if state is not None and goes_on:
                if self.num_steps is not None:
                    self._warn_restart(branch, step)
                _go_on_with_request(state, new)
                self.host[branch] = (step, False)
            else:
                self.host.pop(branch, None)
            self.states[branch] = state = new
        return state

    def _timestep_rose(self, state: CacheState, args: tuple, kwargs: dict) -> bool:
        """Whether this call's timestep is above the state's last one: a new request (SPEC §3's
        rule for an unknown length). Read on the host: one sync, only where the sizes changed
        and the length is unknown."""
        timestep = self._timestep_of(args, kwargs)
        if not isinstance(timestep, torch.Tensor) or timestep.numel() == 0:
            return False
        return bool(timestep.reshape(-1)[0].float().cpu() > state.last_ts.cpu())

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def _watch_timesteps(self, branch: str, args: tuple, kwargs: dict) -> None:
        """Request length unknown: SPEC §3 starts a new request at every call whose timestep rose.
        A model whose timesteps rise within a request (Lumina2 runs t from 0 to 1) then starts one
        at every call, and nothing caches: said when a branch's first calls' timesteps never fell and
        rose (two or more calls a step on one shared state see t0, t0, t1, ...). They are copied
        to the host without a sync (non-blocking, into pinned memory on CUDA) and read once the
        copies are done, at a later call."""
        if self.num_steps is not None:
            return
        watch = self._first_timesteps.get(branch)
        if watch is None:
            watch = self._first_timesteps[branch] = _TimestepWatch()
        if watch.done:
            return
        if not watch.full():
            watch.add(self._timestep_of(args, kwargs))
            return
        if not watch.ready():
            return
        seen = watch.values()
        if all(b >= a for a, b in zip(seen, seen[1:])) and seen[-1] > seen[0]:
            self._warn_once(
                "rising timesteps",
                "dittofx: %s's timestep rose over its first calls on branch %r (%s) and the request length is unknown: "
                "SPEC §3 then starts a new request at every call whose timestep rose, so every step starts one and nothing "
                "caches. Set num_inference_steps in the config, or call dittofx.refresh(model, num_inference_steps=T) before "
                "each request (dittofx.optimize(pipe) does it at every pipeline call).",
                type(self.model).__name__, branch, ", ".join(f"{t:.4g}" for t in seen),
            )  # fmt: skip

    def _timestep_of(self, args: tuple, kwargs: dict) -> Any:
        """The call's timestep input (TIMESTEP_INPUTS), if the forward has one."""
        name = timestep_input(self.forward_signature.parameters)
        return bind_arguments(self.forward_signature, args, kwargs).get(name) if name else None

    def _warn_restart(self, branch: str, step: int) -> None:
        """A fresh state in the middle of a request (calls of one step at different sizes on one
        branch restart it at every call, and nothing caches)."""
        self._warn_once(
            "restart",
            "dittofx: %s's inputs changed sizes (or dtype) at step %d of a request of %d on branch %r: what it stored "
            "goes (computed steps until residuals are stored again; the request's step count goes on). Calls of "
            "different sizes within one step each count as a step and let nothing cache: give them their own branches "
            "(transformer.cache_context); a new request before the last one ended: dittofx.reset between them.",
            type(self.model).__name__, step, self.num_steps, branch,
        )  # fmt: skip

    def new_state(self, entry: Entry, sizes: tuple, device: torch.device) -> CacheState:
        """A fresh state for `entry`'s graph at these input sizes (a new branch, or an export)."""
        shapes = entry.state_shapes[sizes]

        def like(node: fx.Node, shape: tuple[int, ...]) -> torch.Tensor:
            return torch.empty(shape, dtype=node.meta["val"].dtype, device=device)

        p_like = like(entry.state_nodes[0], shapes[0])
        carried = [like(o, shape) for o, shape in zip(entry.state_nodes[1:], shapes[1:])]
        return self._state_like(p_like, carried, p_slots=len(entry.pruned_blocks) or 1)

    def _state_like(self, p_like: torch.Tensor, carried: list[torch.Tensor], p_slots: int = 1) -> CacheState:
        # Taylor derivatives are differences of differences: kept in fp32
        residual_dtype = torch.float32 if self.cfg.enable_taylorseer else None
        return CacheState(
            p_like, carried, self.cfg.levels, self.num_steps, self.mask(), residual_dtype, p_slots=p_slots, norms=self.prune
        )

    def blockwise_state(self, branch: str, hidden: str, h_fn: torch.Tensor, entering: list[torch.Tensor]) -> CacheState | None:
        """The branch's state for the block-by-block path; None when there is none for this hidden
        stream and these sizes (of the streams entering the middle): the step's stores allocate it."""
        state = self.states[branch] if branch in self.states else None
        return state if state is not None and getattr(state, "blockwise_key", None) == _blockwise_key(hidden, h_fn, entering) else None

    def new_blockwise_state(
        self, branch: str, hidden: str, h_fn: torch.Tensor, entering: list[torch.Tensor], outs: list[torch.Tensor]
    ) -> CacheState:
        """A fresh state for the block-by-block path: p like `h_fn`, residuals like the middle's
        outputs. Sizes that change within a request (Qwen-Image 2.1's first step runs over text and
        image, the next ones over the image, the text's keys and values cached) keep the request's
        counters and history: only what was stored goes (the step computes; gate 2 after it)."""
        old = self.states[branch] if branch in self.states else None
        state = self._state_like(h_fn, outs)
        if old is not None:
            _go_on_with_request(old, state)
        state.blockwise_key = _blockwise_key(hidden, h_fn, entering)
        self.states[branch] = state
        return state

    def _host_decision(self, branch: str) -> tuple[str, tuple[int, bool] | None]:
        """Decide on the host what the host can know (SPEC §3 gates 1-3: warmup, nothing stored,
        a mask's 1, a static mask's 0), so those steps run a graph without torch.cond (CUDA graphs
        skip graphs that hold one) and never sync. The rest is left to the device ("device").
        The host counts steps only when the request length is known: otherwise a new request is
        only visible in the timestep, on the device. Returns the decision and the branch's count
        once this step has run (None: not counted), for the caller to keep when it does run."""
        cfg, steps = self.cfg, self.num_steps
        if steps is None:
            if self.teacache:
                self._warn_once(
                    "teacache length",
                    "dittofx: TeaCache on %s with the request length unknown: SPEC §6 computes the last step, which cannot be "
                    "told, so only a request's first step is sure to compute. Set num_inference_steps in the config, or call "
                    "dittofx.refresh(model, num_inference_steps=T) before each request (dittofx.optimize(pipe) does it at every "
                    "pipeline call).", type(self.model).__name__,
                )  # fmt: skip
            return "device", None
        step, stored = self.host.get(branch, (0, False))
        if step >= steps:  # the device state resets itself at the same point
            step, stored = 0, False
            if self.pipeline_call is not None and branch == "default":
                self._warn_shared_state(steps)
        mask = self.mask()
        if (step < cfg.max_warmup_steps and step % cfg.warmup_interval == 0) or not stored:
            decision = "compute"
        elif cfg.last_step_computes and step == steps - 1:
            decision = "compute"
        elif mask is not None and step < len(mask) and mask[step] == 1:
            decision = "compute"
        elif mask is not None and cfg.steps_computation_policy == "static":
            decision = "cache"
        else:
            decision = "device"
        return decision, (step + 1, True)

    def _warn_shared_state(self, steps: int) -> None:
        """More calls than the pipeline's timesteps in one of its calls, unnamed and sharing one
        state (SPEC §3's default): the state restarts mid-request."""
        if self.cfg.enable_separate_cfg is not None:
            return
        self._warn_once(
            "shared state",
            "dittofx: %s called %s more than the %d times it runs timesteps, within one call and without naming the calls "
            "(transformer.cache_context): with enable_separate_cfg=None every call shares one state, which counts each call as a "
            "step, so it restarts in the middle of the request and compares residuals across the calls of a step. Where every "
            "step makes the same calls (cond, then uncond), enable_separate_cfg=True separates them by call parity "
            "(cfg_compute_first=True when uncond comes first); where some steps make fewer (Lumina2's cfg_trunc_ratio < 1 drops "
            "uncond late in sampling), parity mixes the branches too and only names set with transformer.cache_context "
            "separate them. enable_separate_cfg=False keeps one state and silences this.",
            self.pipeline_call, type(self.model).__name__, steps,
        )  # fmt: skip

    def mask(self) -> list[int] | None:
        """The steps computation mask for the current request length (memoized per length)."""
        if self.num_steps not in self._masks:
            self._masks[self.num_steps] = self._make_mask()
        return self._masks[self.num_steps]

    def _make_mask(self) -> list[int] | None:
        cfg = self.cfg
        if cfg.steps_computation_mask is not None:
            return list(cfg.steps_computation_mask)
        if cfg.steps_mask_policy is None:
            return None
        if self.num_steps is None:
            raise ValueError(
                f"scm_steps_mask_policy={cfg.steps_mask_policy!r} needs the request length: set num_inference_steps "
                f"in the config or call dittofx.refresh(model, num_inference_steps=T) before the first call"
            )
        return steps_mask(mask_policy=cfg.steps_mask_policy, total_steps=self.num_steps)

    def prepare(self, args: tuple, kwargs: dict) -> tuple[Entry, tuple, torch.device, list] | str | None:
        """The graph for these inputs (captured if needed), their sizes, device and leaves; no step
        is counted. None: the forward cannot be captured and runs block by block (decided on the
        first call). UNCACHED: these inputs have no graph while others have (say, a PixArt under
        autocast after calls without: its middle cannot be paired), so they run as the model's own
        forward (said once)."""
        if self.blockwise is not None:
            return None
        leaves, spec = flatten_inputs(args, kwargs, self._plain_specs)
        try:
            entry, sizes = self._entry_for(args, kwargs, leaves, spec)
        except (CaptureError, UnpairedOutputError) as err:  # no graph to rewrite
            if self.entries:
                self._warn_once(
                    "uncached inputs", "dittofx: %s: inputs with no graph to rewrite, while earlier ones had: they run "
                    "uncached, as the model's own forward (%s)", type(self.model).__name__, err,
                )  # fmt: skip
                return UNCACHED
            self._fall_back_to_blocks(args, kwargs, err)
            return None
        return entry, sizes, _constants_on_inputs_device(entry, leaves), leaves

    def static_entry(self, args: tuple, kwargs: dict) -> tuple[Entry, tuple, torch.device]:
        """A graph of these inputs' shapes only, kept apart from the engine's own, and its sizes and
        device: for export, which specializes the program to its example shapes anyway. (From a
        symbolic capture, sizes pass between the regions as SymInt operands of the cond; at static
        shapes export makes them ints, and its placeholder naming then fails: FLUX, SD3, ...)"""
        leaves = pytree.tree_leaves((args, kwargs))
        try:
            entry = self._build(args, kwargs, dynamic=False)
        finally:
            self.forward_error = None  # only the pre-hook asks whose error it was (its traceback holds tensors)
        sizes = input_key(args, kwargs, {})
        entry.state_shapes[sizes] = _state_shapes(entry, leaves)
        return entry, sizes, _constants_on_inputs_device(entry, leaves)

    def _fall_back_to_blocks(self, args: tuple, kwargs: dict, err: CaptureError | UnpairedOutputError) -> None:
        """Cache block by block in eager Python (`blockwise.py`), or raise `err` saying why not."""
        if self.prune:
            raise type(err)(f"{err} The block-by-block fallback serves method='dbcache' and 'teacache' only.") from err.__cause__
        run = lambda: self._original_forward(args, kwargs)  # noqa: E731
        try:
            chain = learn_chain(self.model, run, self.cfg.blocks)
            blockwise = Blockwise(self, chain, self.cfg.Fn_compute_blocks, self.cfg.Bn_compute_blocks)
            self._warn_if_middle_empty(len(chain), chain.lists)
            self.options = self._options(list(self.forward_signature.parameters))
            blockwise.install()
            try:
                blockwise.replay_check(run)
            except BaseException:
                blockwise.remove()
                raise
        except BlockwiseConfigError:  # the config does not fit this chain: a ValueError naming the field
            raise
        except (BlockwiseError, ModulationNotFound) as why:
            raise type(err)(f"{err} Caching block by block in eager Python instead is not possible either: {why}.") from err.__cause__
        self.blockwise = blockwise
        self._watch()  # a block swapped would run unwrapped
        captured = isinstance(err, UnpairedOutputError)
        self.path = "eager, block by block " + ("(the graph's middle cannot be paired)" if captured else "(the forward cannot be captured)")
        reason = f"{type(self.model).__name__}'s graph: {err}." if captured else str(err).split(" Data-dependent Python")[0]
        log.warning(
            "dittofx: %s Caching block by block in eager Python instead (%s, %d blocks): each step decided on the "
            "device syncs the host, and under torch.compile the decision is a graph break (fullgraph=True cannot hold it).",
            reason, " -> ".join(chain.lists), len(chain),
        )  # fmt: skip

    def _forward_of_model(self) -> Callable:
        return self._saved["forward"] or types.MethodType(type(self.model).forward, self.model)

    @functools.cached_property
    def forward_signature(self) -> inspect.Signature:
        """The model's own forward's: its timestep input, a call's bound arguments, its keyword order."""
        return inspect.signature(self._forward_of_model())

    @functools.cached_property
    def _keyword_rank(self) -> dict[str, int]:
        """The forward's parameter names -> their position."""
        return {name: i for i, name in enumerate(self.forward_signature.parameters)}

    def _blockwise_call(self, args: tuple, kwargs: dict) -> None:
        if self.replays is not None:
            self._warn_once(
                "own graphs", "dittofx: cuda_graphs=True has no graph to capture: %s runs block by block in eager Python.",
                type(self.model).__name__,
            )  # fmt: skip
        branch = self._branch()
        self._watch_timesteps(branch, args, kwargs)
        decision, counted = self._host_decision(branch)
        state = self.states[branch] if branch in self.states else None  # (the step may make a new one: it computes)
        decision = self._reuse_first_branch(branch, decision, state)
        self._remember(branch, decision, state)
        name = self.options.timestep_input
        timestep = bind_arguments(self.forward_signature, args, kwargs).get(name) if name else None
        self.blockwise.start(branch, decision, timestep if isinstance(timestep, torch.Tensor) else None, counted)
        self.ran = True

    def pre_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...] | None:
        """Pick this call's graph and gather its leading inputs; for a step split at its decision,
        run the head and return its tensors."""
        self._refuse_a_forward_that_moves_weights()
        self._end_request_after_uncached()
        self._capture_again_if_changed()
        if self.length_from_pipeline and self.pipeline_call is None:
            self._outside_its_pipeline()
        if torch.is_grad_enabled() and "grad" not in self._warned:
            self._warn_if_training(args, kwargs)
        prepared = self.prepare(args, kwargs)
        if prepared is None:
            return self._blockwise_call(args, kwargs)
        if prepared is UNCACHED:
            self.uncached_branch, self.uncached_returned = self._branch(), False
            self.current, self.ran = None, True
            return None
        entry, sizes, device, leaves = prepared
        branch = self._branch()
        state = self._state_for(branch, entry, sizes, device, args, kwargs)
        self._watch_timesteps(branch, args, kwargs)
        (decision, counted), head = self._host_decision(branch), ()
        decision = self._reuse_first_branch(branch, decision, state)
        how = self._split_how() if decision == "device" else None
        if how is not None or (decision == "device" and self._host_reads_for_own_graphs(device)):
            head = self._run_head(entry, self._leading(entry, "split-head", state), leaves, branch, state, how)
            decision = "split-cache" if bool(head[0]) else "split-compute"  # the step's one host sync
        elif (
            decision == "device" and self.replays is None and self.split is not UNDER_CUDA_GRAPHS  # else it would have split
            and "cond without CUDA graphs" not in self._warned and cuda_graphs_in_use(device)
        ):  # fmt: skip
            self._warn_once(
                "cond without CUDA graphs",
                "dittofx: CUDA graphs are in use in this process (torch.compile mode='reduce-overhead' or 'max-autotune'); "
                "if %s runs under them, its steps decided on the device run without: their graph holds a torch.cond, for "
                "which inductor records no CUDA graph (on an H100, PixArt-512 with a threshold ran 2.1x slower than "
                "uncached). %s",
                type(self.model).__name__,
                "DBPrune has no cond-free form of those steps: compile without CUDA graphs." if self.prune else
                "split_at_decision={'mode': 'reduce-overhead'} keeps CUDA graphs for them (as its default does for a model "
                "called under a torch.compile that records CUDA graphs).",
            )  # fmt: skip
        if counted is not None:  # the step runs (a head that raised did not): the host counts it
            self.host[branch] = counted
        self._remember(branch, decision, state)
        graph = entry.graphs[decision]
        if self.replays is not None:
            graph = self.replays.get(decision, entry.graphs, branch, state, [*leaves, *head])
        self.current = (graph, entry, self._leading(entry, decision, state))
        self.ran = True
        return head or None

    def _warn_if_training(self, args: tuple, kwargs: dict) -> None:
        """A call with grad enabled that looks like a training step: inputs that require grad, or a
        model in train() mode with parameters that do (a fine-tune). Said once: the forward runs under
        no_grad, so backward would fail with torch's generic 'does not require grad'."""
        if any(isinstance(x, torch.Tensor) and x.requires_grad for x in pytree.tree_leaves((args, kwargs))):
            why = "got inputs that require grad"
        elif self.model.training and any(p.requires_grad for p in self.model.parameters()):
            why = "is in train() mode with parameters that require grad"
        else:
            return
        self._warn_once(
            "grad", "dittofx: %s %s: dittofx is for inference, its forward runs under torch.no_grad() (the output has "
            "no graph to backpropagate); dittofx.disable(model) to train it.", type(self.model).__name__, why,
        )  # fmt: skip

    def _reuse_first_branch(self, branch: str, decision: str, state: Any) -> str:
        """cfg_diff_compute_separate=False (SPEC §3): a step of the second CFG branch takes the
        first branch's decision of the same step, with no diff of its own (the first is cond, or
        uncond with cfg_compute_first). Only for steps the device would decide (the host decides
        the others alike for both), where the first branch made this step (it ran once more than
        this one) and this branch's state is the one of its last call (a new state computes). A
        decision the first made in its graph is read from its state: on the torch.cond and split
        paths that is the sync the second's own decision would have cost; with cuda_graphs'
        conditional nodes, where a decision costs none, it adds one."""
        first_name = "uncond" if self.cfg.cfg_compute_first else "cond"
        if self.cfg.cfg_diff_compute_separate or decision != "device" or branch not in ("cond", "uncond") or branch == first_name:
            return decision
        first, mine = self.latest.get(first_name), self.latest.get(branch)
        if first is None or mine is None or first.number != mine.number + 1 or mine.state not in (None, state):
            return decision  # (None: block by block, the state was made during that call)
        return first.decision if first.decision != "device" else _decision_in(first.state) or decision

    def _remember(self, branch: str, decision: str, state: Any) -> None:
        if not self.cfg.cfg_diff_compute_separate:
            mine = self.latest.get(branch)
            number = (mine.number if mine else 0) + 1
            self._warn_if_second_runs_first(branch, number)
            self.latest[branch] = _BranchCall(number, decision.removeprefix("split-"), state)
            self.latest_branch = branch

    def _warn_if_second_runs_first(self, branch: str, number: int) -> None:
        """Named branches (`cache_context`) in the other order than cfg_compute_first says: the
        second ran this step before the first, so it could not take the first's decision."""
        first, second = ("uncond", "cond") if self.cfg.cfg_compute_first else ("cond", "uncond")
        other = self.latest.get(second)
        if branch == first and self.latest_branch == second and other is not None and other.number == number:
            self._warn_once(
                "branch order",
                "dittofx: cfg_diff_compute_separate=False: %s runs %r before %r in a step, so %r cannot take the "
                "decision of %r (made after it) and decides on its own; set cfg_compute_first=%s",
                self.pipeline_call or type(self.model).__name__, second, first, second, first, not self.cfg.cfg_compute_first,
            )  # fmt: skip

    def _watch(self) -> None:
        structure.watch(self.model, self)
        self.watched = True

    def structure_changed(self, module: torch.nn.Module, submodule: Any, why: str) -> None:
        """A submodule was registered anew in the model (structure.watch). Block by block, only
        the block lists matter: every other module runs as it is."""
        if self.blockwise is None or isinstance(module, torch.nn.ModuleList) or isinstance(submodule, torch.nn.ModuleList):
            self.changed = self.changed or why

    def _stale(self) -> str | None:
        """What changed since the graphs (or the block-by-block wrappers) were made, of what the
        registration hook cannot see: blocks deleted or inserted, peft's and the processors' switches."""
        if self.blockwise is not None:  # its chain holds the blocks it wrapped (a deep copy's, its own)
            now = structure.block_ids(self.model, self.blockwise.chain.lists)
            wrapped = sorted(map(id, self.blockwise.chain.modules))
            return "blocks added to or removed from its block lists" if now is None or sorted(sum(now, ())) != wrapped else None
        switches = structure.python_state(self._stateful) if self.entries else ()
        for entry in self.entries:
            if structure.block_ids(self.model, entry.chain.lists) != entry.blocks:
                return "blocks added to or removed from its block lists"
            if entry.switches != switches:
                return SWITCHED
        return None

    def _capture_again_if_changed(self) -> None:
        """Drop the graphs (and the blocks' wrappers) when the model changed in a way they cannot
        see (structure.py); the call then captures again. What the hook cannot tell is read at a
        request's start only (each call where the length is unknown): peft's layers can be hundreds."""
        if not self.watched and (self.entries or self.blockwise is not None):  # a deep copy's first call
            self._watch()
        starting = self.num_steps is None or not self.host or any(s >= self.num_steps for s, _ in self.host.values())
        why = self.changed or (self._stale() if starting else None)
        if why is None:
            return
        if self.entries or self.blockwise is not None:
            self._warn_once(
                "captured again",
                "dittofx: %s changed since its graph was captured (%s): capturing it again at this call, or taking "
                "back the graphs of switches seen before (said once; under torch.compile a recompile follows)",
                type(self.model).__name__, why,
            )  # fmt: skip
        if self.blockwise is not None:
            self.blockwise.remove()
            self.blockwise, self.path = None, "torch.export graph"
        self._shelve_or_forget(why)
        self.entries, self.current, self.changed, self._stateful = [], None, None, []
        self.uncapturable.clear()
        if self.replays is not None:
            self.replays = Replays()
        self._take_from_shelf()

    def _shelve_or_forget(self, why: str) -> None:
        """Switches only (set_adapters, a processor set): the graphs stay valid for the switches
        they were captured at, so they are kept for a switch back (A -> B -> A captures, and under
        torch.compile recompiles, nothing the second time: dynamo keeps the code it compiled for
        them). A module registered or a block list changed: the graphs of every switch are stale."""
        if why == SWITCHED and self.entries:
            self._shelf.pop(self.entries[0].switches, None)
            self._shelf[self.entries[0].switches] = self.entries
            while len(self._shelf) > SHELF_SIZE:
                self._shelf.pop(next(iter(self._shelf)))
        else:
            self._shelf.clear()

    def _take_from_shelf(self) -> None:
        if self._shelf:
            stateful = structure.stateful_modules(self.model)
            entries = self._shelf.pop(structure.python_state(stateful), None)
            if entries is not None:
                self.entries, self._stateful = entries, stateful

    def _host_reads_for_own_graphs(self, device: torch.device) -> bool:
        """cuda_graphs without conditional nodes: steps decided on the device run split (head
        replay, host read, tail replay), as with split_at_decision=True; said once."""
        if self.replays is None or device.type not in own_graphs.CAPTURED_ON or own_graphs.conditional_nodes():
            return False
        self._warn_once(
            "no conditional nodes",
            "dittofx: cuda_graphs=True: this torch captures no CUDA-graph conditional nodes (CUDA %s, torch %s), so %s's "
            "steps decided on the device run as a head replay, the host's read of the decision, and a tail replay (as "
            "with split_at_decision=True)", torch.version.cuda, torch.__version__, type(self.model).__name__,
        )  # fmt: skip
        return True

    def _leading(self, entry: Entry, graph: str, state: CacheState) -> list[torch.Tensor | None]:
        """The graph's leading inputs as one plain list, gathered here rather than inside the
        compiled forward: dynamo keeps module buffers at static shapes (every new resolution's fresh
        state would recompile; list items get automatic dynamic shapes), and walking entry.slots
        there cost ~6 guards per weight, evaluated on every call. dittofx's own CUDA graphs check
        every one's address, so they get them all."""
        if self.replays is not None:
            return [*state.tensors(), *entry.live_state(), *entry.captured.constants]
        return entry.leading(graph, state.tensors())

    def _split_how(self) -> Any:
        """How this step decided on the device runs its split head: None (not split: the step runs
        its torch.cond), EAGER, torch.compile arguments, or (UNDER_CUDA_GRAPHS) the context of the
        torch.compile the model's call runs under, where that records CUDA graphs (compile_context.py)."""
        if self.split is UNDER_CUDA_GRAPHS:
            context = enclosing_compile()
            return context if context is not None and records_cuda_graphs(context) else None
        return self.split

    def _run_head(
        self, entry: Entry, leading: list[torch.Tensor], leaves: list, branch: str, state: CacheState, how: Any
    ) -> tuple[torch.Tensor, ...]:
        """The split head (prologue, Fn, gates, diff, a cached step's path: passes/split.py), run
        here, before the forward: the forward then runs a cond-free tail, which CUDA graphs can hold."""
        if self.replays is not None:
            with torch.no_grad():
                return self.replays.get("split-head", entry.graphs, branch, state, leaves)(leading, leaves)
        if entry.head is None or entry.head_made_by is not how:
            graph = entry.graphs["split-head"]
            if how is EAGER:
                entry.head = graph
            else:
                compiling = isinstance(how, eval_frame._TorchDynamoContext)
                entry.head = how(graph) if compiling else torch.compile(graph, **{"fullgraph": True, **how})
                for t in [*entry.live_state(), *entry.captured.constants]:  # they reach it as plain inputs
                    mark_static(t)
            entry.head_made_by = how
        with torch.no_grad():
            return entry.head(*leading, *leaves)

    def _end_request_after_uncached(self) -> None:
        """The last call ran uncached and returned: its branch's request ends, so the next cached
        call there starts a new one (never going on from the earlier steps' residuals)."""
        branch, self.uncached_branch = self.uncached_branch, None
        if branch is not None and self.uncached_returned:
            if branch in self.states:
                self.states[branch].reset()
            self.host.pop(branch, None)

    @torch._dynamo.disable(
        reason="dittofx's forward pre-hook runs outside dynamo: a model optimized with cuda_graphs=True is called without "
        "torch.compile; any other is compiled as a module (torch.compile(model) or model.compile(), whose call runs its "
        "hooks first), not through a function that calls it (under fullgraph=True that compile cannot hold the hook)"
    )
    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.capturing:
            return None
        try:
            ordered = self.in_signature_order(kwargs)
            head = self.pre_call(args, ordered)
        except Exception as err:
            # a first call that failed leaves the model as it was, unless the model's own forward
            # raised on its inputs (then the next call, with good inputs, captures)
            own, self.forward_error = err is self.forward_error, None  # not kept: its traceback holds tensors
            if not self.ran and not own:
                self.detach()
                log.warning(
                    "dittofx: the first call of %s failed in dittofx (%s: %s), so dittofx.optimize was undone: the model "
                    "runs its own forward from now on", type(module).__name__, type(err).__name__, str(err).split("\n")[0],
                )  # fmt: skip
            raise
        # the pre-hook's part of the call reaches the forward as a keyword of the call: the split
        # head's tensors (empty on other steps; not through the module, where dynamo would take them
        # for static, guarded, CUDA-graph-fixed module state), and by being there it tells the
        # forward that the call went through the module's call and this pre-hook
        return args, {**ordered, HEAD_KWARG: head or ()}

    @torch._dynamo.disable(
        reason="dittofx: the model's forward was called without the module's call, so dittofx's pre-hook did not run and it "
        "runs uncached: compile the module itself (torch.compile(model) or model.compile()), not model.forward"
    )
    def forward_without_pre_hook(self, args: tuple, kwargs: dict) -> Any:
        """A forward call that skipped the module's call and so this pre-hook (`model.forward(...)`,
        `torch.compile(model.forward)`): the model's own forward, uncached, nothing counted (the
        graph of the latest module call would run on a step count this call does not advance).
        Within a capture, or re-entered (a forward wrapped around an earlier dittofx forward, saved
        by this optimize), the class forward: the saved one would call back into this."""
        if self.capturing or self._own_running:
            return type(self.model).forward(self.model, *args, **kwargs)
        self._warn_once(
            "forward called", "dittofx: %s.forward was called directly (model.forward(...) or torch.compile(model.forward)), "
            "not through the module's call, so dittofx's pre-hook did not run: it runs uncached. Call the model "
            "(model(...)), compile the module (torch.compile(model) or model.compile()), and do not register forward "
            "pre-hooks after dittofx.optimize that drop keywords", type(self.model).__name__,
        )  # fmt: skip
        self._own_running = True
        try:
            return self._forward_of_model()(*args, **kwargs)
        finally:
            self._own_running = False

    def in_signature_order(self, kwargs: dict) -> dict:
        """`kwargs` in the order of the forward's parameters (names it does not list last, as given):
        a graph takes the call's inputs in their flattened order, so callers passing the same
        keywords in another order (pipelines sharing a transformer) would each get graphs of their own."""
        rank, names = self._keyword_rank, list(kwargs)
        ordered = sorted(names, key=lambda name: rank.get(name, len(rank)))
        return kwargs if ordered == names else {name: kwargs[name] for name in ordered}


HEAD_KWARG = "_dittofx_head"
EAGER, UNDER_CUDA_GRAPHS = "eager", "under CUDA graphs"  # split_at_decision=True; its default
OUTSIDE_ITS_PIPELINE = (
    "is called outside the pipeline that dittofx.optimize was given, whose calls set its request length (a pipeline "
    "made with from_pipe shares this transformer): dittofx.optimize that pipeline too, or "
    "dittofx.refresh(transformer, num_inference_steps=T) before each request, keeps the length known"
)
UNCACHED = "uncached"  # Engine.prepare: these inputs run as the model's own forward
SWITCHED = "adapters (peft) or attention processors switched"  # Engine._stale: graphs kept for a switch back
SHELF_SIZE = 8  # switches whose graphs are kept


def cuda_graphs_in_use(device: torch.device) -> bool:
    """Whether inductor's CUDA-graph trees hold a manager for `device` in this thread: some function
    compiled with mode="reduce-overhead" has run there (torch 2.11-2.13's cudagraph_trees)."""
    if device.type != "cuda" or "torch._inductor.cudagraph_trees" not in sys.modules:
        return False
    trees = sys.modules["torch._inductor.cudagraph_trees"]
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return trees.get_manager(index, create_if_none_exists=False) is not None
    except (AssertionError, AttributeError, RuntimeError):  # no tree state in this thread, or a torch without it
        return False


def with_own_code(func: types.FunctionType) -> types.FunctionType:
    """`func` with a code object of its own. torch.compile(module) compiles the forward's frame, and
    dynamo keeps compiled entries, and counts recompiles against its limit, per code object: two
    optimized models compiled in one process (Wan 2.2's two transformers) would otherwise share
    `_cached_forward`'s entries and one recompile limit, and a call after the other model's would
    first check that model's guards. (A copy.deepcopy of an optimized model shares its original's.)"""
    own = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    own.__kwdefaults__ = func.__kwdefaults__
    return own


def _cached_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward `optimize` installs: run the rewritten graph on live weights and state (and, for
    a split step, on the head's tensors: the tail's last inputs)."""
    engine: Engine | None = getattr(self, "_dittofx", None)
    head = kwargs.pop(HEAD_KWARG, None)
    if engine is None:  # dittofx.disable ran while a forward installed after optimize still wraps this one
        return type(self).forward(self, *args, **kwargs)
    if head is None:
        return engine.forward_without_pre_hook(args, kwargs)
    if engine.blockwise is not None:
        return engine.blockwise.call(lambda: engine._forward_of_model()(*args, **kwargs))
    if engine.current is None:  # inputs with no graph (Engine.prepare): the model's own forward
        own = engine._saved["forward"]  # not _forward_of_model(): dynamo cannot trace making a bound method
        out = own(*args, **kwargs) if own is not None else type(self).forward(self, *args, **kwargs)
        engine.uncached_returned = True
        return out
    graph, entry, leading = engine.current
    inputs = [*pytree.tree_leaves((args, kwargs)), *head]
    with torch.no_grad():
        flat = graph(*leading, *inputs) if engine.replays is None else graph(leading, inputs)
    return pytree.tree_unflatten(list(flat), entry.captured.out_spec)
