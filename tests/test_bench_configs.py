"""The benchmarks' dittofx configs still pass the config check: the benches run only by hand (a
GPU, minutes of CPU), so a check tightened later would otherwise first show at a bench's set-up
(bench/cached_step.py's 10**6-step mask did, after masks were capped at 1024 steps)."""

import importlib
import sys
from pathlib import Path

import pytest

from dittofx.config import parse_config

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_modules():
    saved = list(sys.path)  # e2e.py rewrites sys.path as it imports (bench/kernels.py is not dittofx.kernels)
    sys.path.insert(0, str(BENCH))
    try:
        cached_step = importlib.import_module("cached_step")  # it imports e2e
        yield {"e2e": sys.modules["e2e"], "cached_step": cached_step}
    finally:
        sys.path[:] = saved


def test_bench_configs_parse(bench_modules):
    e2e, cached_step = bench_modules["e2e"], bench_modules["cached_step"]
    configs = {f"e2e {name}": dict(pair[0], Fn_compute_blocks=e2e.FN, Bn_compute_blocks=e2e.BN, num_inference_steps=e2e.STEPS)
               for name, pair in e2e.CONFIGS.items()}  # fmt: skip
    configs.update({f"cached_step {name}": getattr(cached_step, name) for name in ("ALWAYS", "DEVICE_DECIDES", "STATIC_CACHE")})
    refused = {}
    for name, cfg in configs.items():
        try:
            parse_config(cfg)
        except ValueError as err:
            refused[name] = str(err)
    assert len(configs) == len(e2e.CONFIGS) + 3 and not refused, refused
