"""The passes in the order they run on a captured graph (the engine calls this at a first call):

    captured graph (capture.py)
      -> the block chain (patterns/chain.py); TeaCache: block 0's modulated input (patterns/modulation.py)
      -> PartitionPass: prologue | Fn | middle | Bn | epilogue (partition.py)
      -> CacheRewritePass once per decision kind (rewrite.py), or PruneRewritePass (prune.py)
      -> SplitAtDecisionPass: the device graph as head and tails (split.py), unless never asked
         (split_at_decision=False, DBPrune)

Graph in, graphs out; the engine (runtime/engine.py) feeds them the live weights and the state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from ..config import CacheConfig, DBPruneConfig, TeaCacheConfig
from ..patterns.chain import Chain, find_chain
from ..patterns.modulation import find_modulated_input
from .capture import CapturedGraph
from .partition import REGIONS, Partition, PartitionPass, UnpairedOutputError
from .prune import PruneRewritePass, prunable_blocks
from .rewrite import DECISIONS, CacheRewritePass, RewriteOptions
from .split import SIDES, SplitAtDecisionPass

__all__ = ["Rewritten", "rewrite_captured"]


@dataclass
class Rewritten:
    chain: Chain
    partition: Partition
    # per decision: "device" (torch.cond), "compute", "cache"; split: also the device graph's halves
    # "split-head", "split-compute", "split-cache"
    graphs: dict[str, fx.GraphModule]
    state_nodes: list[fx.Node]  # nodes whose shapes size the state: the signal, then each stored residual
    region_counts: dict[str, int]
    pruned_blocks: list[int]  # DBPrune: chain positions of the prunable blocks


def rewrite_captured(
    captured: CapturedGraph, model: torch.nn.Module, cfg: CacheConfig, opts: RewriteOptions, split: bool = False
) -> Rewritten:
    """Find the chain in `captured`, partition it and rewrite it for `cfg` (`split`: also cut the
    device graph at its decision)."""
    gm = captured.gm
    params = set(captured.weight_placeholders())
    chain = find_chain(gm, model, params, cfg.blocks)
    signal = find_modulated_input(list(gm.graph.nodes), chain, params, opts.timestep_input) if isinstance(cfg, TeaCacheConfig) else None
    part_pass = PartitionPass(chain, cfg.Fn_compute_blocks, cfg.Bn_compute_blocks, params, signal)
    part_pass(gm)
    part = part_pass.partition
    counts = {r: len(part.nodes_in(r)) for r in REGIONS}
    if isinstance(cfg, DBPruneConfig):
        blocks = prunable_blocks(gm, part, cfg.non_prune_block_ids)
        pruned = PruneRewritePass(
            part, blocks, threshold=opts.threshold, max_warmup_steps=cfg.max_warmup_steps,
            warmup_interval=cfg.warmup_interval, timestep_input=opts.timestep_input, group=opts.group,
        )(gm).graph_module  # fmt: skip
        graphs = dict.fromkeys(DECISIONS, pruned)  # every decision is made in the graph
        state_nodes = _sized_by_inputs([part.h_fn, *(o for b in blocks for o in b.outputs)])
        return Rewritten(chain, part, graphs, state_nodes, counts, [b.index for b in blocks])
    state_nodes = _sized_by_inputs([part.h_fn, *part.middle_outputs])
    graphs = {d: CacheRewritePass(part, opts, d)(gm).graph_module for d in DECISIONS}
    if split:
        # the head runs the cache path before the decision where that wastes no Bn block on a computed step
        speculate = counts["Bn"] == 0
        graphs.update({f"split-{side}": SplitAtDecisionPass(side, speculate)(graphs["device"]).graph_module for side in SIDES})
    return Rewritten(chain, part, graphs, state_nodes, counts, [])


def _sized_by_inputs(state_nodes: list[fx.Node]) -> list[fx.Node]:
    """`state_nodes`, whose shapes size the cache state before each call: none may depend on the
    data (a size only the call computes, as Framepack's history lengths), where no state can be
    made ahead (the engine then caches block by block)."""
    for node in state_nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and free_unbacked_symbols(val):
            raise UnpairedOutputError(
                f"cannot cache the middle region: the cache state would hold {node.name}, whose shape "
                f"{tuple(str(d) for d in val.shape)} depends on the data"
            )
    return state_nodes
