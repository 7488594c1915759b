"""Helpers shared by the kernel tests: devices, backends, random tensors in several memory layouts."""

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not INTERPRETED else [])
# "op": the public torch.ops.dittofx op (torch implementation on CPU, Triton on CUDA);
# "torch": the torch implementation called directly; "triton": the Triton launcher called directly.
BACKENDS = ["op", "torch", "triton"]
LAYOUTS = ["contiguous", "transposed", "sliced", "scattered"]


def make(shape: tuple[int, ...], dtype: torch.dtype, device: str, layout: str, gen: torch.Generator) -> torch.Tensor:
    """Random tensor of ``shape`` (never zeros) in one of several memory layouts.

    ``contiguous``; ``transposed`` (last two dims swapped in memory); ``sliced`` (a strided window of a
    larger buffer); ``scattered`` (permuted and sliced so its dims cannot collapse to 3).
    """
    def rand(sz: tuple[int, ...]) -> torch.Tensor:  # views are taken after the cast, which would densify them
        return torch.randn(sz, generator=gen).to(device=device, dtype=dtype)

    if layout == "contiguous":
        t = rand(shape)
    elif layout == "transposed":
        t = rand(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    elif layout == "sliced":
        big = rand(tuple(n + 2 for n in shape[:-1]) + (2 * shape[-1] + 1,))
        t = big[tuple(slice(1, n + 1) for n in shape[:-1]) + (slice(1, 2 * shape[-1] + 1, 2),)]
    elif layout == "scattered":
        perm = list(range(len(shape)))[::-1]
        big = rand(tuple(shape[p] + 1 for p in perm))
        t = big[tuple(slice(0, shape[p]) for p in perm)].permute(*perm)
    else:
        raise ValueError(layout)
    assert t.shape == shape and t.dtype == dtype and (layout == "contiguous") == t.is_contiguous()
    return t
