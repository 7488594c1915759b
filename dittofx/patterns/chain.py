"""Find the chain of transformer blocks in a captured graph, with no per-model knowledge.

Blocks are the children of an `nn.ModuleList` whose nodes (read from `nn_module_stack`) form
contiguous runs in index order. The main chain is the list whose blocks hold the most graph nodes
(not the most blocks: a list of 48 caption projections is not the chain). A list whose blocks
alternate with the main list's joins it in run order (Latte's spatial and temporal blocks).
Otherwise the chain is extended by the lists run right before or after it whose first block's
carried inputs all come from the chain and from no other list, and whose main carried input takes
no model input by a path outside the block lists that the previous list does not read (FLUX:
double then single blocks). Refiners (HunyuanVideo, ZImage, Krea2's text fusion, whose output meets
the patchified image only after them), guidance approximators (Chroma) and hint blocks (WanVACE)
fail that test and stay in the prologue.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

try:
    from torch.fx.experimental.symbolic_shapes import optimization_hint as int_hint
except ImportError:  # torch < 2.12 names it size_hint (same signature)
    from torch.fx.experimental.symbolic_shapes import size_hint as int_hint

__all__ = ["Block", "Chain", "ChainNotFound", "carried_inputs", "find_chain", "made_from", "module_lists", "numel_hint", "op_name"]


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


def module_lists(model: torch.nn.Module) -> dict[str, int]:
    """The non-empty ModuleLists of `model` and their lengths: where block chains are looked for."""
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


def _blocks_per_list(nodes: list[fx.Node], lists: dict[str, int]) -> tuple[dict[str, list[Block]], list[str]]:
    """The blocks of each list run one after another in index order, and the lists run otherwise
    (a block run twice: weight-shared or looped blocks; blocks out of index order)."""
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
    return ordered, [name for name in per_list if name not in ordered]


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


def made_from(nodes: list[fx.Node], seeds: Iterable[fx.Node]) -> set[fx.Node]:
    """`seeds` and every node of `nodes` (in graph order) computed from one of them."""
    made = set(seeds)
    for node in nodes:
        if node not in made and any(a in made for a in node.all_input_nodes):
            made.add(node)
    return made


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
    lists = module_lists(model)
    per_list, unordered = _blocks_per_list(nodes, lists)
    candidates = {name: len(bl) for name, bl in per_list.items()}
    not_a_chain = f"; not in index order, or a block run more than once: {unordered}" if unordered else ""
    if block_lists is not None:
        missing = [b for b in block_lists if b not in per_list]
        if missing:
            raise ChainNotFound(
                f"blocks={list(block_lists)!r}: {missing} not found as ModuleLists run in index order in the "
                f"captured graph; lists seen: {candidates or 'none'}{not_a_chain}"
            )
        names = list(block_lists)
    else:
        if not per_list:
            raise ChainNotFound(
                f"no transformer block chain found in {type(model).__name__}: searched the captured graph for "
                f"children of an nn.ModuleList run one after another in index order (ModuleLists in the model: "
                f"{sorted(lists) or 'none'}{not_a_chain}); pass blocks=[...] to name them"
            )
        main = max(per_list, key=lambda n: (sum(b.end - b.start + 1 for b in per_list[n]), per_list[n][0].start))
        woven = [n for n in per_list if n != main and _interleaved(per_list[main] + per_list[n])]
        if woven:  # Latte: spatial block i, then temporal block i, ...
            names = sorted([main, woven[0]], key=lambda n: per_list[n][0].start)
            return Chain(blocks=_in_run_order(per_list, names), lists=names, candidates=candidates)
        names = [main]
        ancestry = _list_ancestry(nodes, per_list)
        inputs = _input_ancestry(nodes, params), _input_ancestry(nodes, params, lists)
        others = sorted((n for n in per_list if n != main), key=lambda n: per_list[n][0].start)
        # extend backwards, then forwards, one adjacent list at a time
        while True:
            before = [n for n in others if n not in names and per_list[n][-1].end < per_list[names[0]][0].start]
            if not before:
                break
            prev = max(before, key=lambda n: per_list[n][-1].end)
            if not _feeds(nodes, per_list, ancestry, inputs, params, prev, names[0]):
                break
            names.insert(0, prev)
        while True:
            after = [n for n in others if n not in names and per_list[n][0].start > per_list[names[-1]][-1].end]
            if not after:
                break
            nxt = min(after, key=lambda n: per_list[n][0].start)
            if not _feeds(nodes, per_list, ancestry, inputs, params, names[-1], nxt):
                break
            names.append(nxt)
    return Chain(blocks=_in_run_order(per_list, names), lists=names, candidates=candidates)


def _interleaved(blocks: list[Block]) -> bool:
    """Two lists of two blocks or more whose blocks alternate strictly by position."""
    ordered = sorted(blocks, key=lambda b: b.start)
    counts = [sum(b.list_name == name for b in blocks) for name in {b.list_name for b in blocks}]
    return len(counts) == 2 and min(counts) >= 2 and all(a.list_name != b.list_name for a, b in zip(ordered, ordered[1:]))


def _in_run_order(per_list: dict[str, list[Block]], names: list[str]) -> list[Block]:
    """The lists' blocks by position: one list after another, or two interleaved."""
    blocks = [b for name in names for b in per_list[name]]
    ordered = sorted(blocks, key=lambda b: b.start)
    if any(a.end >= b.start for a, b in zip(ordered, ordered[1:])) or (
        ordered != blocks and not (len(names) == 2 and _interleaved(blocks))
    ):
        raise ChainNotFound(f"blocks={names!r}: these lists neither run one after another nor alternate in the captured graph")
    return ordered


def functional_name(name: str) -> str:
    """An in-place op's name as its functional one's (`add_` -> "add"): eager calls log in-place
    ops that an exported graph holds in functional form."""
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def op_name(node: fx.Node) -> str:
    """A call's op as a short name: `aten.add.Tensor` and `add_` -> "add"; items -> "getitem"."""
    if node.target is operator.getitem:
        return "getitem"
    return functional_name(getattr(node.target, "__name__", str(node.target)).split(".")[0])


def numel_hint(node: fx.Node) -> int:
    """Element count of a node's example value (symbolic dims at their example sizes; a
    data-dependent one, as after a slice by a tensor's value, counts 1)."""
    total = 1
    for d in node.meta["val"].shape:
        total *= int_hint(d, fallback=1)
    return total


def _input_ancestry(
    nodes: list[fx.Node], params: set[fx.Node], lists: dict[str, int] | None = None
) -> dict[fx.Node, frozenset[fx.Node]]:
    """For each node, the model inputs (placeholders other than weights and constants) it depends
    on; with `lists`, only along paths that pass through no block of those lists."""
    deps: dict[fx.Node, frozenset[fx.Node]] = {}
    for node in nodes:
        if node.op == "placeholder":
            deps[node] = frozenset() if node in params else frozenset([node])
        elif lists is not None and _block_of(node, lists) is not None:
            deps[node] = frozenset()
        else:
            deps[node] = frozenset().union(*(deps[a] for a in node.all_input_nodes))
    return deps


def _feeds(nodes, per_list, ancestry, inputs, params, src: str, dst: str) -> bool:
    """`src` directly precedes `dst` in the chain: dst's main carried input (the largest) depends on
    src's last block, no model input reaches it outside the block lists unless src's last block
    reads that input too or it is added to the stream (else src refines one stream that joins a
    fresh one after it: Krea2's text fusion meets the patchified image there; Bria FIBO's next text
    layer, projected by a list of its own, is fine; FLUX ControlNet's residual, added after each
    block, is fine), and no carried input depends on a list that src's last block does not."""
    carried = carried_inputs(nodes, per_list[dst], params)
    if not carried:
        return False
    last = nodes[per_list[src][-1].end]
    upstream = ancestry[last]
    main = max(carried, key=numel_hint)
    read, direct = inputs
    fresh = direct[main] - read[last]
    return (
        src in ancestry[main]
        and (not fresh or _only_added(nodes, last, main, fresh, direct, params))
        and all(ancestry[n] <= upstream for n in carried)
    )


def _only_added(nodes: list[fx.Node], last: fx.Node, main: fx.Node, fresh: frozenset, direct: dict, params: set[fx.Node]) -> bool:
    """Every node between `last` and `main` where a value from the `fresh` model inputs meets the
    stream leaving `last` is an elementwise add of the stream's shape, of a value no weight made: a
    residual injected (FLUX ControlNet's `hidden_states + controlnet_block_samples[i]`), not a
    stream joining (a cat; an embedded input added to a list's output)."""
    span = nodes[last.meta["dittofx_pos"] + 1 : main.meta["dittofx_pos"] + 1]
    stream = {last}
    for node in span:
        if not any(a in stream for a in node.all_input_nodes):
            continue
        stream.add(node)
        joining = [a for a in node.all_input_nodes if a not in stream and direct[a] & fresh]
        if joining and not (
            op_name(node) == "add" and all(_shape(a) == _shape(node) for a in node.all_input_nodes) and not _made_by_weights(joining, params)
        ):
            return False
    return True


def _made_by_weights(values: list[fx.Node], params: set[fx.Node]) -> bool:
    """Whether a weight (or constant) placeholder is among the values' ancestors."""
    seen, todo = set(), list(values)
    while todo:
        node = todo.pop()
        if node in params:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(node.all_input_nodes)
    return False


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None
