"""Recompiles of an optimized model under torch.compile(fullgraph=True), with the dynamo settings
`optimize` tunes (issue 7 item 5): none across the steps and requests of one resolution, at most
two across four resolutions. Outputs and schedules equal those of the same model run eagerly.

Wan's capture stays symbolic: one graph per variant serves every resolution, and dynamo recompiles
each variant once, with dynamic shapes, at the second. Two blocks (the zoo's Wan has four): each
inductor compile here costs 15-60 s, and the chain F1 | middle 1 | B0 is all the schedule needs.
PixArt's PatchEmbed compares its sizes in Python (its table for the first size, a new one for any
other), so its first capture serves only the first size and a second, at the second size, serves
the rest: counted with dynamo's eager backend (the frames compiled do not depend on the backend).
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import dittofx
import test_shapes
import zoo

STEPS = 28
REQUESTS = 3
SIDES = (8, 12, 16, 20)  # latent height = width; 8 is the zoo's (16 tokens), then 36, 64, 100 tokens
build = zoo._builder("WanTransformer3DModel", dict(zoo._WAN_CONFIG, num_layers=2))
CFG = {"residual_diff_threshold": 0.1, "max_warmup_steps": 2, "num_inference_steps": STEPS}


def request(side: int) -> list[dict]:
    z = zoo.get("wan")
    steps = [z.inputs(s, 1 - s / STEPS) for s in range(STEPS)]
    for s, kw in enumerate(steps):
        kw["hidden_states"] = zoo._latent(3, 1, 4, 1, side, side, step=s)
    return steps


def run(model, steps: list[dict]) -> tuple[list[torch.Tensor], list[int]]:
    with torch.no_grad():
        outs = [model(**kw)[0] for kw in steps]
    return outs, dittofx.summary(model, log_table=False)[0].cached_steps


def test_recompiles_across_steps_requests_and_resolutions():
    torch._dynamo.reset()
    eager = dittofx.optimize(build(), CFG)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(dittofx.optimize(build(), CFG), fullgraph=True, backend=counter)

    frames = []
    for i, side in enumerate((SIDES[0],) * REQUESTS + SIDES[1:]):
        steps = request(side)
        got, got_cached = run(compiled, steps)
        want, want_cached = run(eager, steps)
        assert got_cached == want_cached, (side, got_cached, want_cached)
        assert 0 < len(want_cached) < STEPS - 2, (side, want_cached)  # the schedule both caches and computes
        for g, w in zip(got, want):
            assert g.shape == (1, 4, 1, side, side)
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())
        frames.append(counter.frame_count)
    # the first request compiles one frame per graph variant it runs ("compute" in warmup, then
    # "device"); its 28 steps and the next two requests add none
    assert frames[:REQUESTS] == [2] * REQUESTS, frames
    # new resolutions: each variant recompiles once, with dynamic shapes, then serves all sizes
    assert frames[-1] - frames[REQUESTS - 1] <= 2, frames


def compiled_over_sizes(z, cfg: dict, requests: list[list[dict]], module_compile: bool = False):
    """Each request through one optimized model compiled with dynamo's eager backend (by
    torch.compile(model), or model.compile()), against a fresh optimized model per request (its own
    capture at those sizes): the model, the compiled frames after each request, and each request's
    outputs and cached steps."""
    torch._dynamo.reset()
    model = dittofx.optimize(z.build(), cfg)
    counter = CompileCounterWithBackend("eager")
    if module_compile:
        model.compile(fullgraph=True, backend=counter)
        compiled = model
    else:
        compiled = torch.compile(model, fullgraph=True, backend=counter)
    frames, results = [], []
    for steps in requests:
        got, got_cached = run(compiled, steps)
        want, want_cached = run(dittofx.optimize(z.build(), cfg), steps)
        assert got_cached == want_cached
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        frames.append(counter.frame_count)
        results.append((got, got_cached))
    return model, frames, results


@pytest.mark.parametrize("module_compile", [False, True], ids=["torch.compile(model)", "model.compile()"])
def test_pixart_two_captures_serve_four_resolutions(module_compile):
    """(model.compile() as torch.compile(model): checking a graph at new sizes runs the model's own
    forward, which went through model.compile()'s compiled call and compiled it too; helper-58)"""
    cfg = {"residual_diff_threshold": 0.2, "max_warmup_steps": 1, "num_inference_steps": 4}
    requests = [test_shapes.request(1, side, seed=side) for side in (8, 8, 16, 12, 20)]
    model, frames, _ = compiled_over_sizes(zoo.get("pixart"), cfg, requests, module_compile)
    assert [bool(e.captured.dynamic_dims) for e in model._dittofx.entries] == [True, True]
    # two variants (warmup's compute graph, then the device decision) per capture, each compiled
    # once: none for the second request, two at the second size, none after
    assert frames == [2, 2, 4, 4, 4], frames


def qwen_request(side: int, steps: int) -> list[dict]:
    """Qwen-Image takes its latent's size as Python ints (`img_shapes`) beside the tokens."""
    z = zoo.get("qwenimage")
    out = [z.inputs(s, 1 - s / steps) for s in range(steps)]
    for s, kw in enumerate(out):
        kw["hidden_states"] = zoo._latent(4, 1, side * side, 16, step=s)
        kw["img_shapes"] = [(1, side, side)]
    return out


def test_sizes_given_as_ints_stay_symbolic():
    """Qwen-Image's `img_shapes` are captured as symbolic ints, like the tokens' dims: one capture
    serves four resolutions, and dynamo recompiles each variant once, at the second."""
    z = zoo.get("qwenimage")
    cfg = {"residual_diff_threshold": 0.4, "max_warmup_steps": 1, "num_inference_steps": 4}
    requests = [qwen_request(side, 4) for side in (4, 4, 8, 6, 10)]
    model, frames, results = compiled_over_sizes(z, cfg, requests)
    with torch.no_grad():  # each request's first step computes: the uncached model's output
        plain = z.build()
        for steps, (got, _) in zip(requests, results):
            torch.testing.assert_close(got[0], plain(**steps[0])[0], rtol=1e-5, atol=1e-6)
    schedules = [cached for _, cached in results]
    assert any(0 < len(c) < 3 for c in schedules), schedules  # the threshold both caches and computes
    # one capture, with img_shapes' height and width (leaves 5, 6) symbolic; its frame count, the
    # text length (the model's int() of it) and the channels are specialized
    assert [{i: d for i, d in e.captured.dynamic_dims.items() if i >= 4} for e in model._dittofx.entries] == [{5: (), 6: ()}]
    assert "symbolic inputs (dims, or int value): hidden_states[1], img_shapes_0_1, img_shapes_0_2" in dittofx.explain(model)
    assert frames == [2, 2, 4, 4, 4], frames


def test_two_optimized_models_keep_their_compiled_code_apart():
    """Each optimized model's forward has a code object of its own, so dynamo files each model's
    compiled entries (and counts its recompiles) apart from every other optimized model in the
    process (Wan 2.2's two transformers, each compiled)."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as entries

    torch._dynamo.reset()
    first, second = dittofx.optimize(build(), CFG), dittofx.optimize(build(), CFG)
    steps = request(SIDES[0])[:4]  # warmup ("compute") then device-decided steps: two variants
    run(torch.compile(first, fullgraph=True, backend="eager"), steps)
    alone = len(entries(first.forward.__code__))
    run(torch.compile(second, fullgraph=True, backend="eager"), steps)
    assert alone == 2 and len(entries(first.forward.__code__)) == len(entries(second.forward.__code__)) == alone
    assert first.forward.__code__ is not second.forward.__code__
