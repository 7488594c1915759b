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
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..runtime import gates
from ..runtime.state import SCALARS, state_names
from .partition import Partition, PartitionError
from .fx_utils import cond_branch, copy_meta, dense, flat, fresh_flat, is_view, memory_order, new_module, unflat
from .sizes import cond_operands

__all__ = ["CacheRewritePass", "DECISIONS", "RewriteOptions", "begin_graph"]


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
    # TeaCache (SPEC §6): the signal is block 0's modulated input, compared with the previous
    # step's and rescaled by this polynomial; the last step of a request always computes
    teacache_coefficients: tuple[float, ...] | None = None
    last_step_computes: bool = False
    gap_in_timesteps: bool = False  # TaylorSeer's gap in the timestep input's units, not in steps
    newton: bool = False  # TaylorSeer as a Newton polynomial through the stored computes

    def decision_options(self, decision: str) -> dict:
        """The keyword arguments of `gates.decide_step` for a step decided by `decision`."""
        return dict(
            decision=decision,
            in_timesteps=self.gap_in_timesteps,
            threshold=self.threshold,
            acc_limit=self.acc_limit,
            group=self.group,
            teacache_coefficients=self.teacache_coefficients,
            max_warmup_steps=self.max_warmup_steps,
            warmup_interval=self.warmup_interval,
            max_cached_steps=self.max_cached_steps,
            max_continuous_cached_steps=self.max_continuous_cached_steps,
            has_mask=self.has_mask,
            static_mask=self.static_mask,
            last_step_computes=self.last_step_computes,
        )

    def forecast_at(self, valid: Any, elapsed: Any, times: Any, now: Any) -> tuple:
        """`gates.forecast`'s arguments after (residual, carried): Newton's takes the stored positions too."""
        return (valid, elapsed, times, now) if self.newton else (valid, elapsed)


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


def begin_graph(gm: fx.GraphModule, part: Partition, names: list[str], timestep_input: str | None):
    """The start every cached graph shares: the state placeholders (`names`), the model's own
    placeholders, the prologue and Fn copied, and `begin_step` (new-request detection). Returns
    the new graph, the state nodes by name, the node map, and `copy(node)` for what follows."""
    nodes = list(gm.graph.nodes)
    g = fx.Graph()
    st = {name: g.placeholder(f"dittofx_{name}") for name in names}
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node.op == "placeholder":
            env[node] = copy_meta(g.placeholder(node.name), node)

    def copy(node: fx.Node) -> None:
        env[node] = copy_meta(g.node_copy(node, lambda n: env[n]), node)

    for node in nodes:
        if node.op not in ("placeholder", "output") and part.region[node] in ("prologue", "Fn"):
            copy(node)
    timestep = next((env[n] for n in nodes if n.op == "placeholder" and n.name == timestep_input), None)
    g.call_function(
        gates.begin_step,
        (st["step"], st["num_steps"], st["last_ts"], st["valid"], st["cached_count"], st["cont_count"], st["acc"],
         st["hist_diff"], st["hist_cached"], timestep),
    )  # fmt: skip
    return g, st, env, copy


def rewrite(gm: fx.GraphModule, part: Partition, opt: RewriteOptions, decision: str = "device") -> fx.GraphModule:
    region = part.region
    nodes = list(gm.graph.nodes)
    outs = part.middle_outputs
    g, st, env, copy = begin_graph(gm, part, state_names(len(outs)), opt.timestep_input)
    residuals = [st[f"residual_{j}"] for j in range(len(outs))]
    step, _num, last_ts, valid, cached_count, cont_count, acc = (st[n] for n in SCALARS)

    # the skeleton of the middle (blocks skipped, code between them kept) gives each output's base
    def skeleton_arg(n: fx.Node) -> fx.Node:
        return env[part.skip.get(n, n)]

    for node in part.glue:
        env[node] = copy_meta(g.node_copy(node, skeleton_arg), node)
    bases = [env[part.base[o]] for o in outs]

    # where this step sits (begin_step put its timestep in last_ts), how far the last compute is,
    # and the decision (on the device, or the host's)
    decided = g.call_function(
        gates.decide_step,
        (step, st["num_steps"], last_ts, valid, cached_count, cont_count, acc, st["mask"], st["p"], st["taylor_times"],
         env[part.h_fn], env[part.h0]),
        opt.decision_options(decision),
    )  # fmt: skip
    diff, cache, elapsed, now = (g.call_function(operator.getitem, (decided, i)) for i in range(4))
    at = opt.forecast_at(valid, elapsed, st["taylor_times"], now)
    branches: dict[str, fx.GraphModule] = {}
    if decision == "device":
        _cond_middle(g, gm, part, cache, env, nodes, outs, residuals, bases, at, branches)
    else:
        if decision == "compute":
            for node in nodes:
                if region[node] == "middle":
                    copy(node)
        else:
            for r, b, out in zip(residuals, bases, outs):
                env[out] = copy_meta(g.call_function(gates.forecast, (r, b, *at)), out)

    g.call_function(
        gates.finish_step,
        (
            cache, diff, step, elapsed, valid, cached_count, cont_count, acc,
            st["hist_diff"], st["hist_cached"], st["p"], env[part.h_fn], env[part.h0],
            residuals, [env[o] for o in outs], bases, st["taylor_times"], now,
        ),
        {"signal_every_step": opt.teacache_coefficients is not None, "newton": opt.newton},
    )  # fmt: skip

    for node in nodes:
        if node.op == "output":
            g.output(fx.map_arg(node.args[0], lambda n: env[n]))
        elif node.op != "placeholder" and region[node] in ("Bn", "epilogue"):
            copy(node)
    g.lint()
    return new_module(gm, g, branches, "DittofxCached")


def _cond_middle(g, gm, part, cache, env, nodes, outs, residuals, bases, at, branches) -> None:
    """The middle inside torch.cond(cache, forecast, middle), whose branch modules go into
    `branches` by attribute name."""
    region = part.region
    # views as operands (e.g. the chunks of one modulation linear that TeaCache's middle reads)
    # alias each other, which torch.cond refuses under compile: hand the branches copies
    # floats are no cond operands: the branch computes them again from the sizes they come from
    try:
        recipe, passed = cond_operands(part.middle_inputs)
    except ValueError as err:
        raise PartitionError(f"cannot cache the middle region: it reads {err}") from None
    to_parent = {i: g.call_function(torch.ops.aten.clone.default, (env[i],)) if is_view(i) else env[i] for i in passed}
    operands = list(dict.fromkeys([*to_parent.values(), *bases, *residuals, *at]))

    def compute_body(graph: fx.Graph, benv: dict) -> list[fx.Node]:
        local: dict[fx.Node, fx.Node] = {}
        for node in [*recipe, *(nd for nd in nodes if region[nd] == "middle")]:
            local[node] = copy_meta(graph.node_copy(node, lambda n: local[n] if n in local else benv[to_parent[n]]), node)
        return [fresh_flat(graph, local[o], o, orders[o]) for o in outs]

    def cache_body(graph: fx.Graph, benv: dict) -> list[fx.Node]:
        args = tuple(benv[a] for a in at)
        forecasts = [graph.call_function(gates.forecast, (benv[r], benv[b], *args)) for r, b in zip(residuals, bases)]
        return [flat(graph, dense(graph, f, orders[o]) if orders[o] else f) for f, o in zip(forecasts, outs)]

    orders = {o: memory_order(o) for o in outs}

    branches["dittofx_cache_branch"] = cond_branch(gm, operands, cache_body, "CacheBranch")
    branches["dittofx_compute_branch"] = cond_branch(gm, operands, compute_body, "ComputeBranch")
    cond = g.call_function(
        torch.ops.higher_order.cond,
        (cache, g.get_attr("dittofx_cache_branch"), g.get_attr("dittofx_compute_branch"), tuple(operands)),
    )
    for j, (out, base) in enumerate(zip(outs, bases)):  # the base has the output's shape
        env[out] = copy_meta(unflat(g, g.call_function(operator.getitem, (cond, j)), base, orders[out]), out)
