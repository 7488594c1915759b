"""Quick check of the op contract against a float64 reference (the full suites are in test_residual_diff/test_taylor)."""

import math

import torch

import dittofx.kernels as K


def test_residual_diff_and_taylor_quick() -> None:
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(2, 33, 5, generator=g), torch.randn(2, 33, 5, generator=g)
    sums = K.l1_sums(x, ref, None, True)
    exp = torch.stack([(x.double() - ref.double()).abs().sum((1, 2)), ref.double().abs().sum((1, 2))], 1)
    torch.testing.assert_close(sums.double(), exp, rtol=1e-5, atol=0)
    diff, cache = K.residual_diff(x, ref, None, torch.tensor(0, dtype=torch.int32), torch.tensor(0.0), 10.0, math.inf, True)
    assert math.isclose(float(diff), float((exp[:, 0] / exp[:, 1]).max()), rel_tol=1e-5) and bool(cache)

    derivs = torch.full((3, 4, 5), float("nan"))
    valid = torch.tensor(0)
    for t in range(3):  # x_t = t^2 * a + base: D0 = x - base, D1, D2 by divided differences of step 1
        K.taylor_update_(derivs, (t * t) * x[0, :4] + ref[0, :4], ref[0, :4], valid, torch.tensor(1.0), torch.tensor(True))
        valid.fill_(min(int(valid) + 1, 3))
    a = x[0, :4].double()
    torch.testing.assert_close(derivs.double(), torch.stack([4 * a, 3 * a, 2 * a]), rtol=1e-5, atol=1e-5)
    out = K.taylor_forecast(derivs, ref[0, :4], valid, torch.tensor(1.0))
    torch.testing.assert_close(out.double(), ref[0, :4].double() + 4 * a + 3 * a + a, rtol=1e-5, atol=1e-5)
