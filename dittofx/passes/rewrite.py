"""Rewrite the partitioned graph into its cached form:

    prologue | Fn | begin_step, gate, decide | cond(cache: carried + residual, compute: middle)
             | finish_step (stores, counters) | Bn | epilogue

The new graph takes the cache-state tensors as extra leading placeholders and updates them in
place *outside* the cond, so both branches stay pure (torch.cond requires it) and the same graph
runs eagerly and under `torch.compile(fullgraph=True)`. Two more variants serve the steps whose
decision the host already knows: "compute" (the middle inline) and "cache" (the forecast inline),
with no cond and no diff.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..runtime import gates
from ..runtime.state import SCALARS, state_names
from .partition import Partition

__all__ = ["CacheRewritePass", "DECISIONS", "RewriteOptions"]


@dataclass(frozen=True)
class RewriteOptions:
    threshold: float
    acc_limit: float
    max_warmup_steps: int
    warmup_interval: int
    max_cached_steps: int
    max_continuous_cached_steps: int
    timestep_input: str | None  # placeholder name of the timestep input, if the model has one
    has_mask: bool = False
    static_mask: bool = False
    group: str | None = None  # process group whose ranks hold shards of the sequence: sums all-reduced


def _copy_meta(dst: fx.Node, src: fx.Node) -> fx.Node:
    dst.meta.update({k: v for k, v in src.meta.items() if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")})
    return dst


def _is_view(node: fx.Node) -> bool:
    """Whether the op returns an alias of an input (aten view ops, and items of split/chunk)."""
    if node.target is operator.getitem:
        return _is_view(node.args[0])
    return isinstance(node.target, torch._ops.OpOverload) and node.target.is_view


def _branch(gm: fx.GraphModule, operands: list[fx.Node], body, name: str) -> fx.GraphModule:
    """A cond branch taking `operands` (as placeholders) and returning `body(env)`'s nodes."""
    graph = fx.Graph()
    env = {op: _copy_meta(graph.placeholder(op.name), op) for op in operands}
    outs = body(graph, env)
    graph.output(tuple(outs))
    return fx.GraphModule(gm, graph, class_name=name)


DECISIONS = ("device", "compute", "cache")


class CacheRewritePass(PassBase):
    """Graph in (partitioned, with `meta["dittofx_region"]`), cached graph out.

    `decision="device"`: the step's decision is made in the graph and the middle sits in a
    torch.cond. "compute" / "cache": the host already knows the decision (warmup, a static mask):
    the graph has no cond and no diff, which keeps it CUDA-graphable and free of host syncs.
    """

    def __init__(self, partition: Partition, options: RewriteOptions, decision: str = "device"):
        super().__init__()
        if decision not in DECISIONS:
            raise ValueError(f"decision={decision!r}: must be one of {DECISIONS}")
        self.part, self.opt, self.decision = partition, options, decision

    def call(self, gm: fx.GraphModule) -> PassResult:
        return PassResult(rewrite(gm, self.part, self.opt, self.decision), True)


def rewrite(gm: fx.GraphModule, part: Partition, opt: RewriteOptions, decision: str = "device") -> fx.GraphModule:
    region = part.region
    nodes = list(gm.graph.nodes)
    outs = part.middle_outputs

    g = fx.Graph()
    st = {name: g.placeholder(f"dittofx_{name}") for name in state_names(len(outs))}
    residuals = [st[f"residual_{j}"] for j in range(len(outs))]
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node.op == "placeholder":
            env[node] = _copy_meta(g.placeholder(node.name), node)

    def copy(node: fx.Node) -> None:
        env[node] = _copy_meta(g.node_copy(node, lambda n: env[n]), node)

    for node in nodes:
        if node.op not in ("placeholder", "output") and region[node] in ("prologue", "Fn"):
            copy(node)

    timestep = next((env[n] for n in nodes if n.op == "placeholder" and n.name == opt.timestep_input), None)
    scalars = [st[n] for n in SCALARS]
    step, _num, _last_ts, valid, last_compute, cached_count, cont_count, acc = scalars
    g.call_function(
        gates.begin_step,
        (step, st["num_steps"], st["last_ts"], valid, cached_count, cont_count, acc, st["hist_diff"], st["hist_cached"], timestep),
    )
    elapsed = g.call_function(torch.sub, (step, last_compute))

    # the skeleton of the middle (blocks skipped, code between them kept) gives each output's base
    def skeleton_arg(n: fx.Node) -> fx.Node:
        return env[part.skip.get(n, n)]

    for node in part.glue:
        env[node] = _copy_meta(g.node_copy(node, skeleton_arg), node)
    bases = [env[part.base[o]] for o in outs]

    if decision == "device":
        diff, cache = _device_decision(g, gm, part, opt, st, env, nodes, outs, residuals, bases, elapsed)
    else:
        fixed = g.call_function(gates.fixed_decision, (step,), {"cache": decision == "cache"})
        diff = g.call_function(operator.getitem, (fixed, 0))
        cache = g.call_function(operator.getitem, (fixed, 1))
        if decision == "compute":
            for node in nodes:
                if region[node] == "middle":
                    copy(node)
        else:
            for r, b, out in zip(residuals, bases, outs):
                env[out] = _copy_meta(g.call_function(gates.forecast, (r, b, valid, elapsed)), out)

    g.call_function(
        gates.finish_step,
        (
            cache, diff, step, valid, last_compute, cached_count, cont_count, acc,
            st["hist_diff"], st["hist_cached"], st["p"], env[part.h_fn], env[part.h0],
            residuals, [env[o] for o in outs], bases,
        ),
    )  # fmt: skip

    for node in nodes:
        if node.op == "output":
            g.output(fx.map_arg(node.args[0], lambda n: env[n]))
        elif node.op != "placeholder" and region[node] in ("Bn", "epilogue"):
            copy(node)
    g.lint()
    return fx.GraphModule(gm, g, class_name="DittofxCached")


def _device_decision(g, gm, part, opt, st, env, nodes, outs, residuals, bases, elapsed):
    """Gates and diff in the graph; the middle inside torch.cond(cache, forecast, middle)."""
    region = part.region
    step, valid, cached_count, cont_count, acc = (st[n] for n in ("step", "valid", "cached_count", "cont_count", "acc"))
    gate = g.call_function(
        gates.step_gate,
        (step, valid, cached_count, cont_count, st["mask"]),
        dict(
            max_warmup_steps=opt.max_warmup_steps,
            warmup_interval=opt.warmup_interval,
            max_cached_steps=opt.max_cached_steps,
            max_continuous_cached_steps=opt.max_continuous_cached_steps,
            has_mask=opt.has_mask,
            static_mask=opt.static_mask,
        ),
    )
    decision = g.call_function(
        gates.decide,
        (env[part.h_fn], env[part.h0], st["p"], gate, acc),
        dict(threshold=opt.threshold, acc_limit=opt.acc_limit, group=opt.group),
    )
    diff = g.call_function(operator.getitem, (decision, 0))
    cache = g.call_function(operator.getitem, (decision, 1))
    operands = list(dict.fromkeys([env[i] for i in part.middle_inputs] + bases + [*residuals, valid, elapsed]))
    to_parent = {i: env[i] for i in part.middle_inputs}

    def compute_body(graph: fx.Graph, benv: dict) -> list[fx.Node]:
        local: dict[fx.Node, fx.Node] = {}
        for node in nodes:
            if region[node] == "middle":
                local[node] = _copy_meta(graph.node_copy(node, lambda n: local[n] if n in local else benv[to_parent[n]]), node)
        # both branches must return fresh tensors of one layout: views (e.g. FLUX's slice of its
        # text+image stream) and strided values are copied to contiguous ones
        return [
            _flat(graph, graph.call_function(torch.ops.aten.clone.default, (local[o],), {"memory_format": torch.contiguous_format}))
            if _is_view(o) or not o.meta["val"].is_contiguous()
            else _flat(graph, local[o])
            for o in outs
        ]

    def cache_body(graph: fx.Graph, benv: dict) -> list[fx.Node]:
        vld, el = benv[valid], benv[elapsed]
        return [_flat(graph, graph.call_function(gates.forecast, (benv[r], benv[b], vld, el))) for r, b in zip(residuals, bases)]

    cache_gm = _branch(gm, operands, cache_body, "CacheBranch")
    compute_gm = _branch(gm, operands, compute_body, "ComputeBranch")
    gm.add_submodule("dittofx_cache_branch", cache_gm)
    gm.add_submodule("dittofx_compute_branch", compute_gm)
    cond = g.call_function(
        torch.ops.higher_order.cond,
        (cache, g.get_attr("dittofx_cache_branch"), g.get_attr("dittofx_compute_branch"), tuple(operands)),
    )
    for j, (out, base) in enumerate(zip(outs, bases)):  # the base has the output's shape
        env[out] = _copy_meta(g.call_method("view_as", (g.call_function(operator.getitem, (cond, j)), base)), out)
    return diff, cache


def _flat(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """A cond output as 1-D. torch.cond checks that symbolic output strides are products of the
    sizes; a contiguous stride over a size like (h//2)*(w//2) comes out as 16*Max(1, (h//2)*(w//2))
    and fails that check, so dynamo stops at the first recompile with dynamic shapes (Wan, PixArt at
    a second resolution). A 1-D tensor's stride is 1."""
    return graph.call_function(torch.ops.aten.view.default, (node, [-1]))
