"""Small helpers the rewrite passes share for building fx graphs."""

from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx

from ..patterns.chain import int_hint

__all__ = ["cond_branch", "copy_meta", "dense", "flat", "fresh_flat", "is_view", "memory_order", "new_module", "unflat"]


def copy_meta(dst: fx.Node, src: fx.Node) -> fx.Node:
    dst.meta.update({k: v for k, v in src.meta.items() if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")})
    return dst


def is_view(node: fx.Node) -> bool:
    """Whether the op returns an alias of an input (aten view ops, and items of split/chunk)."""
    if node.target is operator.getitem:
        return is_view(node.args[0])
    return isinstance(node.target, torch._ops.OpOverload) and node.target.is_view


def cond_branch(gm: fx.GraphModule, operands: list[fx.Node], body, name: str) -> fx.GraphModule:
    """A cond branch taking `operands` (as placeholders) and returning `body(env)`'s nodes."""
    graph = fx.Graph()
    env = {op: copy_meta(graph.placeholder(op.name), op) for op in operands}
    outs = body(graph, env)
    graph.output(tuple(outs))
    return fx.GraphModule(gm, graph, class_name=name)


def new_module(gm: fx.GraphModule, graph: fx.Graph, branches: dict[str, fx.GraphModule], name: str) -> fx.GraphModule:
    """`graph` as a module whose attributes are `gm`'s that it reads plus the new cond `branches`:
    a pass leaves its input module as it was (graph in, graph out)."""
    read = {n.target for n in graph.nodes if n.op in ("get_attr", "call_module")} - branches.keys()
    return fx.GraphModule({**{t: functools.reduce(getattr, t.split("."), gm) for t in read}, **branches}, graph, class_name=name)


def flat(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """A cond output as 1-D. torch.cond checks that symbolic output strides are products of the
    sizes; a contiguous stride over a size like (h//2)*(w//2) comes out as 16*Max(1, (h//2)*(w//2))
    and fails that check, so dynamo stops at the first recompile with dynamic shapes (Wan, PixArt at
    a second resolution). A 1-D tensor's stride is 1."""
    return graph.call_function(torch.ops.aten.view.default, (node, [-1]))


def memory_order(node: fx.Node) -> list[int] | None:
    """The dims of a value outermost-first in memory, or None when that is their own order."""
    val = node.meta["val"]
    strides = [int_hint(st, fallback=1) for st in val.stride()]
    order = sorted(range(val.dim()), key=lambda d: -strides[d])  # stable: ties keep dim order
    return None if order == sorted(order) else order


def dense(graph: fx.Graph, node: fx.Node, order: list[int] | None) -> fx.Node:
    """A fresh dense copy of `node` with its dims permuted into `order` (memory order)."""
    if order:
        node = graph.call_function(torch.ops.aten.permute.default, (node, order))
    return graph.call_function(torch.ops.aten.clone.default, (node,), {"memory_format": torch.contiguous_format})


def fresh_flat(graph: fx.Graph, value: fx.Node, eager: fx.Node, order: list[int] | None) -> fx.Node:
    """What a cond branch returns for `eager` (the graph's value that `value`, in the branch, computes):
    both branches must return fresh tensors of one layout, so a view (FLUX's slice of its text+image
    stream) or a strided value is copied dense, in the eager value's memory order `order` (ACE-Step
    and HunyuanVideo carry a transposed stream: what reads it after the cond reduces in that order)."""
    if is_view(eager) or not eager.meta["val"].is_contiguous():
        value = dense(graph, value, order)
    return flat(graph, value)


def unflat(graph: fx.Graph, item: fx.Node, like: fx.Node, order: list[int] | None) -> fx.Node:
    """A cond output (1-D, in memory order `order`) back to the dims of `like`, the value it stands for."""
    if not order:
        return graph.call_method("view_as", (item, like))
    shaped = graph.call_method("view_as", (item, graph.call_function(torch.ops.aten.permute.default, (like, order))))
    return graph.call_function(torch.ops.aten.permute.default, (shaped, sorted(range(len(order)), key=order.__getitem__)))
