"""Find TeaCache's signal in a captured graph: the modulated input of the first block.

Every adaptive-norm DiT block starts the same way, whatever the model calls it: the hidden
stream is normalized, then scaled and shifted by values computed from the conditioning (the
timestep embedding), `norm(x) * (1 + scale) + shift`. In graph terms the first node of block 0
that depends on both the carried hidden state and a loop-invariant input made from the timestep
(the conditioning; any other input where none is), with the hidden state's shape, is the scale;
the elementwise ops right after it (the shift, a dtype cast) complete the modulated input. No
module names are read, so no per-model code is needed. The same rule runs on the torch calls of
block 0 made eagerly (`ModulationFinder`) for forwards with no graph, there with every tensor
argument but the hidden stream as conditioning (which of them were made from the timestep is not
tracked there: a positional embedding added first in block 0, as Cosmos does, would be taken).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .chain import Chain, block_inputs, carried_inputs, functional_name, made_from, numel_hint, op_name

__all__ = ["FoundCall", "ModulationFinder", "ModulationNotFound", "call_name", "find_modulated_input", "run_finding_modulation"]

# elementwise ops that finish a modulation (shift, cast) without leaving the hidden stream's shape
_FINISH_OPS = {"add", "sub", "mul", "div", "_to_copy", "to", "type_as", "clone", "contiguous"}
_FINISH_CALLS = _FINISH_OPS | {"float", "half", "bfloat16"}  # ... as torch calls (`.float()` is `_to_copy` in a graph)


class ModulationNotFound(ValueError):
    pass


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(str(d) for d in val.shape) if isinstance(val, torch.Tensor) else None


def find_modulated_input(nodes: list[fx.Node], chain: Chain, params: set[fx.Node], timestep: str | None = None) -> fx.Node:
    """The node holding block 0's modulated hidden input (SPEC §6's `m_s`). `timestep`: the name of
    the timestep input's placeholder, where the forward has one."""
    first = chain.blocks[0]
    carried = carried_inputs(nodes, chain.blocks, params)
    if not carried:
        raise ModulationNotFound(f"block {first.path} reads no carried value")
    hidden = max(carried, key=numel_hint)
    # everything else the block reads (an embedding only block 0 reads also counts: Wan's timestep
    # projection is read once and chunked, so it looks carried) ...
    conditioning = [
        n for n in block_inputs(nodes, first)
        if n not in params and n is not hidden and isinstance(n.meta.get("val"), torch.Tensor)
    ]  # fmt: skip
    # ... made from the timestep, where some is: a positional embedding added to the hidden stream
    # before the norm is no modulation (Cosmos adds its learnable one first thing in block 0)
    timed = made_from(nodes, (n for n in nodes if n.op == "placeholder" and n.name == timestep))
    conditioning = [n for n in conditioning if n in timed] or conditioning
    from_hidden, from_cond = {hidden}, set(conditioning)
    span = nodes[first.start : first.end + 1]
    for node in span:
        args = node.all_input_nodes
        if any(a in from_hidden for a in args):
            from_hidden.add(node)
        if any(a in from_cond for a in args):
            from_cond.add(node)
        if node in from_hidden and node in from_cond and _shape(node) == _shape(hidden):
            return _finish(node, from_hidden)
    raise ModulationNotFound(
        f"no adaptive norm found in block {first.path}: no node there combines the carried hidden state "
        f"{hidden.name} {_shape(hidden)} with a conditioning input ({[c.name for c in conditioning]}) at the "
        f"hidden state's shape"
    )


def _finish(node: fx.Node, from_hidden: set[fx.Node]) -> fx.Node:
    """Follow the elementwise tail (`+ shift`, a cast) while it stays one chain at the same shape."""
    while len(node.users) == 1:
        (user,) = node.users
        # type_as reads its second operand for the dtype only
        others = [] if op_name(user) == "type_as" else [a for a in user.all_input_nodes if a is not node]
        if op_name(user) not in _FINISH_OPS or _shape(user) != _shape(node) or any(a in from_hidden for a in others):
            break
        node = user
    return node


def call_name(func: Any) -> str:
    """A torch function's name as the graph rule reads it: `__rsub__` -> "sub", `add_` (what
    `+=` arrives as) -> "add"."""
    name = getattr(func, "__name__", "")
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        name = name[1:] if name[:1] == "r" and name[1:] in ("add", "sub", "mul", "div", "truediv") else name
        return "div" if name == "truediv" else name
    return functional_name(name)


@dataclass
class FoundCall:
    """Where block 0's modulated input is made among its torch calls."""

    index: int  # its place among the calls the block makes
    name: str  # the call's name (`call_name`)
    value: torch.Tensor  # its output as the call returned it (a later in-place change does not reach it)


class ModulationFinder(TorchFunctionMode):
    """`find_modulated_input`'s rule on the torch calls made under it, for a block 0 run eagerly (a
    forward with no graph; the conditioning: every other tensor argument, whether made from the
    timestep or not): the first call mixing the hidden stream with the conditioning at the
    hidden stream's shape, then its elementwise tail (in-place `+= shift` included), cut back to
    any tail tensor read twice. Applied while the calls are made: the tensors derived from the
    hidden stream or the conditioning are known by weak reference (an id leaves with its tensor),
    so only the tail and its snapshots stay alive. `found()` after the block."""

    def __init__(self, hidden: torch.Tensor, conditioning: list[torch.Tensor]):
        super().__init__()
        self.shape = hidden.shape
        self.from_hidden: weakref.WeakValueDictionary = weakref.WeakValueDictionary({id(hidden): hidden})
        self.from_cond: weakref.WeakValueDictionary = weakref.WeakValueDictionary({id(c): c for c in conditioning})
        self.count = 0
        self.tail: list[tuple[FoundCall, torch.Tensor]] = []  # the scale, then its tail so far (with the tensor)
        self.done = False  # the tail cannot grow; a second reader can still cut it back

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        index, self.count = self.count, self.count + 1
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outs:  # a size or dtype query reads nothing the rule counts
            return out
        ins = {id(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        if not self.tail:
            self._tag(ins, outs)
            if isinstance(out, torch.Tensor) and id(out) in self.from_hidden and id(out) in self.from_cond and out.shape == self.shape:
                self.tail.append((FoundCall(index, call_name(func), out.clone()), out))
            return out
        read = [i for i, (_, t) in enumerate(self.tail) if id(t) in ins]
        if not read:
            return out
        last = self.tail[-1][1]
        others = set() if call_name(func) == "type_as" else ins - {id(last)}
        extends = (
            not self.done and read[-1] == len(self.tail) - 1 and call_name(func) in _FINISH_CALLS
            and isinstance(out, torch.Tensor) and out.shape == self.shape and not any(i in self.from_hidden for i in others)
        )  # fmt: skip
        if extends:  # its one reader so far: the tail goes on (an in-place op returns the same tensor)
            self.tail.append((FoundCall(index, call_name(func), out.clone()), out))
        else:  # a second reader, or one that is no elementwise finish: the tail ends at what it read
            del self.tail[read[-1] + 1 :]
            self.done = True
        return out

    def _tag(self, ins: set[int], outs: list[torch.Tensor]) -> None:
        for tagged in (self.from_hidden, self.from_cond):
            if any(i in tagged for i in ins):
                tagged.update((id(t), t) for t in outs)

    def found(self) -> FoundCall:
        if not self.tail:
            raise ModulationNotFound(
                f"no adaptive norm found in block 0: no torch call there combines the hidden stream {tuple(self.shape)} "
                f"with a conditioning input at the hidden stream's shape"
            )
        return self.tail[-1][0]


def run_finding_modulation(block_call: Callable[[], Any], hidden: torch.Tensor, named: dict[str, Any]) -> tuple[Any, FoundCall]:
    """Run block 0 (`block_call`, its arguments `named`) under `ModulationFinder`: its output and
    where its modulated input is made (every tensor argument but the hidden stream counts as
    conditioning)."""
    finder = ModulationFinder(hidden, [v for v in named.values() if isinstance(v, torch.Tensor) and v is not hidden])
    with finder:
        out = block_call()
    return out, finder.found()
