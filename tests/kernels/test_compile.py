"""The ops inside ``torch.compile(fullgraph=True)`` (with ``torch.cond`` on the cache predicate) and ``torch.export``."""

import math

import torch

import dittofx.kernels  # noqa: F401  (registers torch.ops.dittofx)


def cached_step(x, ref, base, derivs, valid, gap, gate, acc, e):
    """One DBCache + TaylorSeer step as the core composes it: decide, then either forecast or update."""
    diff, cache = torch.ops.dittofx.residual_diff(x, ref, base, gate, acc, 0.5, math.inf, True)
    sums = torch.ops.dittofx.l1_sums(x, ref, base, True)
    diff2, cache2 = torch.ops.dittofx.cache_decision(sums, gate, acc, 0.5, math.inf)
    torch.ops.dittofx.taylor_update_(derivs, x, base, valid, gap, torch.logical_not(cache))
    out = torch.cond(
        cache,
        lambda d, b: torch.ops.dittofx.taylor_forecast(d, b, valid, e),
        lambda d, b: b + d[0],
        (derivs, base),
    )
    return diff, cache, diff2, cache2, out


class Step(torch.nn.Module):
    def forward(self, *args):
        return cached_step(*args)


def make_args(cache: bool, device: str) -> tuple:
    g = torch.Generator().manual_seed(int(cache))
    x, base = torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    ref = (x - base) * (1.1 if cache else 3.0)  # relative diff 0.09 (cache) or 0.67 (compute)
    args = (
        x, ref, base, torch.randn(3, 2, 9, 16, generator=g), torch.tensor(2), torch.tensor(1.0),
        torch.tensor(0, dtype=torch.int32), torch.tensor(0.0), torch.tensor(1.5),
    )
    return tuple(a.to(device) for a in args)


def clone_args(args: tuple) -> tuple:
    return tuple(a.clone() for a in args)


def check_same(fn, device: str) -> None:
    """``fn`` (compiled or exported) returns what eager returns and mutates ``derivs`` the same, on both branches."""
    for cache in (True, False):
        args = make_args(cache, device)
        eager_args, fn_args = clone_args(args), clone_args(args)
        expected, got = cached_step(*eager_args), fn(*fn_args)
        assert bool(expected[1]) == cache
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(fn_args[3], eager_args[3], rtol=0, atol=0)


def test_compile_fullgraph(device) -> None:
    torch._dynamo.reset()
    check_same(torch.compile(cached_step, fullgraph=True), device)


def test_export(device) -> None:
    ep = torch.export.export(Step(), make_args(True, device))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"dittofx.residual_diff.default", "dittofx.l1_sums.default", "dittofx.cache_decision.default"} <= targets
    check_same(ep.module(), device)
