"""`split_at_decision`: a step decided on the device runs as a head graph (prologue, Fn, gates,
diff) in the pre-hook, a host read of its decision, and a cond-free tail in the forward. Same
steps, same outputs as the torch.cond graph; no graph that torch.compile sees holds a cond (so
inductor's CUDA graphs can hold every step, checked as in tests/test_cudagraph_inputs.py)."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import dittofx
import zoo
from test_cudagraph_inputs import _inspecting_backend

STEPS = 10
CASES = {
    "pixart dbcache": ("pixart", {"residual_diff_threshold": 0.1, "max_warmup_steps": 2}),
    "flux dbcache F1B1": ("flux", {"residual_diff_threshold": 0.35, "max_warmup_steps": 2, "Bn_compute_blocks": 1}),
    "flux teacache": ("flux", {"method": "teacache", "rel_l1_thresh": 0.12, "coefficients": [1.0, 0.0]}),
    "pixart taylorseer + dynamic mask": ("pixart", {"residual_diff_threshold": 0.1, "max_warmup_steps": 2, "enable_taylorseer": True,
                                                    "taylorseer_order": 2, "scm_steps_mask_policy": "fast"}),
}  # fmt: skip


def steps(model, z, n=STEPS):
    with torch.no_grad():
        return [model(**z.inputs(s, 1 - s / n))[0] for s in range(n)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_split_runs_the_steps_of_the_cond_graph_bitwise(case):
    name, cfg = CASES[case]
    z = zoo.get(name)
    cfg = {**cfg, "num_inference_steps": STEPS}
    in_graph, split = dittofx.optimize(z.build(), cfg), dittofx.optimize(z.build(), cfg, split_at_decision=True)
    for _request in range(2):
        for a, b in zip(steps(in_graph, z), steps(split, z)):
            assert torch.equal(a, b)
        want = dittofx.summary(in_graph)[0]
        got = dittofx.summary(split)[0]
        assert got.cached_steps == want.cached_steps and got.cached_steps, got.cached_steps
        torch.testing.assert_close(torch.tensor(got.diffs), torch.tensor(want.diffs), rtol=0, atol=0, equal_nan=True)


def test_split_under_torch_compile_holds_no_cond_and_keeps_the_state_static():
    z = zoo.get("pixart")
    cfg = {"residual_diff_threshold": 0.1, "max_warmup_steps": 2, "num_inference_steps": STEPS}
    eager = dittofx.optimize(z.build(), cfg, split_at_decision=True)
    torch._dynamo.reset()
    graphs: list[dict] = []
    model = dittofx.optimize(z.build(), cfg, split_at_decision=True)
    compiled = torch.compile(model, fullgraph=True, backend=_inspecting_backend(graphs))
    for _request in range(2):
        for a, b in zip(steps(compiled, z), steps(eager, z)):
            assert torch.equal(a, b)
    assert dittofx.summary(model)[0].cached_steps == dittofx.summary(eager)[0].cached_steps
    # the host-decided compute graph (warmup), then the two tails; none for the second request
    assert len(graphs) == 3, graphs
    for g in graphs:
        assert not g["has_cond"] and g["mutated_not_static"] == [], g


def test_split_tails_under_inductor_equal_eager_and_the_head_compiles_when_asked():
    z = zoo.get("pixart")
    cfg = {"residual_diff_threshold": 0.1, "max_warmup_steps": 2, "num_inference_steps": STEPS}
    eager = dittofx.optimize(z.build(), cfg)
    torch._dynamo.reset()
    head_counter, counter = CompileCounter(), CompileCounterWithBackend("inductor")
    model = dittofx.optimize(z.build(), cfg, split_at_decision={"backend": head_counter})
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for a, b in zip(steps(compiled, z), steps(eager, z)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    assert dittofx.summary(model)[0].cached_steps == dittofx.summary(eager)[0].cached_steps
    assert (counter.frame_count, head_counter.frame_count) == (3, 1)  # compute, two tails; one head


def test_bad_split_option_raises_and_leaves_the_model_untouched():
    z = zoo.get("pixart")
    model = z.build()
    with pytest.raises(TypeError, match=r"split_at_decision='yes': must be True, False or a dict of torch.compile arguments"):
        dittofx.optimize(model, {}, split_at_decision="yes")
    with pytest.raises(ValueError, match=r"split_at_decision with method='dbprune'.*allowed with 'dbcache' and 'teacache'"):
        dittofx.optimize(model, {"method": "dbprune"}, split_at_decision=True)
    assert "_dittofx" not in model.__dict__ and "forward" not in model.__dict__
