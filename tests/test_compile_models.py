"""torch.compile(fullgraph=True) on optimized models: no graph break, no recompile across requests
and steps, outputs equal to the eager optimized model. Few and small: each compile costs ~30 s."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import dittofx
import zoo

STEPS = 8



# one model per method, with thresholds that cache some steps
CASES = {
    "pixart-dbcache": ("pixart", {"residual_diff_threshold": 0.1, "max_warmup_steps": 2}),
    "flux-dbcache": ("flux", {"residual_diff_threshold": 0.35, "max_warmup_steps": 2}),
    "flux-teacache": ("flux", {"method": "teacache", "rel_l1_thresh": 0.12, "coefficients": [1.0, 0.0]}),
    "pixart-dbprune": ("pixart", {"method": "dbprune", "residual_diff_threshold": 0.05, "max_warmup_steps": 2}),
    "pixart-taylorseer-scm": ("pixart", {"residual_diff_threshold": 0.1, "max_warmup_steps": 2, "enable_taylorseer": True,
                                         "taylorseer_order": 2, "scm_steps_mask_policy": "fast"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fullgraph_compile_no_break_no_recompile(case):
    name, method_cfg = CASES[case]
    z = zoo.get(name)
    cfg = {**method_cfg, "num_inference_steps": STEPS}
    torch._dynamo.reset()
    compiled_model = dittofx.optimize(z.build(), cfg)
    eager_model = dittofx.optimize(z.build(), cfg)
    # fullgraph=True raises at any graph break; the frame count below is one graph per variant
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(compiled_model, fullgraph=True, backend=counter)
    frames = []
    with torch.no_grad():
        for _request in range(2):
            got = [compiled(**z.inputs(s, 1 - s / STEPS))[0] for s in range(STEPS)]
            want = [eager_model(**z.inputs(s, 1 - s / STEPS))[0] for s in range(STEPS)]
            assert dittofx.summary(compiled)[0].cached_steps == dittofx.summary(eager_model)[0].cached_steps
            assert dittofx.summary(compiled)[0].cached_steps, "the config should cache some steps"
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())
            frames.append(counter.frame_count)
    # one compilation per graph variant the schedule uses (warmup steps: the cond-free compute
    # graph; then the graph with the device decision; DBPrune has one graph), none per step, none
    # for the second request
    variants = 1 if cfg.get("method") == "dbprune" else 2
    assert frames == [variants, variants]


def test_dynamic_true_with_two_dims_of_one_size():
    """torch.compile(dynamic=True) where two input dims have one size, so dynamo's duck sizing gives
    them one symbol (FLUX.1 at 1024²: 4096 image tokens and T5's 4096 features; here 32 and 32).
    Sizes that the middle reads were torch.cond operands, on which inductor's FakeTensorUpdater
    failed at the first step decided on the device; the branches now compute them again."""
    z = zoo.get("flux")
    h, w = 4, 8
    assert h * w == z.inputs(0, 1.0)["encoder_hidden_states"].shape[-1]

    def inputs(s):
        return {**z.inputs(s, 1 - s / STEPS), "hidden_states": zoo._latent(1, 1, h * w, 16, step=s), "img_ids": zoo._img_ids_2d(h, w)}

    cfg = {**CASES["flux-dbcache"][1], "num_inference_steps": STEPS}
    torch._dynamo.reset()
    model, eager_model = dittofx.optimize(z.build(), cfg), dittofx.optimize(z.build(), cfg)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        got = [compiled(**inputs(s))[0] for s in range(STEPS)]
        want = [eager_model(**inputs(s))[0] for s in range(STEPS)]
    assert dittofx.summary(model)[0].cached_steps == dittofx.summary(eager_model)[0].cached_steps != []
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_, rtol=1e-4, atol=1e-4 * w_.abs().max().item())
