"""Find TeaCache's signal in a captured graph: the modulated input of the first block.

Every adaptive-norm DiT block starts the same way, whatever the model calls it: the hidden
stream is normalized, then scaled and shifted by values computed from the conditioning (the
timestep embedding), `norm(x) * (1 + scale) + shift`. In graph terms the first node of block 0
that depends on both the carried hidden state and a loop-invariant input (the conditioning), with
the hidden state's shape, is the scale; the elementwise ops right after it (the shift, a dtype
cast) complete the modulated input. No module names are read, so no per-model code is needed.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .chain import Chain, block_inputs, carried_inputs, numel_hint

__all__ = ["ModulationNotFound", "find_modulated_input"]

# elementwise ops that finish a modulation (shift, cast) without leaving the hidden stream's shape
_FINISH_OPS = {"add", "sub", "mul", "div", "_to_copy", "to", "type_as", "clone", "contiguous"}


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
