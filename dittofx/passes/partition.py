"""Split the captured graph into prologue | Fn | middle | Bn | epilogue.

Every node gets `meta["dittofx_region"]`. Code between blocks belongs to the block it follows,
but code after the middle's last block is Bn's (a cached step runs it on the carried values plus
the residual, as it would eagerly), and code after the chain's last block is the epilogue.
Nodes inside the chain that do not depend on the carried values (e.g. a rope table built lazily
in block 0 and reused later) are moved to the prologue when something outside their region reads
them, so that skipping the middle never leaves a later region without its inputs.

The analysis also finds the carried values at the boundaries and gives every middle output the
base it is cached from, `out = base + stored residual`: the middle input it updates (same shape
and dtype, ties broken along the residual stream), or, where code between middle blocks reshapes
the streams, that glue code run on the inputs (`Partition.glue`, kept on cached steps).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..patterns.chain import Chain, carried_inputs, made_from, numel_hint, op_name

__all__ = ["Partition", "PartitionPass", "REGIONS"]

REGIONS = ("prologue", "Fn", "middle", "Bn", "epilogue")

# Ops along which a value keeps flowing "as itself" through a block (the residual stream).
_RESIDUAL_OPS = {
    "add", "sub", "clamp", "to", "_to_copy", "clone", "contiguous", "view", "reshape", "slice", "cat",
    "squeeze", "unsqueeze", "select", "split", "split_with_sizes", "chunk", "getitem", "narrow", "alias",
}


class PartitionError(ValueError):
    pass


class UnpairedOutputError(PartitionError):
    """A middle output is no updated version of any carried input (e.g. a data-dependent length)."""


@dataclass
class Partition:
    chain: Chain
    fn_blocks: int
    bn_blocks: int
    region: dict[fx.Node, str]
    middle_inputs: list[fx.Node]  # read by the middle, produced outside it (params, invariants, carried)
    middle_outputs: list[fx.Node]  # produced in the middle, read after it
    carried_inputs: list[fx.Node]  # middle inputs that depend on the chain (the rest are invariant)
    # middle output -> its value with every middle block skipped (the base the residual is added
    # to): a middle input, or one of `glue` (code between blocks, e.g. a cat of two streams)
    base: dict[fx.Node, fx.Node]
    glue: list[fx.Node]
    skip: dict[fx.Node, fx.Node]  # every middle block output met -> the value it stands for when skipped
    h0: fx.Node  # carried hidden state entering the chain
    h_fn: fx.Node  # the same stream after Fn (TeaCache: block 0's modulated input); what `p` stores
    hoisted: list[fx.Node]
    # the carried outputs of the last Fn block that h_fn was picked from, as the largest at the
    # capture's sizes (none for TeaCache): at other sizes another may be the largest
    fn_streams: list[fx.Node] = field(default_factory=list)

    def nodes_in(self, name: str) -> list[fx.Node]:
        return [n for n, r in self.region.items() if r == name]


def _shape_key(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    return (val.dtype, tuple(str(d) for d in val.shape))


def _residual_sources(out: fx.Node, inputs: set[fx.Node]) -> set[fx.Node]:
    """Inputs reachable from `out` walking back only through residual-stream ops."""
    found, stack, seen = set(), [out], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in inputs:
            found.add(node)
            continue
        if node.op == "call_function" and op_name(node) in _RESIDUAL_OPS:
            stack.extend(node.all_input_nodes)
    return found


def pair_carried(outputs: list[fx.Node], inputs: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Match each output of a region with the input it is an updated version of."""
    pairs: dict[fx.Node, fx.Node] = {}
    free = list(inputs)
    for out in outputs:
        key = _shape_key(out)
        same = [i for i in free if key is not None and _shape_key(i) == key]
        if len(same) > 1:
            reach = _residual_sources(out, set(same))
            same = [i for i in same if i in reach] or same
        if not same:
            raise UnpairedOutputError(
                f"cannot cache the middle region: its output {out.name} (shape {key}) matches no carried "
                f"input; carried inputs: {[(i.name, _shape_key(i)) for i in inputs]}"
            )
        pairs[out] = same[0]
        free.remove(same[0])
    return pairs


class PartitionPass(PassBase):
    """Annotate regions (graph in, same graph out, nodes tagged) and record the boundary analysis."""

    def __init__(
        self,
        chain: Chain,
        fn_blocks: int,
        bn_blocks: int,
        params: set[fx.Node] | None = None,  # the weight placeholders, as find_chain takes them
        signal: fx.Node | None = None,
    ):
        super().__init__()
        self.chain, self.fn, self.bn = chain, fn_blocks, bn_blocks
        self.params = params
        self.signal = signal
        self.partition: Partition | None = None

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.partition = partition(gm, self.chain, self.fn, self.bn, self.params or set(), self.signal)
        return PassResult(gm, False)


def fn_bn_too_large(fn_blocks: int, bn_blocks: int, n: int, lists: list[str], upper_bound: bool = False) -> str:
    """The error for an Fn + Bn the chain cannot hold (the graph and the block-by-block path; with
    `upper_bound`, optimize's check before a capture, where `n` is all the blocks `lists` hold)."""
    count = f", at most {n} here (all blocks of {lists})" if upper_bound else f" ({n}: {lists})"
    return (
        f"Fn_compute_blocks + Bn_compute_blocks = {fn_blocks} + {bn_blocks} = {fn_blocks + bn_blocks}: "
        f"must be <= the number of blocks in the chain{count}"
    )


def partition(
    gm: fx.GraphModule, chain: Chain, fn_blocks: int, bn_blocks: int, params: set[fx.Node], signal: fx.Node | None = None
) -> Partition:
    """`signal`: with `fn_blocks=0` (TeaCache), a node inside block 0 that the decision reads; it and
    its ancestors there form the "Fn" region (they run on every step), the rest of the chain the middle."""
    nodes = list(gm.graph.nodes)
    for pos, node in enumerate(nodes):
        node.meta["dittofx_pos"] = pos
    blocks = chain.blocks
    n = len(blocks)
    if fn_blocks + bn_blocks > n:
        raise PartitionError(fn_bn_too_large(fn_blocks, bn_blocks, n, chain.lists))
    start = blocks[0].start
    mid_start = blocks[fn_blocks].start if fn_blocks < n else blocks[-1].end + 1
    # the middle ends with its last block: code after it (a face adapter, a cat of two streams) is
    # Bn's, so on a cached step it runs on the carried values plus the residual, as it would eagerly
    bn_start = blocks[n - bn_blocks - 1].end + 1 if fn_blocks < n - bn_blocks else mid_start
    chain_end = blocks[-1].end

    def positional(pos: int) -> str:
        if pos < start:
            return "prologue"
        if pos < mid_start:
            return "Fn"
        if pos < bn_start:
            return "middle"
        if pos <= chain_end:
            return "Bn"
        return "epilogue"

    chain_inputs = carried_inputs(nodes, blocks, params)
    dependent = made_from(nodes[start:], chain_inputs)

    region = {node: positional(node.meta["dittofx_pos"]) for node in nodes}
    if signal is not None:
        for node in _ancestors(signal):
            if region[node] == "middle":
                region[node] = "Fn"
                # a multi-output op (chunk, split) goes with all its items: a list is no cond operand
                for user in node.users:
                    if user.target is operator.getitem:
                        region[user] = "Fn"
    hoisted: list[fx.Node] = []
    # independent chain nodes read outside their own region run in the prologue instead
    for node in reversed(nodes[start : chain_end + 1]):
        if node in dependent or region[node] == "prologue":
            continue
        if any(region[u] != region[node] for u in node.users):
            region[node] = "prologue"
            hoisted.append(node)
    hoisted.reverse()
    for node, name in region.items():
        node.meta["dittofx_region"] = name

    middle = [nd for nd in nodes if region[nd] == "middle"]
    middle_set = set(middle)
    middle_inputs = list(dict.fromkeys(a for nd in middle for a in nd.all_input_nodes if a not in middle_set))
    middle_outputs = [nd for nd in middle if any(u not in middle_set for u in nd.users)]
    carried_in = [i for i in middle_inputs if i in dependent]
    base, glue, skip = _skeleton(nodes, blocks[fn_blocks : n - bn_blocks], middle_set, dependent, middle_outputs)

    fn_streams: list[fx.Node] = []
    if signal is not None:
        h_fn, h0 = signal, max(chain_inputs, key=numel_hint)
    else:
        last_fn = blocks[fn_blocks - 1]
        where = f"{last_fn.path}; chain {' -> '.join(chain.lists)}, Fn_compute_blocks={fn_blocks}"
        h_fn, h0, fn_streams = _fn_stream(dependent, chain_inputs, nodes[start : blocks[0].end + 1], nodes[last_fn.start : last_fn.end + 1], where)
    return Partition(
        chain=chain, fn_blocks=fn_blocks, bn_blocks=bn_blocks, region=region,
        middle_inputs=middle_inputs, middle_outputs=middle_outputs, carried_inputs=carried_in, base=base, glue=glue, skip=skip,
        h0=h0, h_fn=h_fn, hoisted=hoisted, fn_streams=fn_streams,
    )


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _fn_stream(dependent, chain_inputs, block0_nodes, last_fn_nodes, where: str) -> tuple[fx.Node, fx.Node, list[fx.Node]]:
    """The carried hidden stream after Fn (the largest carried output of the last Fn block, as it
    returns it: code after it may reshape it, as Latte does between its spatial and temporal
    blocks, or add to it, as ConsisID's face adapter does), before Fn, and the outputs it was
    picked from. `where`: the last Fn block and the chain, for the error."""
    span = set(last_fn_nodes)
    fn_out = [nd for nd in last_fn_nodes if nd in dependent and any(u not in span for u in nd.users)]
    fn_tensors = [nd for nd in fn_out if isinstance(nd.meta.get("val"), torch.Tensor)]
    if not fn_tensors:
        raise PartitionError(
            f"the first Fn blocks produce no carried tensor; cannot measure the residual: the last Fn block ({where}) "
            f"hands no tensor on to the blocks after it. dittofx caches a chain of blocks that each pass the hidden "
            f"states to the next (a transformer's); name the lists that form one with blocks=[...]"
        )
    largest = sorted(fn_tensors, key=numel_hint, reverse=True)[:1]
    try:
        fn_pairs = pair_carried(largest, chain_inputs)
    except PartitionError:  # the stream is sharded on its way into block 0
        fn_pairs = pair_carried(largest, chain_inputs + _entry_views(block0_nodes, chain_inputs))
    ((h_fn, h0),) = fn_pairs.items()
    return h_fn, h0, fn_tensors


_VIEW_OPS = {"chunk", "split", "split_with_sizes", "tensor_split", "getitem", "narrow", "slice", "contiguous", "view", "reshape"}


def _entry_views(block_nodes: list[fx.Node], chain_inputs: list[fx.Node]) -> list[fx.Node]:
    """Views taken in block 0 of the chain inputs (through view ops only): diffusers' context
    parallelism shards the sequence in a hook on block 0 (`chunk(world)[rank]`), so the carried
    hidden state the blocks update is such a shard, not the chain input itself."""
    views, known = [], set(chain_inputs)
    for node in block_nodes:
        if node.op == "call_function" and op_name(node) in _VIEW_OPS and node.all_input_nodes and all(a in known for a in node.all_input_nodes):
            known.add(node)
            if isinstance(node.meta.get("val"), torch.Tensor):
                views.append(node)
    return views


def _skeleton(nodes, mid_blocks, middle_set, dependent, outputs):
    """What each middle output becomes when every middle block is the identity on its carried
    stream: follow block outputs back to the block input they update (pair_carried), keep the code
    between blocks. Usually that is just a middle input; FLUX.2 / AuraFlow's cat of the text and
    image streams between their two block lists is kept as glue."""
    owner = {nd: b for b in mid_blocks for nd in nodes[b.start : b.end + 1]}
    pairs_of: dict[str, dict[fx.Node, fx.Node]] = {}

    def block_pairs(b):
        if b.path not in pairs_of:
            span = nodes[b.start : b.end + 1]
            inside = set(span)
            outs = [nd for nd in span if any(u not in inside for u in nd.users) and isinstance(nd.meta.get("val"), torch.Tensor)]
            ins = list(dict.fromkeys(a for nd in span for a in nd.all_input_nodes if a not in inside and a in dependent))
            pairs_of[b.path] = pair_carried(outs, ins)
        return pairs_of[b.path]

    glue: dict[fx.Node, None] = {}
    skip: dict[fx.Node, fx.Node] = {}

    def source(node: fx.Node) -> fx.Node:
        if node not in middle_set:
            return node
        if node not in owner:  # code between blocks: kept, on the skeleton of its inputs
            for arg in node.all_input_nodes:
                source(arg)
            glue[node] = None
            return node
        pairs = block_pairs(owner[node])
        if node not in pairs:
            raise PartitionError(f"cannot cache the middle region: {node.name} leaves block {owner[node].path} but is not a carried tensor")
        skip[node] = source(pairs[node])
        return skip[node]

    base = {o: source(o) for o in outputs}
    return base, sorted(glue, key=lambda nd: nd.meta["dittofx_pos"]), skip
