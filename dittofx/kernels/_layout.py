"""Shared by the kernels: Triton availability, launch configs, and strided addressing.

Kernels address each operand as a (collapsed) 3-D strided view, so non-contiguous inputs are read
in place; a ``CONTIG`` specialisation keeps the dense case to plain (vectorisable) offsets.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # the torch implementation of each op runs instead
    TRITON_AVAILABLE = False

MAX_RANK = 3


class Config(NamedTuple):
    """Launch parameters; fixed per device type, so the reduction order (and the bits) never change."""

    block: int
    num_warps: int
    max_programs: int  # reduction kernels: programs per launch (a grid-stride loop covers the rest)


# The interpreter costs per program instance: few, large programs. CUDA values from the H100 sweep in
# bench/results/kernels_h100_2026-11-22.md: 8 elements per thread (16-byte bf16 accesses) and, for the
# reduction, 4 programs per SM of 132, which all fit in one wave (fewer registers than BLOCK=4096).
INTERPRETER = Config(block=65536, num_warps=1, max_programs=64)
CUDA_REDUCE = Config(block=2048, num_warps=8, max_programs=528)
CUDA_ELEMENTWISE = Config(block=2048, num_warps=8, max_programs=0)


def use_triton(t: torch.Tensor) -> bool:
    """Dispatch rule of every op: CUDA tensors and Triton importable."""
    return TRITON_AVAILABLE and t.is_cuda


class Layout(NamedTuple):
    sizes: tuple[int, int, int]
    strides: list[tuple[int, int, int]]  # one per tensor
    contig: bool  # every tensor is dense with unit stride: offsets are the flat index


def collapse(shape: Sequence[int], strides: Sequence[Sequence[int]]) -> Layout | None:
    """Merge dims that are adjacent in memory for every tensor; ``None`` if more than ``MAX_RANK`` remain."""
    dims = [(n, [s[i] for s in strides]) for i, n in enumerate(shape) if n != 1]
    merged: list[tuple[int, list[int]]] = []
    for n, st in dims:
        if merged and all(ps == s * n for ps, s in zip(merged[-1][1], st)):
            merged[-1] = (merged[-1][0] * n, st)
        else:
            merged.append((n, st))
    if len(merged) > MAX_RANK:
        return None
    pad = [(1, [0] * len(strides))] * (MAX_RANK - len(merged))
    full = pad + merged
    sizes = tuple(n for n, _ in full)
    per_tensor = [tuple(st[k] for _, st in full) for k in range(len(strides))]
    contig = len(merged) == 0 or (len(merged) == 1 and all(st == 1 for st in merged[0][1]))
    return Layout(sizes, per_tensor, contig)  # type: ignore[arg-type]


if TRITON_AVAILABLE:

    @triton.jit
    def strided_offsets(j, D1, D2, s0, s1, s2, CONTIG: tl.constexpr):
        """Memory offset of logical flat index ``j`` in a ``[D0, D1, D2]`` view with strides ``s0..s2``."""
        if CONTIG:
            off = j
        else:
            i2 = j % D2
            t = j // D2
            off = (t // D1).to(tl.int64) * s0 + (t % D1).to(tl.int64) * s1 + i2.to(tl.int64) * s2
        return off
