"""Split the device-decision graph at its torch.cond, for decisions read on the host.

    head: prologue | Fn | begin_step, gates, diff | cache branch, the cached step's counters
          | epilogue                               -> (predicate, tensors the tails read, outputs)
    cache tail:   the head's outputs, copied
    compute tail: the middle inline | finish_step | Bn | epilogue

Inductor runs no CUDA graph for a graph that holds a torch.cond (its cond reads the predicate on
the host anyway). Cut there, every graph is cond-free: the host reads the head's predicate (the
one sync the cond would have made), then runs a tail. The head finishes a cached step itself
(speculatively: the host has not read the decision yet), so a cached step's tail is only a copy
of its outputs; where the step computes, the head's forecast and epilogue were wasted and its
counter updates were no-ops (`finish_step(cached_only=True)`), and the compute tail runs the
step from Fn's output as the device graph does. On wan-cpu a cached step so came to +302 us over
the ideal's (+478 us for the cond graph, +113 us for a host-decided cache step: bench/README.md,
"Where a cached step's time goes"). Where Bn blocks follow the middle (a computed step would run
them twice), or what follows the cond writes in place, may draw random numbers
or returns a non-tensor (`speculates`), the head stops at the cond and the cache tail runs the
cache path.

Sizes (and arithmetic on them) that the compute tail reads are computed again in it from its
own inputs, not passed: as Python ints they would be constants to dynamo, and every new
resolution would recompile the tails.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..runtime import gates
from .sizes import SIZE_OPS, recompute_or_pass

__all__ = ["SplitAtDecisionPass", "SIDES", "boundary", "speculates"]

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
    pred = cond.args[0]
    read = [node for user in nodes[cut:] for node in user.all_input_nodes if not _is_branch(node, cond)]
    again, tensors = recompute_or_pass(
        [pred, *read], lambda node: node.op == "get_attr" or node.target in SIZE_OPS, outside=lambda node: node not in head
    )
    order = {n: i for i, n in enumerate(nodes)}
    return [pred, *sorted((t for t in tensors if t is not pred), key=order.get)], sorted(again, key=order.get)


def boundary(gm: fx.GraphModule) -> list[fx.Node]:
    """The head's outputs: the cond's predicate, then every value made before the cond that the
    cond or what follows it reads, sizes aside (the tail computes those again)."""
    return _plan(gm)[0]


class SplitAtDecisionPass(PassBase):
    """Graph in (a "device" graph with one torch.cond), one side of the split out.

    "head": the original placeholders; returns `boundary(gm)`, then, where `speculate` (the
    caller's call: the build asks only where no Bn block would run twice on a computed step) and
    `speculates(gm)`, the model's outputs as the cache path makes them. "compute" / "cache": the
    original placeholders, then one per tensor the head returns; the cond replaced by that
    branch's body, inline, and what follows it; where the head speculated, "cache" is only
    copies of its outputs.
    """

    def __init__(self, side: str, speculate: bool = True):
        super().__init__()
        if side not in SIDES:
            raise ValueError(f"side={side!r}: must be one of {SIDES}")
        self.side, self.speculate = side, speculate

    def call(self, gm: fx.GraphModule) -> PassResult:
        return PassResult(self._head(gm) if self.side == "head" else self._tail(gm), True)

    def _head(self, gm: fx.GraphModule) -> fx.GraphModule:
        g, env, attrs = fx.Graph(), {}, {}
        cond = _cond_node(gm.graph)
        outputs = _speculated_outputs(gm) if self.speculate else None
        for node in gm.graph.nodes:
            if node is cond and outputs is None:
                break
            if node.op == "output":
                continue
            if node is cond:
                _, on_true, _, operands = cond.args
                env[node] = _inline(g, getattr(gm, on_true.target), [env[op] for op in operands], attrs)
            elif node.target is operator.getitem and node.args[0] is cond:
                env[node] = env[cond][node.args[1]]
            elif not _is_branch(node, cond):
                env[node] = _copy(g, node, env, gm, attrs)
                if node.target is gates.finish_step:  # not this step's stores yet: it may compute
                    env[node].kwargs = {**node.kwargs, "cached_only": True}
        g.output((*(env[n] for n in boundary(gm)), *(env[n] for n in outputs or ())))
        g.lint()
        return fx.GraphModule(attrs, g, class_name="DittofxHead")

    def _tail(self, gm: fx.GraphModule) -> fx.GraphModule:
        g, env, attrs = fx.Graph(), {}, {}
        nodes = list(gm.graph.nodes)
        cond = _cond_node(gm.graph)
        tensors, again = _plan(gm)
        outputs = _speculated_outputs(gm) if self.speculate else None
        for node in gm.graph.find_nodes(op="placeholder"):
            env[node] = g.node_copy(node)
        for node in tensors:
            env[node] = g.placeholder(f"dittofx_head_{node.name}")
            env[node].meta.update(node.meta)
        speculated = {}
        for i, node in enumerate(outputs or ()):
            speculated[node] = g.placeholder(f"dittofx_head_output_{i}")
            speculated[node].meta.update(node.meta)
        if self.side == "cache" and outputs is not None:
            (returned,) = gm.graph.find_nodes(op="output")
            g.output(fx.map_arg(returned.args[0], lambda n: g.call_function(torch.ops.aten.clone.default, (speculated[n],))))
            g.lint()
            return fx.GraphModule({}, g, class_name="DittofxTailCache")
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


def speculates(gm: fx.GraphModule) -> bool:
    """Whether the head may run the cache path before the host reads the decision. Not where
    what follows the cond writes in place (into a value made before it, a step that computes
    would hand the middle the written value; real epilogues write none), may draw random
    numbers (it would draw twice) or returns a non-tensor (a size would cross the cut)."""
    return _speculated_outputs(gm) is not None


def _speculated_outputs(gm: fx.GraphModule) -> list[fx.Node] | None:
    """The model's outputs, each once, in order, that a speculating head returns; None where it
    must not speculate (`speculates`)."""
    nodes = list(gm.graph.nodes)
    cut = nodes.index(_cond_node(gm.graph))
    (returned,) = gm.graph.find_nodes(op="output")
    outputs = list(dict.fromkeys(returned.all_input_nodes))
    if not all(isinstance(n.meta.get("val"), torch.Tensor) for n in outputs):
        return None
    if any(_writes_or_draws(node, gm) for node in nodes[cut + 1 :] if node.op == "call_function"):
        return None
    return outputs


def _writes_or_draws(node: fx.Node, owner: torch.nn.Module) -> bool:
    """Whether `node` may write in place or draw random numbers: any aten op that writes (what it
    writes may alias a value made before the cond in ways a view walk misses: helper-61), any op
    outside aten and prims (a custom op may do either), a higher-order op whose subgraphs do."""
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        subgraphs = [getattr(owner, a.target) for a in node.all_input_nodes if a.op == "get_attr"]
        return any(
            _writes_or_draws(n, sub) for sub in subgraphs if isinstance(sub, fx.GraphModule)
            for n in sub.graph.nodes if n.op == "call_function"
        )  # fmt: skip
    if not isinstance(target, torch._ops.OpOverload):
        return False  # getitem, size arithmetic, dittofx's gates (finish_step's stores: cached_only)
    if target.namespace not in ("aten", "prims"):
        return True
    schema = target._schema.arguments
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema):
        return True
    values = {a.name: a.default_value if a.has_default_value() else None for a in schema}
    values.update({a.name: v for a, v in zip(schema, node.args)}, **node.kwargs)
    return torch.Tag.nondeterministic_seeded in target.tags and _may_draw(target, values)


def _may_draw(target: torch._ops.OpOverload, values: dict[str, Any]) -> bool:
    """Whether an op tagged as drawing random numbers does on these arguments: attention draws
    nothing with a dropout probability of 0, aten.dropout nothing at p=0 or outside training
    (native_dropout draws in training whatever p)."""
    if "dropout_p" in values:
        return values["dropout_p"] != 0
    if "train" in values:
        return values["train"] is not False and (values["p"] != 0 or target.name().startswith("aten::native_dropout"))
    return True


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
