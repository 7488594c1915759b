"""Split the device-decision graph at its torch.cond, for decisions read on the host.

    head: prologue | Fn | begin_step, gates, diff       -> (predicate, tensors the rest reads)
    tail: the branch the host picked, inline | finish_step | Bn | epilogue

Inductor runs no CUDA graph for a graph that holds a torch.cond (its cond reads the predicate on
the host anyway). Cut there, both halves are cond-free: the host reads the head's predicate (the
one sync the cond would have made), then runs the compute or the cache tail. Every node keeps its
order, so each step does exactly what the device graph does, state updates included.

Sizes (and arithmetic on them) that the tail reads are computed again in the tail from its own
inputs, not passed: as Python ints they would be constants to dynamo, and every new resolution
would recompile the tails.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .sizes import SIZE_OPS

__all__ = ["SplitAtDecisionPass", "SIDES", "boundary"]

SIDES = ("head", "compute", "cache")


def _cond_node(graph: fx.Graph) -> fx.Node:
    (cond,) = graph.find_nodes(op="call_function", target=torch.ops.higher_order.cond)
    return cond


def _is_branch(node: fx.Node, cond: fx.Node) -> bool:
    """An attribute read only by the cond: one of its branches (inlined into a tail, not copied)."""
    return node.op == "get_attr" and set(node.users) == {cond}


def _plan(gm: fx.GraphModule) -> tuple[list[fx.Node], list[fx.Node]]:
    """(tensors the head returns, the predicate first; head nodes the tail computes again: sizes,
    arithmetic on them, attributes), both in graph order."""
    nodes = list(gm.graph.nodes)
    cond = _cond_node(gm.graph)
    cut = nodes.index(cond)
    head = set(nodes[:cut]) - set(gm.graph.find_nodes(op="placeholder"))
    tensors, again = {cond.args[0]: None}, {}

    def need(node: fx.Node) -> None:
        if node not in head or node in tensors or node in again:
            return
        if node.op == "get_attr" or node.target in SIZE_OPS:
            for arg in node.all_input_nodes:
                need(arg)
            again[node] = None
        else:
            tensors[node] = None

    for user in nodes[cut:]:
        for node in user.all_input_nodes:
            if not _is_branch(node, cond):
                need(node)
    order = {n: i for i, n in enumerate(nodes)}
    return [cond.args[0], *sorted(list(tensors)[1:], key=order.get)], sorted(again, key=order.get)


def boundary(gm: fx.GraphModule) -> list[fx.Node]:
    """The head's outputs: the cond's predicate, then every value made before the cond that the
    cond or what follows it reads, sizes aside (the tail computes those again)."""
    return _plan(gm)[0]


class SplitAtDecisionPass(PassBase):
    """Graph in (a "device" graph with one torch.cond), one side of the split out.

    "head": the original placeholders; returns `boundary(gm)`. "compute" / "cache": the original
    placeholders, then one per boundary tensor; the cond is replaced by that branch's body, inline.
    """

    def __init__(self, side: str):
        super().__init__()
        if side not in SIDES:
            raise ValueError(f"side={side!r}: must be one of {SIDES}")
        self.side = side

    def call(self, gm: fx.GraphModule) -> PassResult:
        return PassResult(self._head(gm) if self.side == "head" else self._tail(gm), True)

    def _head(self, gm: fx.GraphModule) -> fx.GraphModule:
        g, env = fx.Graph(), {}
        cond = _cond_node(gm.graph)
        for node in gm.graph.nodes:
            if node is cond:
                break
            if not _is_branch(node, cond):
                env[node] = g.node_copy(node, lambda n: env[n])
        g.output(tuple(env[n] for n in boundary(gm)))
        g.lint()
        return fx.GraphModule(gm, g, class_name="DittofxHead")

    def _tail(self, gm: fx.GraphModule) -> fx.GraphModule:
        g, env, attrs = fx.Graph(), {}, {}
        nodes = list(gm.graph.nodes)
        cond = _cond_node(gm.graph)
        tensors, again = _plan(gm)
        for node in gm.graph.find_nodes(op="placeholder"):
            env[node] = g.node_copy(node)
        for node in tensors:
            env[node] = g.placeholder(f"dittofx_head_{node.name}")
            env[node].meta.update(node.meta)
        for node in again:
            env[node] = _copy(g, node, env, gm, attrs)
        pred, on_true, on_false, operands = cond.args
        branch = getattr(gm, (on_true if self.side == "cache" else on_false).target)
        results = _inline(g, branch, [env[op] for op in operands], attrs)
        for node in nodes[nodes.index(cond) + 1 :]:
            if node.target is operator.getitem and node.args[0] is cond:
                env[node] = results[node.args[1]]
            else:
                env[node] = _copy(g, node, env, gm, attrs)
        g.lint()
        return fx.GraphModule(attrs, g, class_name=f"DittofxTail{self.side.title()}")


def _copy(g: fx.Graph, node: fx.Node, env: dict, owner: torch.nn.Module, attrs: dict[str, Any]) -> fx.Node:
    """`node` copied into `g`; an attribute it reads (a higher-order op's subgraph, a constant) is
    taken from `owner` into `attrs` under a new name (the tail's attributes come from two graphs)."""
    new = g.node_copy(node, lambda n: env[n])
    if node.op == "get_attr":
        new.target = f"dittofx_attr_{len(attrs)}"
        attrs[new.target] = functools.reduce(getattr, node.target.split("."), owner)
    return new


def _inline(g: fx.Graph, branch: fx.GraphModule, operands: list[fx.Node], attrs: dict[str, Any]) -> list[fx.Node]:
    """`branch`'s body copied into `g` on `operands`; its returned nodes."""
    env = dict(zip(branch.graph.find_nodes(op="placeholder"), operands))
    for node in branch.graph.nodes:
        if node.op == "output":
            return [env[n] for n in node.args[0]]
        if node.op != "placeholder":
            env[node] = _copy(g, node, env, branch, attrs)
    raise AssertionError("a graph without an output")
