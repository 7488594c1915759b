"""Rewrite the partitioned graph for DBPrune (SPEC §7):

    prologue | Fn | begin_step | prune_decide (one reduction) -> one copy to the host
             | per middle block: cond(pruned: inputs + stored residual, run: the block), store
             | finish_prune | Bn | epilogue

Every prunable block's decision is made up front from the middle's input (what exists before any
middle block runs), so the step needs one device-to-host copy of the decision vector and the
per-block `torch.cond`s branch on host values: one sync per step, not one per block.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..patterns.chain import Block, int_hint, numel_hint
from ..runtime import gates
from ..runtime.state import state_names
from .partition import Partition, PartitionError, pair_carried
from .fx_utils import cond_branch, copy_meta, dense, flat, fresh_flat, memory_order, new_module, unflat
from .rewrite import begin_graph
from .sizes import cond_operands

__all__ = ["PruneRewritePass", "PrunableBlock", "prunable_blocks"]


@dataclass
class PrunableBlock:
    block: Block
    index: int  # position in the chain (what non_prune_block_ids refers to)
    nodes: list[fx.Node]
    inputs: list[fx.Node]  # read by the block, produced outside it
    outputs: list[fx.Node]  # produced by the block, read after it
    pairs: dict[fx.Node, fx.Node]  # output -> the input it is the new value of
    hidden_in: fx.Node  # its largest carried input: what its input norm is measured on


def prunable_blocks(gm: fx.GraphModule, part: Partition, non_prune: tuple[int, ...]) -> list[PrunableBlock]:
    """The middle blocks that may be pruned, with their carried inputs and outputs paired; raises
    where `non_prune` (the config's `non_prune_block_ids`) names a block past the chain or leaves none."""
    nodes = list(gm.graph.nodes)
    chain, n = part.chain, len(part.chain)
    outside = [i for i in non_prune if i >= n]
    if outside:
        raise ValueError(f"non_prune_block_ids={list(non_prune)}: {outside} past the chain; allowed: 0..{n - 1} ({n} blocks: {chain.lists})")
    found = []
    for index in range(part.fn_blocks, n - part.bn_blocks):
        if index in non_prune:
            continue
        block = chain.blocks[index]
        inside = [nd for nd in nodes[block.start : block.end + 1] if part.region[nd] == "middle"]
        members = set(inside)
        inputs = list(dict.fromkeys(a for nd in inside for a in nd.all_input_nodes if a not in members))
        outputs = [nd for nd in inside if any(u not in members for u in nd.users)]
        if any(not isinstance(o.meta.get("val"), torch.Tensor) for o in outputs):
            raise PartitionError(f"cannot prune block {block.path}: it hands a non-tensor to later code")
        carried = [i for i in inputs if part.region.get(i) in ("Fn", "middle")]  # the rest: weights, invariants
        pairs = pair_carried(outputs, carried)
        hidden_in = max(pairs.values(), key=numel_hint)
        if _batch(hidden_in) != _batch(part.h_fn):
            raise ValueError(
                f"DBPrune: block {block.path} runs on a batch of {_batch(hidden_in)} where the middle's input has "
                f"{_batch(part.h_fn)} (e.g. frames folded into the batch), and its input norm is kept per sample of the "
                f"middle's input; method 'dbcache' caches this model"
            )
        found.append(PrunableBlock(block, index, inside, inputs, outputs, pairs, hidden_in))
    if not found:
        raise ValueError(
            f"non_prune_block_ids={list(non_prune)} with Fn_compute_blocks={part.fn_blocks}, Bn_compute_blocks={part.bn_blocks}: "
            f"no block of the {n} in the chain is left to prune"
        )
    return found


def _batch(node: fx.Node) -> int:
    return int_hint(node.meta["val"].shape[0], fallback=1)


class PruneRewritePass(PassBase):
    """Graph in (partitioned), DBPrune graph out; state placeholders lead, as in CacheRewritePass."""

    def __init__(self, partition: Partition, blocks: list[PrunableBlock], *, threshold: float,
                 max_warmup_steps: int, warmup_interval: int, timestep_input: str | None, group: str | None = None):  # fmt: skip
        super().__init__()
        self.part, self.blocks = partition, blocks
        self.threshold, self.warmup, self.interval = threshold, max_warmup_steps, warmup_interval
        self.timestep_input, self.group = timestep_input, group

    def call(self, gm: fx.GraphModule) -> PassResult:
        return PassResult(self._rewrite(gm), True)

    def _rewrite(self, gm: fx.GraphModule) -> fx.GraphModule:
        part, blocks = self.part, self.blocks
        nodes = list(gm.graph.nodes)
        outs = [o for b in blocks for o in b.outputs]
        g, st, env, copy = begin_graph(gm, part, state_names(len(outs), norms=True), self.timestep_input)
        step, valid = st["step"], st["valid"]
        x = env[part.h_fn]
        decision = g.call_function(
            gates.prune_decide,
            (x, st["p"], st["norms"], valid, step),
            dict(threshold=self.threshold, max_warmup_steps=self.warmup, warmup_interval=self.interval, group=self.group),
        )
        diffs = g.call_function(operator.getitem, (decision, 0))
        pruned = g.call_function(operator.getitem, (decision, 1))
        # the step's one device-to-host copy: every cond below branches on a host value
        on_host = g.call_function(torch.ops.aten._to_copy.default, (pruned,), {"device": torch.device("cpu")})

        residuals = iter(st[f"residual_{j}"] for j in range(len(outs)))
        by_start = {b.nodes[0]: (j, b) for j, b in enumerate(blocks)}
        done: set[fx.Node] = set()
        branches: dict[str, fx.GraphModule] = {}
        for node in nodes:
            if part.region.get(node) != "middle" or node in done:
                continue
            if node not in by_start:
                copy(node)  # non-prunable blocks and the code between blocks
                continue
            j, b = by_start[node]
            res = [next(residuals) for _ in b.outputs]
            self._block(g, gm, b, j, res, env, on_host, pruned, x, st, branches)
            done.update(b.nodes)

        g.call_function(gates.finish_prune, (step, valid, st["hist_diff"], st["hist_cached"], diffs, pruned))
        for node in nodes:
            if node.op == "output":
                g.output(fx.map_arg(node.args[0], lambda n: env[n]))
            elif node.op != "placeholder" and part.region[node] in ("Bn", "epilogue"):
                copy(node)
        g.lint()
        return new_module(gm, g, branches, "DittofxPruned")

    def _block(self, g, gm, b: PrunableBlock, j, res, env, on_host, pruned, x, st, branches) -> None:
        """cond(pruned[j]: paired inputs + residuals, else: the block), then the stores (its branch
        modules go into `branches` by attribute name). Both
        branches return each output 1-D in its eager memory order (a transposed stream, as
        HunyuanVideo's, included), as rewrite's cond does."""
        try:  # floats are no cond operands: the branch computes them again from the sizes they come from
            recipe, passed = cond_operands(b.inputs)
        except ValueError as err:
            raise PartitionError(f"cannot prune block {b.block.path}: it reads {err}") from None
        to_parent = {i: env[i] for i in passed}
        operands = list(dict.fromkeys([*to_parent.values(), *res]))
        orders = {o: memory_order(o) for o in b.outputs}

        def run_body(graph: fx.Graph, benv: dict) -> list[fx.Node]:
            local: dict[fx.Node, fx.Node] = {}
            for nd in [*recipe, *b.nodes]:
                local[nd] = copy_meta(graph.node_copy(nd, lambda a: local[a] if a in local else benv[to_parent[a]]), nd)
            return [fresh_flat(graph, local[o], o, orders[o]) for o in b.outputs]

        def prune_body(graph: fx.Graph, benv: dict) -> list[fx.Node]:
            # input + residual keeps the input's strides: copied into the output's memory order
            # where either is not the dims' own order (else it is fresh and dense already)
            outs = []
            for o, r in zip(b.outputs, res):
                out = graph.call_function(gates.add_residual, (benv[to_parent[b.pairs[o]]], benv[r]))
                outs.append(flat(graph, dense(graph, out, orders[o]) if orders[o] or memory_order(b.pairs[o]) else out))
            return outs

        branches[f"dittofx_prune_{j}"] = cond_branch(gm, operands, prune_body, f"PruneBranch{j}")
        branches[f"dittofx_run_{j}"] = cond_branch(gm, operands, run_body, f"RunBranch{j}")
        # a buffer of its own per block: AOTInductor's C++ wrapper (torch 2.13) names a cond's
        # predicate scalar after its buffer, so predicates that are views of one buffer (select)
        # all read the first block's flag there, and a package pruned every block on it
        pred = g.call_function(torch.ops.aten.eq.Scalar, (g.call_function(torch.ops.aten.select.int, (on_host, 0, j)), True))
        cond = g.call_function(
            torch.ops.higher_order.cond,
            (pred, g.get_attr(f"dittofx_prune_{j}"), g.get_attr(f"dittofx_run_{j}"), tuple(operands)),
        )
        for k, o in enumerate(b.outputs):  # back from 1-D to the paired input's shape
            env[o] = copy_meta(unflat(g, g.call_function(operator.getitem, (cond, k)), env[b.pairs[o]], orders[o]), o)
        g.call_function(
            gates.prune_store,
            (pruned, j, res, [env[o] for o in b.outputs], [env[b.pairs[o]] for o in b.outputs],
             st["p"], x, st["norms"], env[b.hidden_in]),
        )  # fmt: skip
