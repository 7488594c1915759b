"""Split the device-decision graph at its torch.cond, for decisions read on the host.

    head: prologue | Fn | begin_step, gates, diff       -> (predicate, values the rest reads)
    tail: the branch the host picked, inline | finish_step | Bn | epilogue

Inductor runs no CUDA graph for a graph that holds a torch.cond (its cond reads the predicate on
the host anyway). Cut there, both halves are cond-free: the host reads the head's predicate (the
one sync the cond would have made), then runs the compute or the cache tail. Every node keeps its
order, so each step does exactly what the device graph does, state updates included.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["SplitAtDecisionPass", "SIDES"]

SIDES = ("head", "compute", "cache")


def _cond_node(graph: fx.Graph) -> fx.Node:
    (cond,) = graph.find_nodes(op="call_function", target=torch.ops.higher_order.cond)
    return cond


def boundary(gm: fx.GraphModule) -> list[fx.Node]:
    """The head's outputs: the predicate first, then every value made before the cond (other than
    an input) that the cond or what follows it reads."""
    nodes = list(gm.graph.nodes)
    cond = _cond_node(gm.graph)
    head = set(nodes[: nodes.index(cond)]) - set(gm.graph.find_nodes(op="placeholder"))
    read = dict.fromkeys(n for user in nodes[nodes.index(cond) :] for n in user.all_input_nodes if n in head)
    pred = cond.args[0]
    return [pred, *(n for n in read if n is not pred and n.op != "get_attr")]


class SplitAtDecisionPass(PassBase):
    """Graph in (a "device" graph with one torch.cond), one side of the split out.

    "head": the original placeholders; returns `boundary(gm)`. "compute" / "cache": takes the
    boundary values as leading placeholders, then the original ones; the cond is replaced by that
    branch's body, inline.
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
            if node.op != "get_attr" or set(node.users) != {cond}:  # the branches stay behind
                env[node] = g.node_copy(node, lambda n: env[n])
        g.output(tuple(env[n] for n in boundary(gm)))
        g.lint()
        return fx.GraphModule(gm, g, class_name="DittofxHead")

    def _tail(self, gm: fx.GraphModule) -> fx.GraphModule:
        g, env = fx.Graph(), {}
        nodes = list(gm.graph.nodes)
        cond = _cond_node(gm.graph)
        for node in boundary(gm):
            env[node] = g.placeholder(f"dittofx_head_{node.name}")
            env[node].meta.update(node.meta)
        for node in gm.graph.find_nodes(op="placeholder"):
            env[node] = g.node_copy(node)
        pred, on_true, on_false, operands = cond.args
        branch = getattr(gm, (on_true if self.side == "cache" else on_false).target)
        results = _inline(g, branch, [env[op] for op in operands])
        for node in nodes[nodes.index(cond) + 1 :]:
            if node.target is operator.getitem and node.args[0] is cond:
                env[node] = results[node.args[1]]
            else:
                env[node] = g.node_copy(node, lambda n: env[n])
        g.lint()
        return fx.GraphModule(gm, g, class_name=f"DittofxTail{self.side.title()}")


def _inline(g: fx.Graph, branch: fx.GraphModule, operands: list[fx.Node]) -> list[fx.Node]:
    """`branch`'s body copied into `g` on `operands`; its returned nodes."""
    env = dict(zip(branch.graph.find_nodes(op="placeholder"), operands))
    for node in branch.graph.nodes:
        if node.op == "output":
            return [env[n] for n in node.args[0]]
        if node.op != "placeholder":
            env[node] = g.node_copy(node, lambda n: env[n])
    raise AssertionError("a graph without an output")
