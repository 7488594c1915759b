"""Find the chain of transformer blocks in a captured graph, with no per-model knowledge.

Blocks are the children of an `nn.ModuleList` whose nodes (read from `nn_module_stack`) form
contiguous runs in index order. The main chain is the list with the most blocks, extended by the
lists run right before or after it whose first block's carried inputs all come from the chain and
from no other list (FLUX: double then single blocks). Refiners (HunyuanVideo, ZImage), guidance
approximators (Chroma) and hint blocks (WanVACE) fail that test and stay in the prologue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

__all__ = ["Block", "Chain", "ChainNotFound", "carried_inputs", "find_chain"]


class ChainNotFound(ValueError):
    pass


@dataclass
class Block:
    list_name: str
    index: int
    start: int  # position of the first node of the block in the graph
    end: int  # position of the last node

    @property
    def path(self) -> str:
        return f"{self.list_name}.{self.index}"


@dataclass
class Chain:
    blocks: list[Block]
    lists: list[str]
    candidates: dict[str, int] = field(default_factory=dict)  # every list seen -> blocks found

    def __len__(self) -> int:
        return len(self.blocks)


def _module_lists(model: torch.nn.Module) -> dict[str, int]:
    return {name: len(m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)}


def _block_of(node: fx.Node, lists: dict[str, int]) -> tuple[str, int] | None:
    """The outermost (list, index) whose child produced this node."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for path, _cls in stack.values():
        head, _, tail = path.rpartition(".")
        if head in lists and tail.isdigit():
            return head, int(tail)
    return None


def _blocks_per_list(nodes: list[fx.Node], lists: dict[str, int]) -> dict[str, list[Block]]:
    spans: dict[tuple[str, int], list[int]] = {}
    for pos, node in enumerate(nodes):
        owner = _block_of(node, lists)
        if owner is not None:
            span = spans.setdefault(owner, [pos, pos])
            span[1] = pos
    per_list: dict[str, list[Block]] = {}
    for (name, index), (start, end) in sorted(spans.items(), key=lambda kv: kv[1][0]):
        per_list.setdefault(name, []).append(Block(name, index, start, end))
    ordered = {}
    for name, blocks in per_list.items():
        in_order = all(a.index < b.index and a.end < b.start for a, b in zip(blocks, blocks[1:]))
        if in_order:
            ordered[name] = blocks
    return ordered


def _list_ancestry(nodes: list[fx.Node], blocks: dict[str, list[Block]]) -> dict[fx.Node, frozenset[str]]:
    """For each node, the lists whose *last* block it depends on."""
    last_end = {name: bl[-1].end for name, bl in blocks.items()}
    last_start = {name: bl[-1].start for name, bl in blocks.items()}
    deps: dict[fx.Node, frozenset[str]] = {}
    for pos, node in enumerate(nodes):
        acc = frozenset().union(*(deps[a] for a in node.all_input_nodes)) if node.all_input_nodes else frozenset()
        for name in blocks:
            if last_start[name] <= pos <= last_end[name]:
                acc = acc | {name}
        deps[node] = acc
    return deps


def block_inputs(nodes: list[fx.Node], block: Block) -> list[fx.Node]:
    """Values produced before `block` and read inside it."""
    seen: dict[fx.Node, None] = {}
    for node in nodes[block.start : block.end + 1]:
        for inp in node.all_input_nodes:
            if inp.meta["dittofx_pos"] < block.start:
                seen.setdefault(inp, None)
    return list(seen)


def carried_inputs(nodes: list[fx.Node], blocks: list[Block], params: set[fx.Node]) -> list[fx.Node]:
    """Tensors the first of `blocks` reads that no later one reads again (and not weights): the
    values the chain carries from block to block. What later blocks read too is loop-invariant."""
    later = read_by(nodes, blocks[1:])
    return [
        n for n in block_inputs(nodes, blocks[0])
        if n not in later and n not in params and isinstance(n.meta.get("val"), torch.Tensor)
    ]  # fmt: skip


def read_by(nodes: list[fx.Node], blocks: list[Block]) -> set[fx.Node]:
    """Every value read by any of `blocks`."""
    return {inp for blk in blocks for node in nodes[blk.start : blk.end + 1] for inp in node.all_input_nodes}


def find_chain(
    gm: fx.GraphModule,
    model: torch.nn.Module,
    params: set[fx.Node],
    block_lists: tuple[str, ...] | None = None,
) -> Chain:
    """`params`: the placeholders of weights and buffers (read by one block, yet not carried)."""
    nodes = list(gm.graph.nodes)
    for pos, node in enumerate(nodes):
        node.meta["dittofx_pos"] = pos
    lists = _module_lists(model)
    per_list = _blocks_per_list(nodes, lists)
    candidates = {name: len(bl) for name, bl in per_list.items()}
    if block_lists is not None:
        missing = [b for b in block_lists if b not in per_list]
        if missing:
            raise ChainNotFound(
                f"blocks={list(block_lists)!r}: {missing} not found as ModuleLists run in index order in the "
                f"captured graph; lists seen: {candidates or 'none'}"
            )
        names = list(block_lists)
    else:
        if not per_list:
            raise ChainNotFound(
                f"no transformer block chain found in {type(model).__name__}: searched the captured graph for "
                f"children of an nn.ModuleList run one after another in index order (ModuleLists in the model: "
                f"{sorted(lists) or 'none'}); pass blocks=[...] to name them"
            )
        main = max(per_list, key=lambda n: (len(per_list[n]), per_list[n][0].start))
        names = [main]
        ancestry = _list_ancestry(nodes, per_list)
        others = sorted((n for n in per_list if n != main), key=lambda n: per_list[n][0].start)
        # extend backwards, then forwards, one adjacent list at a time
        while True:
            before = [n for n in others if n not in names and per_list[n][-1].end < per_list[names[0]][0].start]
            if not before:
                break
            prev = max(before, key=lambda n: per_list[n][-1].end)
            if not _feeds(nodes, per_list, ancestry, params, prev, names[0]):
                break
            names.insert(0, prev)
        while True:
            after = [n for n in others if n not in names and per_list[n][0].start > per_list[names[-1]][-1].end]
            if not after:
                break
            nxt = min(after, key=lambda n: per_list[n][0].start)
            if not _feeds(nodes, per_list, ancestry, params, names[-1], nxt):
                break
            names.append(nxt)
    blocks = [b for name in names for b in per_list[name]]
    if any(a.end >= b.start for a, b in zip(blocks, blocks[1:])):
        raise ChainNotFound(f"blocks={names!r}: these lists do not run one after another in the captured graph")
    return Chain(blocks=blocks, lists=names, candidates=candidates)


def numel_hint(node: fx.Node) -> int:
    """Element count of a node's example value (symbolic dims at their example sizes)."""
    total = 1
    for d in node.meta["val"].shape:
        total *= d if isinstance(d, int) else d.node.hint
    return total


def _feeds(nodes, per_list, ancestry, params, src: str, dst: str) -> bool:
    """`src` directly precedes `dst` in the chain: dst's main carried input (the largest) depends on
    src's last block, and no carried input depends on a list that src's last block does not."""
    carried = carried_inputs(nodes, per_list[dst], params)
    if not carried:
        return False
    upstream = ancestry[nodes[per_list[src][-1].end]]
    main = max(carried, key=numel_hint)
    return src in ancestry[main] and all(ancestry[n] <= upstream for n in carried)
