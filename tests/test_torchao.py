"""dittofx composes with torchao int8 weight-only quantization, applied before or after optimize:
the graph runs on the live (quantized) weights."""

import pytest
import torch

import dittofx
import zoo
from reference import NaiveConfig, NaiveDBCache

torchao_quant = pytest.importorskip("torchao.quantization")


def run(model, z, steps=6):
    with torch.no_grad():
        return [model(**z.inputs(s, 1 - s / steps))[0] for s in range(steps)]


def quantized(model):
    torchao_quant.quantize_(model, torchao_quant.Int8WeightOnlyConfig())
    return model


@pytest.mark.parametrize("order", ["quantize, then optimize", "optimize, then quantize"])
def test_int8_weight_only_with_threshold_zero_equals_the_quantized_model(order):
    z = zoo.get("pixart")
    want = run(quantized(z.build()), z)
    cfg = {"residual_diff_threshold": 0.0}
    if order.startswith("quantize"):
        model = dittofx.optimize(quantized(z.build()), cfg)
    else:
        model = quantized(dittofx.optimize(z.build(), cfg))
    assert all(torch.equal(a, b) for a, b in zip(run(model, z), want))
    assert type(model.transformer_blocks[1].attn1.to_q.weight).__name__ != "Parameter"  # really quantized


def test_int8_weight_only_caching_matches_the_naive_reference():
    z = zoo.get("pixart")
    cfg = NaiveConfig(Fn=1, Bn=1, threshold=0.2, max_warmup_steps=2)
    reference = NaiveDBCache(quantized(z.build()), z.block_lists, cfg)
    want = run(reference, z, 8)
    model = dittofx.optimize(quantized(z.build()), {"Fn_compute_blocks": 1, "Bn_compute_blocks": 1,
                                                    "residual_diff_threshold": 0.2, "max_warmup_steps": 2})  # fmt: skip
    got = run(model, z, 8)
    assert dittofx.summary(model)[0].cached_steps == reference.cached_steps != []
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
