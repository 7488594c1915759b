"""CUDA graphs of dittofx's own (`optimize(..., cuda_graphs=True)`).

Under torch.compile's CUDA graphs, a step decided on the device runs split at its decision: the
head graph, one host read of the decision, a cond-free tail. On an H100 (PixArt-512, 2026-11-23)
the GPU then sat idle ~375 µs a step while the host went from the read to the tail's launch:
dynamo's guard check of the forward, cudagraph trees' input checks, the runtime wrappers
(bench/split_gap.py). Here each graph is compiled by inductor (default mode, static shapes) and
captured once into a torch.cuda.CUDAGraph; a call copies its varying inputs in and replays. No
dynamo frame or cudagraph tree runs per call. A step decided on the device is one capture: the
head, then each tail under a CUDA-graph conditional node that reads the decision on the device
(CUDA >= 12.4 and torch's bindings), so no host read at all; with split_at_decision, or where
there are no conditional nodes, the host reads it between a head replay and a tail replay. Off
CUDA the compiled graphs are called as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from .state import normal_tensors

__all__ = ["DecidedStep", "GraphReplay", "Replays", "conditional_nodes"]

# device types whose graphs are captured and replayed (elsewhere the compiled graph is called as it is)
CAPTURED_ON = {"cuda"}
# all(t.data_ptr() == p for t, p at the indices), in C: in torch's CUDA builds only
_same_addresses = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)


def compiled(graph: fx.GraphModule) -> Callable[..., Any]:
    """`graph` compiled by inductor at static shapes, as a module of its own, so a code object of
    its own: dynamo counts the compiles of one code object against its recompile limit, and every
    input size (resolution) is one more."""
    return torch.compile(fx.GraphModule(graph, graph.graph), fullgraph=True, dynamic=False)


class DecidedStep:
    """A step decided on the device, as one program: the split head (prologue, Fn, gates, diff,
    and the cache path where it runs it: passes/split.py), then the tail its decision picks.
    Captured, each tail sits under a conditional node on the decision, read by the GPU;
    uncaptured (off CUDA), the host reads it."""

    def __init__(self, graphs: dict[str, fx.GraphModule]):
        self.head, self.cache, self.compute = (compiled(graphs[f"split-{side}"]) for side in ("head", "cache", "compute"))

    def __call__(self, *args: Any) -> tuple:
        head = self.head(*args)
        if head[0].is_cuda and torch.cuda.is_current_stream_capturing():
            return if_else_on_device(head[0], lambda: self.cache(*args, *head), lambda: self.compute(*args, *head))
        return tuple((self.cache if bool(head[0]) else self.compute)(*args, *head))

    def warm_up(self, *args: Any) -> None:
        """Both tails, whatever the decision: each compiles and warms up before the capture."""
        head = self.head(*args)
        self.cache(*args, *head)
        self.compute(*args, *head)


@functools.cache
def conditional_nodes() -> bool:
    """Whether this torch captures CUDA-graph conditional nodes: CUDA >= 12.4 and its bindings
    (torch 2.11 has none: they landed, then were reverted, in 2026-02/03). Asked per step: cached."""
    cuda = torch.version.cuda
    return (
        cuda is not None and torch.torch_version.TorchVersion(cuda) >= (12, 4)
        and all(hasattr(torch.cuda.CUDAGraph, f) for f in ("get_currently_capturing_graph", "begin_capture_to_if_node"))
    )  # fmt: skip


def if_else_on_device(pred: torch.Tensor, then: Callable[[], Any], otherwise: Callable[[], Any]) -> tuple:
    """`then()` captured under a CUDA-graph conditional node on `pred`, `otherwise()` under one on
    its negation, both writing one set of output tensors (what follows reads fixed addresses).
    `then`'s outputs are copied first: a tail's output may be one of its inputs. Needs
    `conditional_nodes()`: the engine reads decisions on the host where it is False."""
    graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
    graph.begin_capture_to_if_node(pred)
    try:
        outputs = tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in then())
    finally:
        graph.end_capture_to_conditional_node()
    graph.begin_capture_to_if_node(torch.logical_not(pred))
    try:
        for mine, theirs in zip(outputs, otherwise(), strict=True):
            if isinstance(mine, torch.Tensor):
                mine.copy_(theirs)
    finally:
        graph.end_capture_to_conditional_node()
    return outputs


class GraphReplay:
    """`program(*fixed, *varying)` (a compiled graph or a DecidedStep), on CUDA replayed from one
    CUDA graph.

    `fixed`: the state, weights and constants, which keep their addresses (checked at every call:
    a model moved or cast, or weights whose `.data` was swapped, need a new capture). `varying`: the call's inputs, copied into the
    graph's own input tensors, except tensors that are outputs of another replay of the same
    engine (a tail's head tensors, the same objects at every call), which the graph reads where
    they are. The warm-up runs before the capture mutate the state: it is saved and restored around
    them. `owned_outputs`: return copies (the caller may keep a step's output past the next
    replay, e.g. CFG's two calls before combining) or the graph's own tensors (the head's, read
    by the tails)."""

    def __init__(self, program: Callable[..., Any], state: list[torch.Tensor], owned_outputs: bool, replays: Replays):
        self.compiled = program
        self.state, self.owned_outputs, self.replays = state, owned_outputs, replays
        self.addresses: list[int] = []  # of `fixed`, at the capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list = []
        self.outputs: tuple = ()

    def __call__(self, fixed: list[torch.Tensor], varying: list) -> tuple:
        if self.graph is None:
            if self.state[0].device.type not in CAPTURED_ON:
                return tuple(self.compiled(*fixed, *varying))
            self._capture(fixed, varying)
        elif not self.replays.unmoved(fixed, self.addresses):
            raise RuntimeError(
                "dittofx cuda_graphs: the model's weights or cache state moved since its CUDA graph was captured (moved, "
                "cast, or weights' .data swapped): dittofx.disable the model and optimize it again"
            )
        for mine, given in zip(self.inputs, varying, strict=True):
            if isinstance(given, torch.Tensor) and given is not mine:
                mine.copy_(given)
        self.graph.replay()
        return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in self.outputs) if self.owned_outputs else self.outputs

    @normal_tensors()  # its input tensors take copies at later calls, in any mode
    def _capture(self, fixed: list[torch.Tensor], varying: list) -> None:
        on_cpu = [i for i, t in enumerate(fixed) if t.device.type == "cpu" and t.dim() > 0]
        if on_cpu and self.state[0].is_cuda:  # a pageable copy to the GPU syncs: no capture holds one
            raise RuntimeError(
                f"dittofx cuda_graphs: the model's weights or constants {on_cpu[:8]} (of the {len(fixed)} fixed inputs) are "
                f"CPU tensors, whose copy to the GPU no CUDA graph can hold: move the whole model to {self.state[0].device}"
            )
        self.inputs = [v.clone() if isinstance(v, torch.Tensor) and not self.replays.produced(v) else v for v in varying]
        args, warm_up = [*fixed, *self.inputs], getattr(self.compiled, "warm_up", self.compiled)
        saved = [t.clone() for t in self.state]
        try:
            self.graph, self.outputs = record(lambda: tuple(self.compiled(*args)), lambda: warm_up(*args), self.replays.pool())
        finally:  # the step has not run yet, whatever the warm-up did
            for t, s in zip(self.state, saved):
                t.copy_(s)
        self.addresses = self.replays.addresses(fixed)
        self.replays.outputs.update((id(o), o) for o in self.outputs if isinstance(o, torch.Tensor))


def record(run: Callable[[], tuple], warm_up: Callable[[], Any], pool: Any) -> tuple[torch.cuda.CUDAGraph, tuple]:
    """`run` captured into a CUDA graph, and the outputs of the captured call. `warm_up` runs twice
    first, on a side stream, so that compiling, autotuning and lazy initialization stay out of the
    capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            warm_up()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(torch.cuda.current_stream()):  # back on it even if an invalidated capture's end raises
        with torch.cuda.graph(graph, pool=pool):
            outputs = run()
    return graph, outputs


class Replays:
    """An engine's GraphReplays: one per graph, cache state, captured forward and input signature
    (sizes, dtypes, non-tensor values), dropped with the state they were captured on. Captures share one memory
    pool: the graphs run one after another on one stream, and what one leaves for another (its
    outputs, its inputs) stays referenced here."""

    def __init__(self) -> None:
        self.by_key: dict[tuple, GraphReplay] = {}
        self.states: dict[str, Any] = {}  # branch -> the state its replays were captured on
        self.outputs: dict[int, torch.Tensor] = {}  # id -> the replays' output tensors
        self._pool: Any = None
        self._fixed: list[torch.Tensor] | None = None  # the last call's fixed inputs, and their addresses
        self._addresses: list[int] = []
        self._indices: list[int] = []  # 0..n-1 for the C comparison

    def get(self, name: str, graphs: dict[str, fx.GraphModule], branch: str, state: Any, varying: list) -> GraphReplay:
        """The replay of graph `name` ("device": a DecidedStep of the split graphs) for this call."""
        if self.states.get(branch) is not state:  # a new state for the branch: its old captures go
            old = self.states.get(branch)
            self.by_key = {k: r for k, r in self.by_key.items() if k[1] != id(old)}
            self.outputs = {id(o): o for r in self.by_key.values() for o in r.outputs if isinstance(o, torch.Tensor)}
            self.states[branch] = state
        for v in varying:
            if not isinstance(v, (torch.Tensor, bool, int, str, type(None))):
                raise TypeError(
                    f"dittofx cuda_graphs: an input of the call is a {type(v).__name__} ({v!r}); a capture holds its value, "
                    f"so a value that changes per step would capture again every step: pass it as a tensor"
                )
        signature = tuple((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for v in varying if not self.produced(v))
        key = (name, id(state), id(graphs), signature)  # graphs: the entry's (another capture's leaves may line up alike)
        if key not in self.by_key:
            program = DecidedStep(graphs) if name == "device" else compiled(graphs[name])
            self.by_key[key] = GraphReplay(program, state.tensors(), owned_outputs=name != "split-head", replays=self)
        return self.by_key[key]

    def produced(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and self.outputs.get(id(value)) is value

    def addresses(self, fixed: list[torch.Tensor]) -> list[int]:
        """The addresses of a call's fixed inputs (where torch has no C comparison), read once per
        call: a split step's head and tail get the same list, and the tail's read (~700 tensors)
        would sit between the decision read and the tail's launch, where the GPU waits."""
        if fixed is not self._fixed:
            self._fixed, self._addresses = fixed, [t.data_ptr() for t in fixed]
        return self._addresses

    def unmoved(self, fixed: list[torch.Tensor], captured: list[int]) -> bool:
        """Whether `fixed` sit where they were captured: compared in C where torch has it (its CUDA
        builds, for cudagraph trees' own check), else from the call's addresses read once."""
        if _same_addresses is None:
            return self.addresses(fixed) == captured
        if len(self._indices) != len(fixed):
            self._indices = list(range(len(fixed)))
        return len(fixed) == len(captured) and _same_addresses(fixed, captured, self._indices)

    def pool(self) -> Any:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool
