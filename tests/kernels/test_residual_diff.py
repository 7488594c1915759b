"""residual_diff / l1_sums / cache_decision against float64 (sums) and float32 scalar (decision) references.

Every test runs the public op, the torch implementation and the Triton launcher (on CPU through
Triton's interpreter); Triton outputs are poisoned first, so unwritten elements fail.
"""

import importlib
import math
from typing import Optional

import numpy as np
import pytest
import torch
import triton.runtime.interpreter as interpreter
from kernel_helpers import INTERPRETED, LAYOUTS, make

import dittofx.kernels  # noqa: F401  (registers torch.ops.dittofx)
from dittofx.kernels import residual_diff as residual_diff_op
from dittofx.kernels._layout import Config
from dittofx.kernels.residual_diff import (
    _decide_torch,
    _sums_torch,
    cache_decision_triton,
    l1_sums_triton,
    residual_diff_triton,
)

# Small tiles and a few programs: the grid-stride loop and the masked tail both run on small inputs.
SMALL = Config(block=128, num_warps=4, max_programs=7)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INF = math.inf


def poisoned_decision(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((), 123.0, device=device), torch.ones((), dtype=torch.bool, device=device)


def sums(backend: str, x, ref, base, per_sample: bool, config: Config = SMALL) -> torch.Tensor:
    if backend == "op":
        return torch.ops.dittofx.l1_sums(x, ref, base, per_sample)
    if backend == "torch":
        return _sums_torch(x, ref, base, per_sample)
    b = x.shape[0] if per_sample else 1
    out = torch.full((b, 2), math.nan, device=x.device)
    return l1_sums_triton(x, ref, base, per_sample, out=out, config=config)


def decision(backend: str, s: torch.Tensor, gate, acc, thr: float, lim: float) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "op":
        return torch.ops.dittofx.cache_decision(s, gate, acc, thr, lim)
    if backend == "torch":
        return _decide_torch(s, gate, acc, thr, lim)
    return cache_decision_triton(s, gate, acc, thr, lim, out=poisoned_decision(s.device.type))


def fused(backend: str, x, ref, base, gate, acc, thr: float, lim: float, per_sample: bool, config: Config = SMALL):
    if backend == "op":
        return torch.ops.dittofx.residual_diff(x, ref, base, gate, acc, thr, lim, per_sample)
    if backend == "torch":
        return _decide_torch(_sums_torch(x, ref, base, per_sample), gate, acc, thr, lim)
    out = poisoned_decision(x.device.type)
    return residual_diff_triton(x, ref, base, gate, acc, thr, lim, per_sample, out=out, config=config)


def ref_sums(x: torch.Tensor, ref: torch.Tensor, base: Optional[torch.Tensor], per_sample: bool) -> torch.Tensor:
    """float64 reference of SPEC.md section 3's two sums."""
    b = x.shape[0] if per_sample else 1
    d = x.cpu().double() - ref.cpu().double()
    if base is not None:
        d -= base.cpu().double()
    return torch.stack([d.abs().reshape(b, -1).sum(1), ref.cpu().double().abs().reshape(b, -1).sum(1)], 1)


def ref_decision(s: list[tuple[float, float]], gate: int, acc: float, thr: float, lim: float) -> tuple[float, bool]:
    """Scalar float32 reference of the decision (the contract computes it in fp32)."""
    if gate != 0:
        return math.nan, gate == 2
    f = np.float32
    d = [f(a) / (f(b) + f(1e-12)) for a, b in s]
    if not all(np.isfinite(v) for v in d):
        return math.nan, False
    return float(max(d)), all(v < f(thr) and f(acc) + v <= f(lim) for v in d)


def scalars(device: str, gate: int, acc: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(gate, dtype=torch.int32, device=device), torch.tensor(acc, dtype=torch.float32, device=device)


def same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("with_base", [False, True])
def test_l1_sums_matches_float64(backend, device, dtype, layout, per_sample, with_base) -> None:
    gen = torch.Generator().manual_seed(hash((str(dtype), layout, per_sample, with_base)) % 2**31)
    shape = (3, 37, 5, 11)
    x, ref = make(shape, dtype, device, layout, gen), make(shape, dtype, device, layout, gen)
    base = make(shape, dtype, device, layout, gen) if with_base else None
    got = sums(backend, x, ref, base, per_sample)
    assert got.dtype == torch.float32 and got.shape == (3 if per_sample else 1, 2) and got.device == x.device
    torch.testing.assert_close(got.cpu().double(), ref_sums(x, ref, base, per_sample), rtol=1e-5, atol=0)


@pytest.mark.parametrize("per_sample", [False, True])
def test_l1_sums_mixed_dtypes(backend, device, per_sample) -> None:
    """x bf16, ref fp32, base fp16, all non-contiguous: everything is computed in fp32."""
    gen = torch.Generator().manual_seed(1)
    shape = (2, 129, 7)
    x = make(shape, torch.bfloat16, device, "transposed", gen)
    ref = make(shape, torch.float32, device, "sliced", gen)
    base = make(shape, torch.float16, device, "contiguous", gen)
    got = sums(backend, x, ref, base, per_sample)
    torch.testing.assert_close(got.cpu().double(), ref_sums(x, ref, base, per_sample), rtol=1e-5, atol=0)


def test_l1_sums_default_config_large(backend, device) -> None:
    """About 1M odd-sized elements with the launch configuration the op itself uses."""
    gen = torch.Generator().manual_seed(2)
    x, ref = make((1_000_003,), torch.bfloat16, device, "contiguous", gen), make((1_000_003,), torch.float32, device, "contiguous", gen)
    got = sums(backend, x, ref, None, False, config=None)
    torch.testing.assert_close(got.cpu().double(), ref_sums(x, ref, None, False), rtol=1e-5, atol=0)


@pytest.mark.parametrize("per_sample", [False, True])
def test_bitwise_reproducible(backend, device, per_sample) -> None:
    gen = torch.Generator().manual_seed(3)
    x, ref, base = (make((4, 20011), torch.bfloat16, device, "contiguous", gen) for _ in range(3))
    gate, acc = scalars(device, 0, 0.0)
    cfg = Config(block=1024, num_warps=4, max_programs=12)  # several partials per sample
    a, b = (sums(backend, x, ref, base, per_sample, config=cfg) for _ in range(2))
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    (d1, c1), (d2, c2) = (fused(backend, x, ref, base, gate, acc, 1.0, INF, per_sample, config=cfg) for _ in range(2))
    assert torch.equal(d1.view(torch.int32), d2.view(torch.int32)) and bool(c1) == bool(c2)


NEXT_UP_HALF = float(np.nextafter(np.float32(0.5), np.float32(1)))
NEXT_DOWN_3Q = float(np.nextafter(np.float32(0.75), np.float32(0)))
DECISION_CASES = [  # sums, gate, acc, threshold, acc_limit
    ([(0.1, 1.0)], 1, 0.0, 10.0, INF),  # forced compute
    ([(5.0, 1.0)], 2, 0.0, 0.0, INF),  # forced cache, whatever the diff
    ([(math.nan, 1.0)], 2, 0.0, 10.0, INF),
    ([(0.5, 1.0)], 0, 0.0, 0.5, INF),  # d == threshold: compute (strict <)
    ([(0.5, 1.0)], 0, 0.0, NEXT_UP_HALF, INF),  # just below the threshold: cache
    ([(0.5, 1.0)], 0, 0.25, 1.0, 0.75),  # acc + d == limit: cache
    ([(0.5, 1.0)], 0, 0.25, 1.0, NEXT_DOWN_3Q),  # acc + d over the limit: compute
    ([(0.1, 1.0), (0.3, 1.0)], 0, 0.0, 0.2, INF),  # per sample: one fails -> compute, diff = max
    ([(0.1, 1.0), (0.3, 1.0), (0.2, 2.0)], 0, 0.0, 0.31, INF),
    ([(1.0, 0.0)], 0, 0.0, 0.1, INF),  # zero reference: d = 1e12, finite
    ([(0.0, 0.0)], 0, 0.0, 0.1, INF),  # both zero: d = 0 -> cache
    ([(math.inf, 1.0)], 0, 0.0, INF, INF),  # non-finite -> compute, diff NaN
    ([(0.1, 1.0), (math.nan, 1.0)], 0, 0.0, 10.0, INF),
    ([(3e38, 1e-30)], 0, 0.0, INF, INF),  # overflow to inf in fp32
]


@pytest.mark.parametrize("case", DECISION_CASES, ids=[str(i) for i in range(len(DECISION_CASES))])
def test_cache_decision(backend, device, case) -> None:
    s, gate, acc, thr, lim = case
    g, a = scalars(device, gate, acc)
    diff, cache = decision(backend, torch.tensor(s, dtype=torch.float32, device=device), g, a, thr, lim)
    assert diff.shape == () and diff.dtype == torch.float32 and cache.shape == () and cache.dtype == torch.bool
    assert diff.device.type == device and cache.device.type == device
    exp_diff, exp_cache = ref_decision(s, gate, acc, thr, lim)
    assert same_float(float(diff), exp_diff) and bool(cache) == exp_cache


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("gate", [0, 1, 2])
@pytest.mark.parametrize("where", ["below", "above", "over_acc"])
def test_residual_diff_fused(backend, device, per_sample, gate, where) -> None:
    """The fused op equals the decision on the float64 sums (thresholds kept 1% off the diff)."""
    gen = torch.Generator().manual_seed(4)
    shape = (3, 67, 9)
    x, ref, base = (make(shape, torch.bfloat16, device, "sliced", gen) for _ in range(3))
    s = ref_sums(x, ref, base, per_sample)
    dmax = float((s[:, 0] / s[:, 1]).max())
    thr, acc, lim = {"below": (dmax * 1.01, 0.0, INF), "above": (dmax * 0.99, 0.0, INF), "over_acc": (dmax * 1.01, 1.0, 1.0 + dmax * 0.99)}[where]
    g, a = scalars(device, gate, acc)
    diff, cache = fused(backend, x, ref, base, g, a, thr, lim, per_sample)
    exp_diff, exp_cache = ref_decision([tuple(r) for r in s.tolist()], gate, acc, thr, lim)
    assert bool(cache) == exp_cache
    if gate:
        assert math.isnan(float(diff))
    else:
        assert math.isclose(float(diff), exp_diff, rel_tol=1e-5)


@pytest.mark.skipif(not INTERPRETED, reason="counts the loads the Triton interpreter executes")
@pytest.mark.parametrize("gate", [0, 1, 2])
def test_gated_triton_reads_no_data(monkeypatch, gate) -> None:
    """With gate != 0 the Triton kernels load none of the data (x, ref).

    Stage 2 reads its few partials (``BLOCK_P`` wide) whatever the gate, so that no load waits on the
    gate's; only tile-wide (``SMALL.block``) loads are data loads.
    """
    loads = []
    original = interpreter.InterpreterBuilder.create_masked_load

    def counting(self, ptrs, *args, **kwargs):
        if ptrs.data.size == SMALL.block:  # data tiles; scalars (gate, acc) and partials are narrower
            loads.append(ptrs.data.size)
        return original(self, ptrs, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", counting)
    gen = torch.Generator().manual_seed(5)
    x, ref = make((2, 999), torch.float32, "cpu", "contiguous", gen), make((2, 999), torch.float32, "cpu", "contiguous", gen)
    g, a = scalars("cpu", gate, 0.0)
    fused("triton", x, ref, None, g, a, 1.0, INF, True)
    assert (len(loads) == 0) == (gate != 0)


@pytest.mark.parametrize("gate", [1, 2])
def test_gated_torch_skips_reduction_on_cpu(monkeypatch, gate) -> None:
    """On CPU the op reads the gate on the host and never reduces the data when it is set."""

    def fail(*args):
        raise AssertionError("reduction ran on a gated step")

    module = importlib.import_module("dittofx.kernels.residual_diff")  # the package attribute is the op
    monkeypatch.setattr(module, "_sums_torch", fail)
    x = torch.randn(2, 5)
    g, a = scalars("cpu", gate, 0.0)
    diff, cache = residual_diff_op(x, x, None, g, a, 1.0, INF, True)
    assert math.isnan(float(diff)) and bool(cache) == (gate == 2)
