"""Size arithmetic that a pass may compute again instead of handing a value across a boundary."""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

__all__ = ["SIZE_OPS", "cond_operands", "recompute_or_pass"]

# sizes and arithmetic on them: no reads of tensor data, no randomness
SIZE_OPS = {
    torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int,
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod, operator.neg,
    operator.pow, torch.sym_max, torch.sym_min, torch.sym_sqrt, torch.sym_float, torch.sym_int, torch.sym_not,
}  # fmt: skip


def _is_float(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymFloat, float))


def recompute_or_pass(
    values: list[fx.Node], recomputable: Callable[[fx.Node], bool], outside: Callable[[fx.Node], bool] = lambda node: False
) -> tuple[list[fx.Node], list[fx.Node]]:
    """Across a boundary, what `values` need: (the nodes made again on the far side, each after what
    it reads; the nodes handed across). A node `recomputable` says may be made again is, with what
    it reads walked in turn; any other is handed across; `outside` nodes are neither (the far side
    has them already)."""
    recipe: dict[fx.Node, None] = {}
    passed: dict[fx.Node, None] = {}

    def walk(node: fx.Node) -> None:  # post-order: a recipe node follows what it reads
        if node in recipe or node in passed or outside(node):
            return
        if recomputable(node):
            for arg in node.all_input_nodes:
                walk(arg)
            recipe[node] = None
        else:
            passed[node] = None

    for value in values:
        walk(value)
    return list(recipe), list(passed)


def cond_operands(values: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """What a torch.cond branch that reads `values` is handed, and what it computes again: sizes and
    arithmetic on them are made again from the tensors (and int inputs) they start from. A float
    (SymFloat) cannot be an operand: Sana-WM's attention scale `0.25 * (h * w) ** -0.5` is made in
    block 0, read in block 2. A SymInt operand can, but inductor's FakeTensorUpdater fails on one
    that dynamo's duck sizing unified with another dim (FLUX at 1024² under dynamic=True: 4096
    image tokens, T5's 4096 features). Returns (the size arithmetic, inputs before users; the operands)."""
    recipe, operands = recompute_or_pass(values, lambda node: node.op == "call_function" and node.target in SIZE_OPS)
    for node in operands:
        if _is_float(node):
            raise ValueError(f"{node.name} = {node.format_node()}: a float made by an op that is no size arithmetic")
    return recipe, operands
