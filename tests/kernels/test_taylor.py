"""taylor_update_ / taylor_forecast against float64 references (SPEC.md section 4).

Derivative buffers start poisoned (NaN): levels an update computes must be overwritten, the others
must keep their bits. Forecast outputs of the Triton launcher are poisoned too.
"""

import math

import pytest
import torch
import triton.runtime.interpreter as interpreter
from kernel_helpers import INTERPRETED, LAYOUTS, make

import dittofx.kernels  # noqa: F401  (registers torch.ops.dittofx)
from dittofx.kernels.taylor import _forecast_torch, _update_torch, taylor_forecast_triton, taylor_update_triton

SHAPE = (5, 33, 7)


def update(backend: str, derivs, x, base, valid, gap, flag) -> None:
    fn = {"op": torch.ops.dittofx.taylor_update_, "torch": _update_torch, "triton": taylor_update_triton}[backend]
    fn(derivs, x, base, valid, gap, flag)


def forecast(backend: str, derivs, base, valid, e) -> torch.Tensor:
    if backend == "op":
        return torch.ops.dittofx.taylor_forecast(derivs, base, valid, e)
    if backend == "torch":
        return _forecast_torch(derivs, base, valid, e)
    out = torch.full(base.shape, math.nan, dtype=base.dtype, device=base.device)
    return taylor_forecast_triton(derivs, base, valid, e, out=out)


def ref_update(old: torch.Tensor, x: torch.Tensor, base: torch.Tensor, valid: int, gap: float) -> list[torch.Tensor]:
    """float64 levels ``D0..D(min(valid, k))`` computed from the stored old levels."""
    new = [x.double() - base.double()]
    for i in range(1, min(valid, old.shape[0] - 1) + 1):
        new.append((new[i - 1] - old[i - 1].double()) / gap)
    return new


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-3}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {torch.float32: torch.int32}.get(a.dtype, torch.int16)
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_update_sequence(backend, device, k, dtype, layout) -> None:
    """k + 3 updates with varying gaps and one skipped step, checked level by level after each."""
    gen = torch.Generator().manual_seed(k * 100 + len(layout))
    derivs = make((k + 1,) + SHAPE, dtype, device, layout, gen).fill_(math.nan)
    base = make(SHAPE, torch.float32, device, layout, gen)
    valid = torch.zeros((), dtype=torch.int64, device=device)
    steps = [(1.0, True), (2.0, True), (0.5, False), (3.0, True)] + [(1.5, True)] * k
    for gap, flag in steps:
        x = make(SHAPE, dtype, device, layout, gen) * 4
        before = derivs.clone()
        update(backend, derivs, x, base, valid, torch.tensor(gap, device=device), torch.tensor(flag, device=device))
        v = int(valid)
        expected = ref_update(before.cpu(), x.cpu(), base.cpu(), v, gap) if flag else []
        for i in range(k + 1):
            if i < len(expected):
                torch.testing.assert_close(derivs[i].cpu().double(), expected[i], **tolerance(dtype))
            else:
                assert same_bits(derivs[i], before[i]), f"level {i} was written (valid={v}, flag={flag})"
        if flag:
            valid.fill_(min(v + 1, k + 1))
    assert int(valid) == k + 1 and not derivs.isnan().any()


@pytest.mark.parametrize("k", [0, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "scattered"])
def test_forecast(backend, device, k, dtype, layout) -> None:
    gen = torch.Generator().manual_seed(7 + k)
    derivs = make((k + 1,) + SHAPE, dtype, device, layout, gen)
    base = make(SHAPE, dtype, device, layout, gen)
    for valid in range(k + 2):
        for e in (1.0, 2.5):
            out = forecast(backend, derivs, base, torch.tensor(valid, device=device), torch.tensor(e, device=device))
            assert out.shape == base.shape and out.dtype == dtype and out.device == base.device
            exp = base.cpu().double() + sum(
                derivs[i].cpu().double() * e**i / math.factorial(i) for i in range(valid)
            )
            torch.testing.assert_close(out.cpu().double(), exp, **tolerance(dtype))


def test_bitwise_reproducible(backend, device) -> None:
    gen = torch.Generator().manual_seed(9)
    derivs = make((3,) + SHAPE, torch.bfloat16, device, "contiguous", gen)
    x, base = make(SHAPE, torch.bfloat16, device, "sliced", gen), make(SHAPE, torch.bfloat16, device, "sliced", gen)
    args = (torch.tensor(2, device=device), torch.tensor(1.5, device=device))
    a, b = derivs.clone(), derivs.clone()
    update(backend, a, x, base, *args, torch.tensor(True, device=device))
    update(backend, b, x, base, *args, torch.tensor(True, device=device))
    assert same_bits(a, b)
    assert same_bits(forecast(backend, a, base, *args), forecast(backend, a, base, *args))


@pytest.mark.skipif(not INTERPRETED, reason="counts the memory accesses the Triton interpreter executes")
def test_flag_false_touches_nothing(monkeypatch) -> None:
    """flag False: the Triton update issues no vector load or store (and the buffers keep their bits)."""
    accesses = []
    for name in ("create_masked_load", "create_masked_store"):
        original = getattr(interpreter.InterpreterBuilder, name)

        def counting(self, ptrs, *args, _original=original, **kwargs):
            if ptrs.data.size > 1:  # size-1 accesses are the scalar flag/valid/gap loads
                accesses.append(ptrs.data.size)
            return _original(self, ptrs, *args, **kwargs)

        monkeypatch.setattr(interpreter.InterpreterBuilder, name, counting)
    gen = torch.Generator().manual_seed(10)
    derivs = make((3,) + SHAPE, torch.float32, "cpu", "contiguous", gen)
    x, base = make(SHAPE, torch.float32, "cpu", "contiguous", gen), make(SHAPE, torch.float32, "cpu", "contiguous", gen)
    for flag in (False, True):
        before = derivs.clone()
        taylor_update_triton(derivs, x, base, torch.tensor(3), torch.tensor(1.0), torch.tensor(flag))
        assert (len(accesses) == 0) == (not flag) and same_bits(before, derivs) == (not flag)
