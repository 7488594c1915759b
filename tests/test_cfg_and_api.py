"""CFG branches (SPEC §3), refresh/reset, summary and explain."""

import copy
import dataclasses
import logging

import pytest
import torch

import dittofx
import zoo

STEPS = 6
CFG = {"residual_diff_threshold": 0.08, "max_warmup_steps": 1, "num_inference_steps": STEPS}


def uncond(kwargs):
    """The text inputs zeroed (HiDream takes two: `encoder_hidden_states_t5`, `..._llama3`)."""
    return {k: torch.zeros_like(v) if k.startswith("encoder_hidden_states") else v for k, v in kwargs.items()}


def single_branch_run(z, make_inputs, cfg=CFG):
    """One optimized model fed only one branch's inputs: the independent expectation."""
    model = dittofx.optimize(z.build(), cfg)
    with torch.no_grad():
        outs = [model(**make_inputs(z.inputs(s, 1 - s / STEPS)))[0] for s in range(STEPS)]
    return outs, dittofx.summary(model)[0].cached_steps


@pytest.fixture(scope="module")
def pixart():
    return zoo.get("pixart")


@pytest.fixture(scope="module")
def expected(pixart):
    return {"cond": single_branch_run(pixart, lambda k: k), "uncond": single_branch_run(pixart, uncond)}


def cfg_loop(model, z, use_context: bool, steps=range(STEPS)):
    outs = {"cond": [], "uncond": []}
    with torch.no_grad():
        for s in steps:
            kwargs = z.inputs(s, 1 - s / STEPS)
            for branch, inputs in (("cond", kwargs), ("uncond", uncond(kwargs))):
                if use_context:
                    with model.cache_context(branch):
                        outs[branch].append(model(**inputs)[0])
                else:
                    outs[branch].append(model(**inputs)[0])
    return outs


@pytest.mark.parametrize("separate, use_context", [(None, True), (True, True), (True, False)])
def test_each_cfg_branch_has_its_own_state(pixart, expected, separate, use_context):
    model = dittofx.optimize(pixart.build(), dict(CFG, enable_separate_cfg=separate))
    outs = cfg_loop(model, pixart, use_context)
    stats = {s.branch: s for s in dittofx.summary(model)}
    assert set(stats) == {"cond", "uncond"}
    for branch in ("cond", "uncond"):
        want_outs, want_cached = expected[branch]
        assert stats[branch].cached_steps == want_cached
        assert all(torch.equal(a, b) for a, b in zip(outs[branch], want_outs))
    assert expected["cond"][1] != expected["uncond"][1] or expected["cond"][1], "test needs caching"


@pytest.mark.parametrize("separate, use_context", [(None, False), (False, True)])
def test_one_shared_state_without_names_or_when_disabled(pixart, separate, use_context):
    model = dittofx.optimize(pixart.build(), dict(CFG, enable_separate_cfg=separate, num_inference_steps=2 * STEPS))
    cfg_loop(model, pixart, use_context)
    (stats,) = dittofx.summary(model)
    assert stats.branch == "default"
    assert len(stats.cached_steps) + len(stats.computed_steps) == 2 * STEPS  # both branches counted in one state


def test_refresh_reset_summary_and_explain(pixart, caplog):
    model = dittofx.optimize(pixart.build(), dict(CFG, residual_diff_threshold=10.0, num_inference_steps=None))
    dittofx.refresh(model, num_inference_steps=3)
    with torch.no_grad():
        for s in range(5):  # 3 steps, then a new request of 3 starts by itself
            model(**pixart.inputs(s, 0.5))  # constant timestep: only the step count can end a request
    stats = dittofx.summary(model)[0]
    assert stats.computed_steps == [0] and stats.cached_steps == [1]
    dittofx.reset(model)
    with torch.no_grad():
        model(**pixart.inputs(0, 0.5))
    assert dittofx.summary(model)[0].computed_steps == [0] and dittofx.summary(model)[0].cached_steps == []
    with caplog.at_level(logging.INFO, logger="dittofx"):
        dittofx.summary(model)
    assert "P50=" in caplog.text or "no diffs measured" in caplog.text
    assert stats.config == "DBCache_F1B0_W1I1M-1MC-1_R10_T0O0"
    text = dittofx.explain(model)
    for words in ("path: torch.export graph", "chain: transformer_blocks (4 blocks)", "Fn = 1 blocks", "middle = 3 blocks", "residual diff on:"):
        assert words in text


@pytest.mark.parametrize("name", ["pixart", "lumina2"])  # the graph, and block by block (Lumina2's t runs 0 -> 1)
@pytest.mark.parametrize(
    "timesteps, length, calls, warns",
    [("rising", None, 1, True), ("rising", None, 2, True), ("falling", None, 1, False), ("falling", None, 2, False), ("rising", 6, 1, False)],
)  # fmt: skip
def test_timesteps_that_rise_within_a_request_of_unknown_length_warn_that_nothing_caches(name, timesteps, length, calls, warns, caplog):
    """SPEC §3, length unknown: a call whose timestep rose starts a new request. Rising at every step
    (Lumina2), every step starts a new request and computes: said once, with the fix. `calls`: per
    step, on one shared state (a pipeline's cond and uncond, unnamed)."""
    z = zoo.get(name)
    model = dittofx.optimize(z.build(), {"residual_diff_threshold": 10.0, "max_warmup_steps": 1, "num_inference_steps": length})
    with caplog.at_level(logging.WARNING, logger="dittofx"), torch.no_grad():
        for s in range(6):
            for _ in range(calls):
                model(**z.inputs(s, s / 6 if timesteps == "rising" else 1 - s / 6))
    said = [r.getMessage() for r in caplog.records if "timestep rose" in r.getMessage()]
    ran = dittofx.summary(model)[0]
    if warns:
        assert len(said) == 1 and type(model).__name__ in said[0] and "nothing caches" in said[0] and "num_inference_steps" in said[0]
        assert ran.computed_steps == [0] and ran.cached_steps == list(range(1, calls))  # the 6th step: a request's first
    elif length is None:
        assert said == [] and ran.cached_steps == list(range(1, 6 * calls))
    else:
        assert said == [] and ran.cached_steps == [1, 2, 3, 4, 5]

def test_two_models_keep_separate_state(pixart):
    a = dittofx.optimize(pixart.build(), dict(CFG, residual_diff_threshold=10.0))
    b = dittofx.optimize(pixart.build(), dict(CFG, residual_diff_threshold=0.0))
    with torch.no_grad():
        for s in range(3):
            a(**pixart.inputs(s, 1 - s / STEPS))
            b(**pixart.inputs(s, 1 - s / STEPS))
    assert dittofx.summary(a)[0].cached_steps == [1, 2]
    assert dittofx.summary(b)[0].cached_steps == []


@pytest.mark.parametrize("name", ["pixart", "hidream"])
def test_a_deep_copy_mid_request_goes_on_with_its_own_weights_and_state(name):
    """copy.deepcopy of an optimized model goes on with the request as the original would, on its
    own weights, state and CFG branch names (the graph path captures its graphs again; block by
    block, the copy's blocks ran the original's blocks and state before)."""
    z = zoo.get(name)
    cfg = dict(CFG, residual_diff_threshold=0.6)
    reference = dittofx.optimize(z.build(), cfg)
    want = cfg_loop(reference, z, use_context=True)
    cached = [(s.branch, s.cached_steps) for s in dittofx.summary(reference)]
    assert all(any(step >= 3 for step in steps) for _, steps in cached), "test needs caching after the copy"
    model = dittofx.optimize(z.build(), cfg)
    cfg_loop(model, z, True, steps=range(3))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)  # exact, undone below: the copy must not read these
    got_twin = cfg_loop(twin, z, True, steps=range(3, STEPS))
    with torch.no_grad():
        for p in model.parameters():
            p.div_(2)
    got = cfg_loop(model, z, True, steps=range(3, STEPS))  # the original's state was not advanced by the copy
    for outs in (got_twin, got):
        for branch in ("cond", "uncond"):
            assert all(torch.equal(a, b) for a, b in zip(outs[branch], want[branch][3:], strict=True))
    for m in (twin, model):
        assert [(s.branch, s.cached_steps) for s in dittofx.summary(m)] == cached
    dittofx.disable(twin)  # the copy's hook and wrappers are its own to remove
    with torch.no_grad():
        assert torch.equal(twin(**z.inputs(0, 1.0))[0], z.build()(**z.inputs(0, 1.0))[0])
    assert dittofx.summary(model)  # the original still optimized


def test_disable_restores_an_instance_level_forward(pixart):
    model = pixart.build()
    original = model.forward
    model.forward = original  # an instance attribute, as a wrapper or hook library would set
    dittofx.optimize(model, {})
    assert model.__dict__["forward"] is not original
    dittofx.disable(model)
    assert model.__dict__["forward"] is original


def test_merge_config_keeps_the_method_unless_the_changes_name_another():
    from dittofx.config import merge_config

    tea = merge_config(dittofx.TeaCacheConfig(rel_l1_thresh=0.2, num_inference_steps=10), {"rel_l1_thresh": 0.3})
    assert tea == dittofx.TeaCacheConfig(rel_l1_thresh=0.3, num_inference_steps=10)
    prune = merge_config(dittofx.DBCacheConfig(max_warmup_steps=3), {"method": "dbprune", "residual_diff_threshold": 0.1})
    assert prune == dittofx.DBPruneConfig(residual_diff_threshold=0.1)  # another method: its own defaults
    with pytest.raises(ValueError, match=r"unknown cache_config key 'Fn_compute_blocks'"):
        merge_config(dittofx.TeaCacheConfig(), {"Fn_compute_blocks": 2})


@pytest.mark.parametrize("name", ["pixart", "lumina2"])  # the graph path; block by block (no graph)
def test_a_request_under_inference_mode_leaves_the_model_usable_in_any_grad_mode(name):
    """The state is made on the first call: made under torch.inference_mode, it would be inference
    tensors, which refuse the updates of every later call (and reset) outside it."""
    z = zoo.get(name)
    cfg = {"residual_diff_threshold": 0.5, "max_warmup_steps": 1, "num_inference_steps": 4}
    model, alone = dittofx.optimize(z.build(), cfg), dittofx.optimize(z.build(), cfg)

    def request(m, mode):
        with mode():
            return [m(**z.inputs(s, 1 - s / 4))[0].detach() for s in range(4)]

    want = request(alone, torch.no_grad)
    for mode in (torch.inference_mode, torch.no_grad, torch.enable_grad, torch.inference_mode):
        got = request(model, mode)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), mode
        assert dittofx.summary(model, log_table=False)[0].cached_steps == dittofx.summary(alone, log_table=False)[0].cached_steps
        dittofx.reset(model)
    with torch.inference_mode():  # .to / .double remake the buffers: still not as inference tensors
        model.double().float()
    dittofx.reset(model)
    assert all(torch.equal(g, w) for g, w in zip(request(model, torch.no_grad), want))
    assert dittofx.summary(alone, log_table=False)[0].cached_steps, "test needs caching"


def test_optimize_takes_what_torch_compile_returned(pixart):
    """torch.compile first, then optimize: the engine goes on the module inside, where `disable`,
    `summary` and a second `optimize` look for it (the wrapper keeps some attribute writes)."""
    plain = pixart.build()
    compiled = torch.compile(pixart.build(), fullgraph=True, backend="eager")  # dynamo's tracing, no inductor
    assert dittofx.optimize(compiled, CFG) is compiled
    with pytest.raises(ValueError, match="already optimized"):
        dittofx.optimize(compiled, CFG)
    eager = dittofx.optimize(pixart.build(), CFG)
    with torch.no_grad():
        for s in range(STEPS):
            torch.testing.assert_close(compiled(**pixart.inputs(s, 1 - s / STEPS))[0], eager(**pixart.inputs(s, 1 - s / STEPS))[0])
    assert dittofx.summary(compiled)[0].cached_steps == dittofx.summary(eager)[0].cached_steps != []
    module = dittofx.disable(compiled)
    assert module is compiled._orig_mod and not {"forward", "_dittofx", "cache_context"} & module.__dict__.keys()
    assert not module._forward_pre_hooks and "_dittofx_states" not in module._modules
    with torch.no_grad():
        assert torch.equal(module(**pixart.inputs(0, 1.0))[0], plain(**pixart.inputs(0, 1.0))[0])


class _NoTimestep(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))

    def forward(self, hidden_states):
        for block in self.blocks:
            hidden_states = hidden_states + torch.tanh(block(hidden_states))
        return (hidden_states,)


@pytest.mark.parametrize("length", [None, 4])
def test_no_timestep_input_and_no_request_length_warns(length, caplog):
    """SPEC §3 tells a new request of unknown length by the timestep: without one, said once."""
    model = dittofx.optimize(_NoTimestep(), {"residual_diff_threshold": 0.1, "num_inference_steps": length})
    with caplog.at_level(logging.WARNING, logger="dittofx"), torch.no_grad():
        model(torch.randn(1, 5, 8))
        model(torch.randn(1, 5, 8))
    said = [r.getMessage() for r in caplog.records if "has no timestep input" in r.getMessage()]
    assert len(said) == (1 if length is None else 0) and all("_NoTimestep" in m and "num_inference_steps" in m for m in said)


@pytest.mark.parametrize("length", [None, 4])
def test_teacache_without_a_request_length_warns_that_the_last_step_may_cache(length, caplog):
    z = zoo.get("flux")
    model = dittofx.optimize(z.build(), {"method": "teacache", "rel_l1_thresh": 0.3, "num_inference_steps": length})
    with caplog.at_level(logging.WARNING, logger="dittofx"), torch.no_grad():
        for s in range(3):
            model(**z.inputs(s, 1 - s / 3))
    said = [r.getMessage() for r in caplog.records if "TeaCache on FluxTransformer2DModel with the request length unknown" in r.getMessage()]
    assert len(said) == (1 if length is None else 0)


def test_refresh_and_reset_start_the_call_parity_again(pixart):
    """enable_separate_cfg=True without names: even calls are cond. A stray call, then refresh or
    reset: the next call is a new request's first, so cond's."""
    model = dittofx.optimize(pixart.build(), dict(CFG, enable_separate_cfg=True))
    for restart in (dittofx.reset, lambda m: dittofx.refresh(m, num_inference_steps=STEPS)):
        with torch.no_grad():
            model(**pixart.inputs(0, 1.0))  # cond, and no uncond after it
            restart(model)
            model(**pixart.inputs(0, 1.0))
        ran = {s.branch: s.computed_steps + s.cached_steps for s in dittofx.summary(model)}
        assert ran["cond"] == [0] and not ran.get("uncond"), ran


def test_summary_prints_as_its_table(pixart):
    model = dittofx.optimize(pixart.build(), dict(CFG, residual_diff_threshold=10.0))
    assert str(dittofx.summary(model, log_table=False)) == "dittofx summary: no step has run yet"
    with torch.no_grad():
        for s in range(3):
            model(**pixart.inputs(s, 1 - s / STEPS))
    stats = dittofx.summary(model, log_table=False)
    assert isinstance(stats, list) and str(stats) == str(stats).strip()
    assert str(stats).splitlines()[0] == "dittofx summary" and "[default] DBCache_F1B0_W1" in str(stats) and "P50=" in str(stats)
    assert "cached 2/3 steps [1, 2]" in str(stats)


@pytest.mark.parametrize("length", [STEPS, None], ids=["length known", "length unknown"])
@pytest.mark.parametrize("compute_first", [False, True], ids=["cond first", "uncond first"])
# thresholds at which the branches alone cache differently (PixArt: between their step-3 diffs,
# 0.0422 and 0.0431); HiDream runs block by block
@pytest.mark.parametrize("name, threshold", [("pixart", 0.0426), ("hidream", 0.3)])
def test_the_second_cfg_branch_reuses_the_first_branchs_decisions(name, threshold, length, compute_first):
    """cfg_diff_compute_separate=False (SPEC §3): the second branch of each step takes the first's
    decision and measures no diff. Expected: the first branch as it runs alone; the second alone,
    given the first's schedule as a static mask."""
    pixart = zoo.get(name)
    first, second = ("uncond", "cond") if compute_first else ("cond", "uncond")
    inputs = {"cond": lambda k: k, "uncond": uncond}
    alone = {b: single_branch_run(pixart, inputs[b], dict(CFG, residual_diff_threshold=threshold)) for b in (first, second)}
    assert alone[first][1] != alone[second][1], alone
    cfg = dict(CFG, residual_diff_threshold=threshold, num_inference_steps=length, enable_separate_cfg=True,
               cfg_compute_first=compute_first, cfg_diff_compute_separate=False)  # fmt: skip
    model = dittofx.optimize(pixart.build(), cfg)
    outs = {"cond": [], "uncond": []}
    with torch.no_grad():
        for s in range(STEPS):
            for branch in (first, second):  # by call parity
                outs[branch].append(model(**inputs[branch](pixart.inputs(s, 1 - s / STEPS)))[0])
    stats = {s.branch: s for s in dittofx.summary(model)}
    assert stats[first].cached_steps == alone[first][1] and all(torch.equal(g, w) for g, w in zip(outs[first], alone[first][0]))
    assert stats[second].cached_steps == stats[first].cached_steps and all(d != d for d in stats[second].diffs)
    mask = [0 if s in stats[first].cached_steps else 1 for s in range(STEPS)]
    told, _ = single_branch_run(pixart, inputs[second], dict(CFG, steps_computation_mask=mask, steps_computation_policy="static"))
    assert all(torch.equal(g, w) for g, w in zip(outs[second], told))


@pytest.mark.parametrize("compute_first", [False, True], ids=["cond first", "uncond first"])
def test_named_branches_in_the_other_order_than_cfg_compute_first_say_so_once(pixart, compute_first, caplog):
    """cfg_diff_compute_separate=False with cache_context names: where the pipeline runs the second
    branch (by cfg_compute_first) before the first in each step, nothing can be shared: said once,
    naming the fix. In the configured order: nothing said."""
    cfg = dict(CFG, cfg_compute_first=compute_first, cfg_diff_compute_separate=False)
    configured = ["uncond", "cond"] if compute_first else ["cond", "uncond"]
    said = {}
    for order in (configured, configured[::-1]):
        model = dittofx.optimize(pixart.build(), cfg)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dittofx"), torch.no_grad():
            for s in range(STEPS):
                for branch in order:
                    with model.cache_context(branch):
                        kwargs = pixart.inputs(s, 1 - s / STEPS)
                        model(**(uncond(kwargs) if branch == "uncond" else kwargs))
        said[tuple(order)] = [r.getMessage() for r in caplog.records if "cfg_diff_compute_separate=False" in r.getMessage()]
    assert said[tuple(configured)] == []
    (message,) = said[tuple(configured[::-1])]
    assert f"runs {configured[1]!r} before {configured[0]!r}" in message and f"cfg_compute_first={not compute_first}" in message


def test_the_timestep_watch_waits_for_its_copies_without_taking_more(pixart, monkeypatch, caplog):
    """On CUDA the host may run ahead of the copies (no sync in a step): the watch keeps its five
    and reads them once they are done."""
    from dittofx.runtime import engine

    pending, real = iter([False] * 3), engine._TimestepWatch.ready
    monkeypatch.setattr(engine._TimestepWatch, "ready", lambda self: real(self) and next(pending, True))
    model = dittofx.optimize(pixart.build(), {"residual_diff_threshold": 0.1})
    with caplog.at_level(logging.WARNING, logger="dittofx"), torch.no_grad():
        for s in range(10):
            model(**pixart.inputs(s, s / 10))
    watch = model._dittofx._first_timesteps["default"]
    assert len(watch.copies) == watch.COUNT and watch.done and sum("timestep rose" in r.getMessage() for r in caplog.records) == 1


def test_inputs_that_require_grad_are_said_to_get_no_graph(pixart, caplog):
    """Inference only (the forward runs under no_grad): a call with inputs that require grad (a
    training step) is said once, rather than failing later at backward with torch's generic error."""
    model = dittofx.optimize(pixart.build(), CFG)
    kwargs = pixart.inputs(0, 1.0)
    kwargs["hidden_states"].requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        out = model(**kwargs)[0]
        model(**kwargs)
    assert not out.requires_grad
    assert caplog.text.count("got inputs that require grad: dittofx is for inference") == 1
    trained = dittofx.optimize(pixart.build(), CFG).train()  # a fine-tune: only the parameters require grad
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        trained(**pixart.inputs(0, 1.0))
        trained.eval()(**pixart.inputs(1, 0.5))  # eval, grad on, nothing requires grad in the inputs: inference
    assert caplog.text.count("is in train() mode with parameters that require grad: dittofx is for inference") == 1


def test_cache_dit_config_objects_are_taken_with_their_own_defaults():
    """A cache-dit user's `cache_dit.DBCacheConfig(...)` / `DBPruneConfig(...)` is read field by field,
    cache-dit's defaults included (its Fn_compute_blocks is 8, ours 1); a field dittofx does not
    have is refused by name when set, and cache-dit's TaylorSeer calibrator config says where
    TaylorSeer goes in dittofx."""
    import cache_dit

    from dittofx.config import parse_config

    got = parse_config(cache_dit.DBCacheConfig(residual_diff_threshold=0.2, steps_computation_mask=[1, 1, 0, 1], num_inference_steps=4))
    assert got == dittofx.DBCacheConfig(
        Fn_compute_blocks=8, Bn_compute_blocks=0, residual_diff_threshold=0.2, max_warmup_steps=8,
        steps_computation_mask=(1, 1, 0, 1), num_inference_steps=4,
    )  # fmt: skip
    prune = parse_config(cache_dit.DBPruneConfig(Fn_compute_blocks=1, non_prune_block_ids=[3]))
    assert prune == dittofx.DBPruneConfig(Fn_compute_blocks=1, max_warmup_steps=8, non_prune_block_ids=(3,))
    with pytest.raises(ValueError, match=r"cache_dit.DBCacheConfig sets force_refresh_step_hint=3: not supported by dittofx"):
        parse_config(cache_dit.DBCacheConfig(force_refresh_step_hint=3))
    with pytest.raises(TypeError, match=r"TaylorSeerCalibratorConfig\(taylorseer_order=2\): .*'enable_taylorseer': True"):
        dittofx.optimize(zoo.get("pixart").build(), cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=2))
    # through optimize: the same schedule as the equivalent dict
    z, stats = zoo.get("pixart"), []
    for cfg in (cache_dit.DBCacheConfig(Fn_compute_blocks=1, residual_diff_threshold=0.06, max_warmup_steps=1, num_inference_steps=6),
                {"residual_diff_threshold": 0.06, "max_warmup_steps": 1, "num_inference_steps": 6}):  # fmt: skip
        model = dittofx.optimize(z.build(), cfg)
        with torch.no_grad():
            for s in range(6):
                model(**z.inputs(s, 1 - s / 6))
        stats.append(dittofx.summary(model, log_table=False)[0].cached_steps)
    assert stats[0] == stats[1] and 0 < len(stats[0]) < 5, stats


def test_cache_dit_partial_configs_and_params_modifiers():
    """cache-dit's per-transformer form (its Wan 2.2 example): `ParamsModifier(cache_config=
    DBCacheConfig().reset(max_warmup_steps=2, ...))`, whose `reset` leaves every other field None:
    the None fields are unset, so only the fields given change the shared config (they were read
    as set: "sets force_refresh_step_policy=None: not supported"; helper-56)."""
    import cache_dit
    from cache_dit import ParamsModifier

    from dittofx.config import merge_config, parse_config

    shared = dittofx.DBCacheConfig(Fn_compute_blocks=2, residual_diff_threshold=0.2, max_warmup_steps=4, num_inference_steps=6)
    want = dataclasses.replace(shared, max_warmup_steps=2, max_cached_steps=20)
    partial = cache_dit.DBCacheConfig().reset(max_warmup_steps=2, max_cached_steps=20)
    assert merge_config(shared, partial) == want
    assert merge_config(shared, ParamsModifier(cache_config=partial)) == want
    assert parse_config(cache_dit.DBCacheConfig().reset(residual_diff_threshold=0.1)) == parse_config({"residual_diff_threshold": 0.1})
    with pytest.raises(ValueError, match=r"ParamsModifier\(calibrator_config=TaylorSeerCalibratorConfig\(...\)\): .*'enable_taylorseer': True"):
        merge_config(shared, ParamsModifier(calibrator_config=cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=2)))
    with pytest.raises(TypeError, match=r"BasicCacheConfig\(...\): cache-dit's base class .*DBCacheConfig\(\).reset"):
        merge_config(shared, ParamsModifier(max_warmup_steps=2))  # its deprecated keywords (helper-59)


def test_a_function_calling_the_model_under_fullgraph_is_told_to_compile_the_module():
    """torch.compile(fullgraph=True) of a function that calls the optimized model meets the
    pre-hook, which runs outside dynamo: the error says to compile the module itself."""
    z = zoo.get("pixart")
    model = dittofx.optimize(z.build(), {"residual_diff_threshold": 0.1, "num_inference_steps": 2})
    call = torch.compile(lambda **kw: model(**kw), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"any other is compiled as a module \(torch.compile\(model\)"), torch.no_grad():
        call(**z.inputs(0, 1.0))


def test_a_recompile_limit_set_below_torchs_default_is_raised_and_said(caplog):
    """optimize raises dynamo's recompile limit to 64 (never lowers it); a limit below torch's
    default was set on purpose (to catch recompiles), so raising it is said."""
    z = zoo.get("pixart")
    with torch._dynamo.config.patch(recompile_limit=2), caplog.at_level(logging.WARNING, logger="dittofx"):
        dittofx.optimize(z.build(), {"residual_diff_threshold": 0.1})
        assert torch._dynamo.config.recompile_limit == 64
        assert "recompile_limit=2 (below torch's default 8) raised to 64" in caplog.text
    with torch._dynamo.config.patch(recompile_limit=128):
        caplog.clear()
        dittofx.optimize(z.build(), {"residual_diff_threshold": 0.1})
        assert torch._dynamo.config.recompile_limit == 128 and "raised to" not in caplog.text
