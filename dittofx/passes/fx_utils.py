"""Small helpers the rewrite passes share for building fx graphs."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

__all__ = ["cond_branch", "copy_meta", "flat", "is_view"]


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


def flat(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """A cond output as 1-D. torch.cond checks that symbolic output strides are products of the
    sizes; a contiguous stride over a size like (h//2)*(w//2) comes out as 16*Max(1, (h//2)*(w//2))
    and fails that check, so dynamo stops at the first recompile with dynamic shapes (Wan, PixArt at
    a second resolution). A 1-D tensor's stride is 1."""
    return graph.call_function(torch.ops.aten.view.default, (node, [-1]))
