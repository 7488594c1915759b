"""Find TeaCache's signal in a captured graph: the modulated input of the first block.

Every adaptive-norm DiT block starts the same way, whatever the model calls it: the hidden
stream is normalized, then scaled and shifted by values computed from the conditioning (the
timestep embedding), `norm(x) * (1 + scale) + shift`. In graph terms the first node of block 0
that depends on both the carried hidden state and a loop-invariant input (the conditioning), with
the hidden state's shape, is the scale; the elementwise ops right after it (the shift, a dtype
cast) complete the modulated input. No module names are read, so no per-model code is needed. The same rule
runs on the torch calls of block 0 made eagerly (`find_modulated_call`) for forwards with no graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .chain import Chain, block_inputs, carried_inputs, numel_hint

__all__ = ["ModulationNotFound", "TorchCall", "TorchCallLog", "call_name", "find_modulated_call", "find_modulated_input", "run_finding_modulation"]

# elementwise ops that finish a modulation (shift, cast) without leaving the hidden stream's shape
_FINISH_OPS = {"add", "sub", "mul", "div", "_to_copy", "to", "type_as", "clone", "contiguous"}
_FINISH_CALLS = _FINISH_OPS | {"float", "half", "bfloat16"}  # ... as torch calls (`.float()` is `_to_copy` in a graph)


class ModulationNotFound(ValueError):
    pass


def _op_name(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(str(d) for d in val.shape) if isinstance(val, torch.Tensor) else None


def find_modulated_input(nodes: list[fx.Node], chain: Chain, params: set[fx.Node]) -> fx.Node:
    """The node holding block 0's modulated hidden input (SPEC §6's `m_s`)."""
    first = chain.blocks[0]
    carried = carried_inputs(nodes, chain.blocks, params)
    if not carried:
        raise ModulationNotFound(f"block {first.path} reads no carried value")
    hidden = max(carried, key=numel_hint)
    # everything else the block reads (an embedding only block 0 reads also counts: Wan's timestep
    # projection is read once and chunked, so it looks carried)
    conditioning = [
        n for n in block_inputs(nodes, first)
        if n not in params and n is not hidden and isinstance(n.meta.get("val"), torch.Tensor)
    ]  # fmt: skip
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
        others = [] if _op_name(user) == "type_as" else [a for a in user.all_input_nodes if a is not node]
        if _op_name(user) not in _FINISH_OPS or _shape(user) != _shape(node) or any(a in from_hidden for a in others):
            break
        node = user
    return node


@dataclass
class TorchCall:
    """One torch call made in block 0's forward, as `find_modulated_call` reads it."""

    name: str  # "mul", "add", "layer_norm", ... (`__rmul__` and `__mul__` are "mul")
    inputs: set[int]  # ids of the tensors it read
    outputs: list[torch.Tensor]  # the tensors it returned (none: a size or dtype query)


class TorchCallLog(TorchFunctionMode):
    """The torch calls made under it (names, tensors read and returned), for `find_modulated_call`."""

    def __init__(self):
        super().__init__()
        self.calls: list[TorchCall] = []
        self._alive: list[Any] = []  # keeps ids unique while the log refers to them

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.calls.append(TorchCall(call_name(func), {id(t) for t in ins}, [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]))
        self._alive.append(ins)
        return out


def call_name(func) -> str:
    """A torch function's name as the graph rule reads it: `__radd__`, `__add__` -> "add"."""
    name = getattr(func, "__name__", "")
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        name = name[1:] if name[:1] in "ri" and name[1:] in ("add", "sub", "mul", "truediv") else name
        return "div" if name == "truediv" else name
    return name


def find_modulated_call(calls: list[TorchCall], hidden: torch.Tensor, conditioning: list[torch.Tensor]) -> int:
    """`find_modulated_input`'s rule on block 0's torch calls: the index of the call whose one
    output is the modulated hidden input (the first to mix the hidden stream with the conditioning
    at the hidden stream's shape, then its elementwise tail)."""
    from_hidden, from_cond = {id(hidden)}, {id(c) for c in conditioning}
    found = None
    for k, call in enumerate(calls):
        ids = {id(o) for o in call.outputs}
        if call.inputs & from_hidden:
            from_hidden |= ids
        if call.inputs & from_cond:
            from_cond |= ids
        if len(call.outputs) == 1 and ids <= from_hidden & from_cond and call.outputs[0].shape == hidden.shape:
            found = k
            break
    if found is None:
        raise ModulationNotFound(
            f"no adaptive norm found in block 0: no torch call there combines the hidden stream {tuple(hidden.shape)} "
            f"with a conditioning input ({[tuple(c.shape) for c in conditioning]}) at the hidden stream's shape"
        )
    while True:  # the elementwise tail, while it stays one chain at the same shape
        out = calls[found].outputs[0]
        users = [j for j in range(found + 1, len(calls)) if id(out) in calls[j].inputs and calls[j].outputs]
        if len(users) != 1:
            return found
        user = calls[users[0]]
        others = set() if user.name == "type_as" else user.inputs - {id(out)}
        if user.name not in _FINISH_CALLS or len(user.outputs) != 1 or user.outputs[0].shape != hidden.shape or others & from_hidden:
            return found
        found = users[0]


def run_finding_modulation(block_call: Callable[[], Any], hidden: torch.Tensor, named: dict[str, Any]) -> tuple[Any, int, TorchCall]:
    """Run block 0 (`block_call`, its arguments `named`) with its torch calls logged: its output,
    and the index and record of the call making its modulated input (every tensor argument but
    the hidden stream counts as conditioning)."""
    log = TorchCallLog()
    with log:
        out = block_call()
    conditioning = [v for v in named.values() if isinstance(v, torch.Tensor) and v is not hidden]
    index = find_modulated_call(log.calls, hidden, conditioning)
    return out, index, log.calls[index]
