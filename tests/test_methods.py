"""TaylorSeer (SPEC §4) and steps computation masks (SPEC §5)."""

import itertools
import math

import cache_dit
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dittofx
import zoo
from reference import NaiveConfig, NaiveDBCache

SPEC_MASKS_28 = {
    "slow": "1111111101110011100110010001",
    "medium": "1111110110001100011000110001",
    "fast": "1111110100010000100000100001",
    "ultra": "1111001000001000000100000001",
}


def as_str(mask):
    return "".join(map(str, mask))


def cache_runs(mask):
    return [len(list(g)) for k, g in itertools.groupby(mask) if k == 0] or [0]


@pytest.mark.parametrize("policy", sorted(SPEC_MASKS_28))
def test_preset_masks_equal_the_spec_at_28_and_cache_dit_at_28_and_50(policy):
    assert as_str(dittofx.steps_mask(mask_policy=policy, total_steps=28)) == SPEC_MASKS_28[policy]
    for steps in (28, 50):
        assert dittofx.steps_mask(mask_policy=policy, total_steps=steps) == cache_dit.steps_mask(
            mask_policy=policy, total_steps=steps
        )


def test_steps_mask_takes_cache_dits_positional_order_and_default_preset():
    assert dittofx.steps_mask([6, 1], [1, 3], 11) == cache_dit.steps_mask([6, 1], [1, 3], 11)
    assert dittofx.steps_mask(None, None, 28, "fast") == cache_dit.steps_mask(None, None, 28, "fast")
    for steps in (28, 50):
        assert dittofx.steps_mask(total_steps=steps) == cache_dit.steps_mask(total_steps=steps) == dittofx.steps_mask(mask_policy="medium", total_steps=steps)


def test_explicit_bins_are_taken_literally():
    assert dittofx.steps_mask(compute_bins=[6, 1], cache_bins=[1, 3], total_steps=11) == [1] * 6 + [0] + [1] + [0] * 3
    assert dittofx.steps_mask(compute_bins=[2, 1], cache_bins=[2, 3]) == [1, 1, 0, 0, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="must cover total_steps=20"):
        dittofx.steps_mask(compute_bins=[2], cache_bins=[2], total_steps=20)
    with pytest.raises(ValueError, match="total_steps=True: must be an int >= 1 or None"):
        dittofx.steps_mask([2, 1], [1], total_steps=True)


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 400), policy=st.sampled_from(sorted(SPEC_MASKS_28)))
def test_preset_masks_for_any_length_keep_the_spec_invariants(steps, policy):
    mask = dittofx.steps_mask(mask_policy=policy, total_steps=steps)
    ref = dittofx.steps_mask(mask_policy=policy, total_steps=28)
    assert len(mask) == steps and mask[0] == 1 and mask[-1] == 1
    assert max(cache_runs(mask)) <= math.ceil(max(cache_runs(ref)) * steps / 28)
    if steps >= 16:  # short schedules compute more: every compute run keeps at least one step
        assert abs(sum(mask) / steps - sum(ref) / 28) <= 0.12


STEPS = 12


def run(model, z):
    with torch.no_grad():
        return [model(**z.inputs(s, 1 - s / STEPS))[0] for s in range(STEPS)]


@pytest.mark.parametrize(
    "name, extra, naive",
    [
        ("pixart", {"enable_taylorseer": True, "taylorseer_order": 1}, {"taylor_order": 1}),
        ("flux", {"enable_taylorseer": True, "taylorseer_order": 2}, {"taylor_order": 2}),
        ("flux", {"enable_taylorseer": True, "taylorseer_order": 2, "taylorseer_gap": "timestep"},
         {"taylor_order": 2, "taylor_gap": "timestep"}),
        ("wan", {"scm_steps_mask_policy": "fast", "scm_steps_policy": "dynamic"}, {"mask": "fast"}),
        ("qwenimage", {"scm_steps_mask_policy": "ultra", "scm_steps_policy": "static", "enable_taylorseer": True},
         {"mask": "ultra", "static_mask": True, "taylor_order": 1}),
        ("sd3", {"steps_computation_mask": [1, 1, 0, 0, 1, 0, 0, 0, 1], "steps_computation_policy": "static"},
         {"mask": [1, 1, 0, 0, 1, 0, 0, 0, 1], "static_mask": True}),
        # gate 6 binds at 0.3 (3 of the 10 steps that would cache compute), its sum reset on compute
        ("wan", {"max_accumulated_residual_diff_threshold": 0.3}, {"max_accumulated": 0.3}),
        # forwards that cannot be captured, cached block by block
        ("lumina2", {"enable_taylorseer": True, "taylorseer_order": 2}, {"taylor_order": 2}),
        ("lumina2", {"max_accumulated_residual_diff_threshold": 0.3}, {"max_accumulated": 0.3}),
        ("omnigen", {"enable_taylorseer": True, "taylorseer_order": 1, "taylorseer_gap": "timestep"},
         {"taylor_order": 1, "taylor_gap": "timestep"}),
        ("bria_fibo2_mask", {"scm_steps_mask_policy": "fast", "scm_steps_policy": "dynamic"}, {"mask": "fast"}),
        ("hunyuanvideo15", {"scm_steps_mask_policy": "ultra", "scm_steps_policy": "static", "enable_taylorseer": True},
         {"mask": "ultra", "static_mask": True, "taylor_order": 1}),
    ],
)  # fmt: skip
def test_taylorseer_and_masks_match_the_naive_reference(name, extra, naive):
    z = zoo.get(name)
    threshold = {"flux": 0.35, "bria_fibo2_mask": 0.7}.get(name, 0.5)  # some steps cache, some compute
    mask = naive.pop("mask", None)
    if isinstance(mask, str):
        mask = dittofx.steps_mask(mask_policy=mask, total_steps=STEPS)
    reference = NaiveDBCache(z.build(), z.block_lists,
                             NaiveConfig(Fn=1, Bn=1, threshold=threshold, max_warmup_steps=2, mask=mask, **naive))  # fmt: skip
    expected = run(reference, z)
    model = dittofx.optimize(
        z.build(),
        {"Fn_compute_blocks": 1, "Bn_compute_blocks": 1, "residual_diff_threshold": threshold,
         "max_warmup_steps": 2, "num_inference_steps": STEPS, **extra},
    )  # fmt: skip
    got = run(model, z)
    stats = dittofx.summary(model)[0]
    assert stats.cached_steps == reference.cached_steps and len(stats.cached_steps) >= 3
    if mask is not None:  # a 1 always computes; static: a 0 always caches (after the first compute)
        assert not any(mask[s] for s in stats.cached_steps if s < len(mask))
        if naive.get("static_mask"):
            assert all(s in stats.cached_steps for s in range(2, STEPS) if s >= len(mask) or mask[s] == 0)
    for g, w in zip(got, expected):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


class LinearMiddle(torch.nn.Module):
    """A DiT whose middle residual is exactly c * s**degree (s = the step index, from the timestep)."""

    class Mix(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.proj = torch.nn.Linear(dim, dim)

        def forward(self, hidden_states, temb):
            return hidden_states + 0.1 * torch.tanh(self.proj(hidden_states))

    class Drift(torch.nn.Module):
        def __init__(self, dim, degree):
            super().__init__()
            self.c = torch.nn.Parameter(torch.randn(dim))
            self.degree = degree

        def forward(self, hidden_states, temb):
            return hidden_states + self.c * temb**self.degree

    def __init__(self, dim=8, degree=1):
        super().__init__()
        self.blocks = torch.nn.ModuleList([self.Mix(dim), self.Drift(dim, degree), self.Drift(dim, degree), self.Mix(dim)])

    def forward(self, hidden_states, timestep):
        temb = (100.0 - timestep)[:, None, None]  # the step index, as the model sees it
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        return hidden_states


def test_taylorseer_order_1_is_exact_for_a_linear_middle_residual():
    torch.manual_seed(0)
    model = LinearMiddle()
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        expected = [model(x, torch.tensor([100.0 - s])) for s in range(STEPS)]
    dittofx.optimize(model, {"Fn_compute_blocks": 1, "Bn_compute_blocks": 1, "residual_diff_threshold": 0.5,
                             "max_warmup_steps": 2, "max_continuous_cached_steps": 4, "num_inference_steps": STEPS,
                             "enable_taylorseer": True, "taylorseer_order": 1})  # fmt: skip
    with torch.no_grad():
        got = [model(x, torch.tensor([100.0 - s])) for s in range(STEPS)]
    assert dittofx.summary(model)[0].cached_steps == [2, 3, 4, 5, 7, 8, 9, 10]
    for g, w in zip(got, expected):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_taylorseer_newton_of_order_k_is_exact_for_a_degree_k_middle_residual(order):
    """Computes at uneven steps (a static mask), then forecasts: the Newton form is exact for a
    residual that is a degree-k polynomial of the step index; SPEC §4's form is not, for k >= 2."""
    torch.manual_seed(0)
    x = torch.randn(1, 5, 8)
    model = LinearMiddle(degree=order)
    with torch.no_grad():
        expected = [model(x, torch.tensor([100.0 - s])) for s in range(STEPS)]
    mask = [1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0]  # computes at 0, 2, 3, 6, 8: uneven gaps
    errors = {}
    for form in ("newton", "taylor"):
        dittofx.optimize(model, {"Fn_compute_blocks": 1, "Bn_compute_blocks": 1, "max_warmup_steps": 1,
                                 "num_inference_steps": STEPS, "steps_computation_mask": mask,
                                 "steps_computation_policy": "static", "enable_taylorseer": True,
                                 "taylorseer_order": order, "taylorseer_interpolation": form})  # fmt: skip
        with torch.no_grad():
            got = [model(x, torch.tensor([100.0 - s])) for s in range(STEPS)]
        assert dittofx.summary(model)[0].cached_steps == [1, 4, 5, 7, 9, 10, 11]
        first = [0, 2, 3, 6, 8][order]  # the (k+1)-th compute: from then on k + 1 points are stored
        errors[form] = max(((g - w).abs().max() / w.abs().max()).item() for s, (g, w) in enumerate(zip(got, expected)) if s > first)
        dittofx.disable(model)
    assert errors["newton"] < 1e-5, errors
    if order >= 2:
        assert errors["taylor"] > 1e-3, errors


def test_taylorseer_timestep_gap_is_exact_where_the_residual_is_linear_in_the_timestep():
    """On a non-uniform schedule a residual linear in the timestep is not linear in the step index:
    the timestep gap forecasts it exactly, the step gap does not."""
    torch.manual_seed(0)
    x = torch.randn(1, 5, 8)
    schedule = [torch.tensor([100.0 - s**1.5]) for s in range(STEPS)]
    model = LinearMiddle()
    with torch.no_grad():
        expected = [model(x, t) for t in schedule]
    errors = {}
    for gap in ("timestep", "steps"):
        cfg = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 1, "residual_diff_threshold": 0.0, "max_warmup_steps": 2,
               "num_inference_steps": STEPS, "steps_computation_mask": [1, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0],
               "steps_computation_policy": "static", "enable_taylorseer": True, "taylorseer_order": 1,
               "taylorseer_gap": gap}  # fmt: skip
        dittofx.optimize(model, cfg)
        with torch.no_grad():
            got = [model(x, t) for t in schedule]
        assert dittofx.summary(model)[0].cached_steps == [3, 4, 6, 7, 9, 10, 11]
        errors[gap] = max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, expected))
        dittofx.disable(model)
    assert errors["timestep"] < 1e-6 and errors["steps"] > 1e-2, errors  # relative to the output
    with pytest.raises(ValueError, match=r"taylorseer_gap='sigma': must be 'steps' or 'timestep'"):
        dittofx.optimize(model, {"enable_taylorseer": True, "taylorseer_gap": "sigma"})


def test_refresh_regenerates_a_preset_mask_and_a_preset_needs_the_length():
    z = zoo.get("pixart")
    model = dittofx.optimize(z.build(), {"scm_steps_mask_policy": "fast", "scm_steps_policy": "static",
                                         "max_warmup_steps": 0, "num_inference_steps": 8})  # fmt: skip
    with torch.no_grad():
        model(**z.inputs(0, 1.0))
    state = model._dittofx.states["default"]
    assert state.mask[:8].tolist() == dittofx.steps_mask(mask_policy="fast", total_steps=8)
    dittofx.refresh(model, num_inference_steps=28)
    assert state.mask[:28].tolist() == dittofx.steps_mask(mask_policy="fast", total_steps=28)
    lazy = dittofx.optimize(z.build(), {"scm_steps_mask_policy": "fast"})
    with pytest.raises(ValueError, match="scm_steps_mask_policy='fast' needs the request length"):
        with torch.no_grad():
            lazy(**z.inputs(0, 1.0))


@pytest.mark.parametrize("policy", ["static", "dynamic"])
def test_host_known_decisions_skip_the_device_decision_and_agree_with_it(policy):
    """With the request length known, warmup and mask steps run a graph without torch.cond (and
    without a diff); the schedule and outputs equal the all-device run (length unknown)."""
    z = zoo.get("wan")
    mask = dittofx.steps_mask(mask_policy="fast", total_steps=STEPS)
    cfg = {"residual_diff_threshold": 0.5, "max_warmup_steps": 2, "steps_computation_mask": mask, "steps_computation_policy": policy}
    on_device = dittofx.optimize(z.build(), cfg)  # no request length: the host counts nothing
    want = run(on_device, z)
    host = dittofx.optimize(z.build(), dict(cfg, num_inference_steps=STEPS))
    used = []
    with torch.no_grad():
        got = []
        for s in range(STEPS):
            got.append(host(**z.inputs(s, 1 - s / STEPS))[0])
            graph, entry, *_ = host._dittofx.current
            used.append(next(d for d, g in entry.graphs.items() if g is graph))
    expected_used = ["compute" if s < 2 or mask[s] else ("cache" if policy == "static" else "device") for s in range(STEPS)]
    assert used == expected_used
    assert dittofx.summary(host)[0].cached_steps == dittofx.summary(on_device)[0].cached_steps
    assert all(torch.equal(a, b) for a, b in zip(got, want))
