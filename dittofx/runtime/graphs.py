"""CUDA graphs of dittofx's own (`optimize(..., cuda_graphs=True)`).

Under torch.compile's CUDA graphs, a step decided on the device runs split at its decision: the
head graph, one host read of the decision, a cond-free tail. On an H100 (PixArt-512, 2026-11-23)
the GPU then sat idle ~375 µs a step while the host went from the read to the tail's launch:
dynamo's guard check of the forward, cudagraph trees' input checks, the runtime wrappers
(bench/split_gap.py). Here each graph is compiled by inductor (default mode, static shapes) and
captured once into a torch.cuda.CUDAGraph; a call copies its varying inputs in and replays. No
dynamo frame or cudagraph tree runs per call. Off CUDA the compiled graph is called as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

__all__ = ["GraphReplay", "Replays"]

# device types whose graphs are captured and replayed (elsewhere the compiled graph is called as it is)
CAPTURED_ON = {"cuda"}


class GraphReplay:
    """`graph(*fixed, *varying)` compiled, and on CUDA replayed from one CUDA graph.

    `fixed`: the state, weights and constants, which keep their addresses (checked at every call:
    a model moved or cast, or weights whose `.data` was swapped, need a new capture). `varying`: the call's inputs, copied into the
    graph's own input tensors, except tensors that are outputs of another replay of the same
    engine (a tail's head tensors, the same objects at every call), which the graph reads where
    they are. The warm-up runs before the capture mutate the state: it is saved and restored around
    them. `owned_outputs`: return copies (the caller may keep a step's output past the next
    replay, e.g. CFG's two calls before combining) or the graph's own tensors (the head's, read
    by the tails)."""

    def __init__(self, graph: fx.GraphModule, state: list[torch.Tensor], owned_outputs: bool, replays: Replays):
        # a module of its own, so a code object of its own: dynamo counts the compiles of one code
        # object against its recompile limit, and every input size (resolution) is one more
        self.compiled = torch.compile(fx.GraphModule(graph, graph.graph), fullgraph=True, dynamic=False)
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
        elif self.replays.addresses(fixed) != self.addresses:
            raise RuntimeError(
                "dittofx cuda_graphs: the model's weights or cache state moved since its CUDA graph was captured (moved, "
                "cast, or weights' .data swapped): dittofx.disable the model and optimize it again"
            )
        for mine, given in zip(self.inputs, varying, strict=True):
            if isinstance(given, torch.Tensor) and given is not mine:
                mine.copy_(given)
        self.graph.replay()
        return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in self.outputs) if self.owned_outputs else self.outputs

    def _capture(self, fixed: list[torch.Tensor], varying: list) -> None:
        self.inputs = [v.clone() if isinstance(v, torch.Tensor) and not self.replays.produced(v) else v for v in varying]
        saved = [t.clone() for t in self.state]
        try:
            self.graph, self.outputs = record(lambda: tuple(self.compiled(*fixed, *self.inputs)), self.replays.pool())
        finally:  # the step has not run yet, whatever the warm-up did
            for t, s in zip(self.state, saved):
                t.copy_(s)
        self.addresses = self.replays.addresses(fixed)
        self.replays.outputs.update((id(o), o) for o in self.outputs if isinstance(o, torch.Tensor))


def record(run: Callable[[], tuple], pool: Any) -> tuple[torch.cuda.CUDAGraph, tuple]:
    """`run` captured into a CUDA graph, and the outputs of the captured call. It first runs twice
    on a side stream, so that compiling, autotuning and lazy initialization stay out of the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = run()
    return graph, outputs


class Replays:
    """An engine's GraphReplays: one per graph, cache state and input signature (sizes, dtypes,
    non-tensor values), dropped with the state they were captured on. Captures share one memory
    pool: the graphs run one after another on one stream, and what one leaves for another (its
    outputs, its inputs) stays referenced here."""

    def __init__(self) -> None:
        self.by_key: dict[tuple, GraphReplay] = {}
        self.states: dict[str, Any] = {}  # branch -> the state its replays were captured on
        self.outputs: dict[int, torch.Tensor] = {}  # id -> the replays' output tensors
        self._pool: Any = None
        self._fixed: list[torch.Tensor] | None = None  # the last call's fixed inputs, and their addresses
        self._addresses: list[int] = []

    def get(self, name: str, graph: fx.GraphModule, branch: str, state: Any, varying: list) -> GraphReplay:
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
        key = (name, id(state), signature)
        if key not in self.by_key:
            self.by_key[key] = GraphReplay(graph, state.tensors(), owned_outputs=name != "split-head", replays=self)
        return self.by_key[key]

    def produced(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and self.outputs.get(id(value)) is value

    def addresses(self, fixed: list[torch.Tensor]) -> list[int]:
        """The addresses of a call's fixed inputs, read once per call: a split step's head and tail
        get the same list, and the tail's read (~600 tensors) would sit between the decision read
        and the tail's launch, where the GPU waits."""
        if fixed is not self._fixed:
            self._fixed, self._addresses = fixed, [t.data_ptr() for t in fixed]
        return self._addresses

    def pool(self) -> Any:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool
