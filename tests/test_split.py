"""`split_at_decision`: a step decided on the device runs as a head graph (prologue, Fn, gates,
diff, a cached step's path) in the pre-hook, a host read of its decision, and a cond-free tail in
the forward (the compute path, or a copy of the head's outputs). Same
steps, same outputs as the torch.cond graph; no graph that torch.compile sees holds a cond (so
inductor's CUDA graphs can hold every step, checked as in tests/test_cudagraph_inputs.py)."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch.utils._pytree import tree_leaves

import dittofx
import zoo
from test_cudagraph_inputs import inspecting_backend

STEPS = 10
# each case runs both tails (max_continuous_cached_steps forces device-decided computes)
CASES = {
    "pixart dbcache": ("pixart", {"residual_diff_threshold": 0.1, "max_warmup_steps": 2}),
    "flux dbcache F1B1 (views out of the middle)": ("flux", {"residual_diff_threshold": 0.35, "max_warmup_steps": 2, "Bn_compute_blocks": 1,
                                                             "max_continuous_cached_steps": 2}),
    "flux teacache": ("flux", {"method": "teacache", "rel_l1_thresh": 0.12, "coefficients": [1.0, 0.0]}),
    "pixart taylorseer": ("pixart", {"residual_diff_threshold": 0.1, "max_warmup_steps": 2, "enable_taylorseer": True,
                                     "taylorseer_order": 2, "max_continuous_cached_steps": 2}),
    "zimage (higher-order ops in the middle)": ("zimage", {"residual_diff_threshold": 1.0, "max_warmup_steps": 2,
                                                           "max_continuous_cached_steps": 2}),
}  # fmt: skip


class TailCounter:
    """Which graph variants the forward ran, per call."""

    def __init__(self, model):
        self.graphs, self.engine = [], model._dittofx
        model.register_forward_hook(self.record)

    def record(self, *_):
        if not self.engine.capturing:
            graph, entry, *_ = self.engine.current
            self.graphs.append(next(k for k, g in entry.graphs.items() if g is graph))


def steps(model, z, n=STEPS):
    with torch.no_grad():
        return [model(**z.inputs(s, 1 - s / n))[0] for s in range(n)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_split_runs_the_steps_of_the_cond_graph_bitwise(case):
    name, cfg = CASES[case]
    z = zoo.get(name)
    cfg = {**cfg, "num_inference_steps": STEPS}
    in_graph, split = dittofx.optimize(z.build(), cfg), dittofx.optimize(z.build(), cfg, split_at_decision=True)
    ran = TailCounter(split)
    for _request in range(2):
        for a, b in zip(tree_leaves(steps(in_graph, z)), tree_leaves(steps(split, z))):
            assert torch.equal(a, b)
        want = dittofx.summary(in_graph)[0]
        got = dittofx.summary(split)[0]
        assert got.cached_steps == want.cached_steps and got.cached_steps, got.cached_steps
        torch.testing.assert_close(torch.tensor(got.diffs), torch.tensor(want.diffs), rtol=0, atol=0, equal_nan=True)
    assert {"split-compute", "split-cache"} <= set(ran.graphs), ran.graphs
    # the head ran the cache path (the cache tail copies its outputs), unless Bn blocks would run twice
    cache_tail = split._dittofx.current[1].graphs["split-cache"]
    copies = {n.target for n in cache_tail.graph.nodes if n.op == "call_function"} == {torch.ops.aten.clone.default}
    assert copies == (cfg.get("Bn_compute_blocks", 0) == 0)


def test_split_under_torch_compile_holds_no_cond_and_serves_new_resolutions_without_recompiling():
    """No graph torch.compile sees holds a cond; the state is static, the head's tensors are not
    (CUDA graphs would record again whenever a static input moves); sizes are not constants."""
    import test_shapes

    z = zoo.get("pixart")
    cfg = {"residual_diff_threshold": 0.1, "max_warmup_steps": 2, "num_inference_steps": 4}
    torch._dynamo.reset()
    graphs: list[dict] = []
    model = dittofx.optimize(z.build(), cfg, split_at_decision=True)
    compiled = torch.compile(model, fullgraph=True, backend=inspecting_backend(graphs))
    frames = []
    for side in (8, 8, 16, 12, 20):
        request = test_shapes.request(1, side, seed=side)
        eager = dittofx.optimize(z.build(), cfg, split_at_decision=True)
        with torch.no_grad():
            for kw in request:
                assert torch.equal(compiled(**kw)[0], eager(**kw)[0])
        assert dittofx.summary(model)[0].cached_steps == dittofx.summary(eager)[0].cached_steps
        frames.append(len(graphs))
    # the host-decided compute graph (warmup), the cache tail (the schedule caches every decided
    # step); again with dynamic shapes at the second resolution of each capture (PixArt: two
    # captures, tests/test_recompiles.py), none after
    assert frames == [2, 2, 4, 4, 4], frames
    for g in graphs:
        assert not g["has_cond"] and g["mutated_not_static"] == [], g
        # copied per CUDA-graph replay: the call's own tensors, and for a tail the head's
        assert all(n.startswith(("l_args_", "l_kwargs_hidden", "l_kwargs_encoder", "l_kwargs_timestep", "l_kwargs_dittofx_head")) for n in g["not_static"]), g
    assert any(n.startswith("l_kwargs_dittofx_head") for g in graphs for n in g["not_static"])


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


def test_by_default_a_compile_that_records_cuda_graphs_splits_with_its_own_compile_and_others_keep_the_cond():
    """split_at_decision left out: under a compile that records CUDA graphs (dynamo's "cudagraphs"
    backend here: on CPU it records none and is quick to compile; which compiles count, inductor's
    modes among them, is tests/test_compile_context.py) the steps decided on the device run split,
    the head compiled by the model's own compile; a default-mode compile, an eager call and
    split_at_decision=False run the torch.cond graph. Same schedule and outputs."""
    z = zoo.get("pixart")
    cfg = {"residual_diff_threshold": 0.1, "max_warmup_steps": 2, "num_inference_steps": STEPS, "max_continuous_cached_steps": 2}
    torch._dynamo.reset()
    models = {name: dittofx.optimize(z.build(), cfg, **opts) for name, opts in
              (("eager", {}), ("recording", {}), ("default mode", {}), ("never", {"split_at_decision": False}))}  # fmt: skip
    runs = {name: TailCounter(m) for name, m in models.items()}
    calls = {
        "eager": models["eager"],
        "recording": torch.compile(models["recording"], backend="cudagraphs", fullgraph=True),
        "default mode": torch.compile(models["default mode"], fullgraph=True, backend=CompileCounter()),
        "never": torch.compile(models["never"], backend="cudagraphs", fullgraph=True),
    }
    want = steps(calls["eager"], z)
    for name in ("recording", "default mode", "never"):
        for a, b in zip(steps(calls[name], z), want):
            assert torch.equal(a, b)
        assert dittofx.summary(models[name])[0].cached_steps == dittofx.summary(models["eager"])[0].cached_steps
    decided = {name: set(r.graphs) - {"compute", "cache"} for name, r in runs.items()}  # warmup: host-decided
    assert decided == {"eager": {"device"}, "recording": {"split-compute", "split-cache"}, "default mode": {"device"},
                       "never": {"device"}}, decided  # fmt: skip
    entry = models["recording"]._dittofx.current[1]
    assert entry.head_made_by is calls["recording"].dynamo_ctx and entry.head.dynamo_ctx is entry.head_made_by


def test_bad_split_option_raises_and_leaves_the_model_untouched():
    z = zoo.get("pixart")
    model = z.build()
    with pytest.raises(TypeError, match=r"split_at_decision='yes': must be None \(split under CUDA graphs\), True, False or a dict"):
        dittofx.optimize(model, {}, split_at_decision="yes")
    with pytest.raises(ValueError, match=r"split_at_decision with method='dbprune'.*allowed with 'dbcache' and 'teacache'"):
        dittofx.optimize(model, {"method": "dbprune"}, split_at_decision=True)
    with pytest.raises(ValueError, match=r"\['modee'\] are not torch.compile arguments; allowed: \[.*'mode'"):
        dittofx.optimize(model, {}, split_at_decision={"modee": "reduce-overhead"})
    with pytest.raises(ValueError, match=r"split_at_decision=\{'backend': 'bogus'\}: torch.compile refuses it \(InvalidBackend"):
        dittofx.optimize(model, {}, split_at_decision={"backend": "bogus"})
    assert "_dittofx" not in model.__dict__ and "forward" not in model.__dict__


def test_split_option_checked_for_every_pipeline_transformer_before_any_is_touched():
    from test_pipeline_wan import wan_pipeline

    pipe = wan_pipeline()
    cls = type(pipe)
    with pytest.raises(ValueError, match=r"WanPipeline.transformer_2: split_at_decision with method='dbprune'"):
        dittofx.optimize(pipe, {}, params_modifiers={"transformer_2": {"method": "dbprune"}}, split_at_decision=True)
    assert type(pipe) is cls and "_dittofx" not in pipe.transformer.__dict__ and "_dittofx" not in pipe.transformer_2.__dict__
    # an error in the second transformer's config undoes the first's optimize
    with pytest.raises(ValueError, match="no-such-table"):
        dittofx.optimize(pipe, {"method": "teacache"}, params_modifiers={"transformer_2": {"coefficients": "no-such-table"}})
    assert type(pipe) is cls and "_dittofx" not in pipe.transformer.__dict__ and "_dittofx" not in pipe.transformer_2.__dict__
    # a shared DBPrune config that every transformer replaces is fine
    dittofx.optimize(pipe, {"method": "dbprune"}, params_modifiers=[{"method": "dbcache"}, {"method": "dbcache"}], split_at_decision=True)
    assert pipe.transformer._dittofx.split == "eager"


def test_a_compiled_head_mutates_only_static_inputs():
    """With no request length every step is decided on the device, so the head is the first graph
    compiled: its state inputs must be static all the same (else CUDA graphs would skip it)."""
    z = zoo.get("pixart")
    torch._dynamo.reset()
    heads: list[dict] = []
    model = dittofx.optimize(z.build(), {"residual_diff_threshold": 0.1, "max_warmup_steps": 2},
                             split_at_decision={"backend": inspecting_backend(heads)})  # fmt: skip
    steps(model, z, 4)
    assert len(heads) == 1 and heads[0]["mutated_not_static"] == [] and not heads[0]["has_cond"], heads
    assert sorted(heads[0]["not_static"]) == ["l_encoder_hidden_states_", "l_hidden_states_", "l_timestep_"]  # the call's own


def test_a_compiled_head_with_inductor_freezing_keeps_each_branch_state():
    """With freezing, dynamo bakes static tensors into the graph unless it guards them: two CFG
    branches (two states of one shape) through one compiled head must each keep their own."""
    z = zoo.get("pixart")
    cfg = {"residual_diff_threshold": 0.1, "max_warmup_steps": 2, "num_inference_steps": 6, "enable_separate_cfg": True}
    torch._dynamo.reset()
    with torch._inductor.config.patch(freezing=True):
        reference = dittofx.optimize(z.build(), cfg)
        model = dittofx.optimize(z.build(), cfg, split_at_decision={"backend": "eager"})
        with torch.no_grad():
            for s in range(6):
                for scale in (1.0, 0.5):  # cond then uncond: different inputs, different schedules
                    kw = z.inputs(s, 1 - s / 6)
                    kw["hidden_states"] = kw["hidden_states"] * scale
                    assert torch.equal(model(**kw)[0], reference(**kw)[0])
    got = {s.branch: s.cached_steps for s in dittofx.summary(model)}
    assert got == {s.branch: s.cached_steps for s in dittofx.summary(reference)} and any(got.values()), got


def test_a_failing_head_leaves_the_model_as_it_was_and_the_host_count_in_step():
    z = zoo.get("pixart")
    cfg = {"residual_diff_threshold": 0.1, "max_warmup_steps": 0}  # no request length: every step is decided on the device

    def broken(gm, example_inputs):
        raise RuntimeError("backend down")

    model = dittofx.optimize(z.build(), cfg, split_at_decision={"backend": broken})
    with pytest.raises(Exception, match="backend down"), torch.no_grad():
        model(**z.inputs(0, 1.0))
    assert "_dittofx" not in model.__dict__ and "forward" not in model.__dict__  # the first call failed: detached
    cfg = {**cfg, "max_warmup_steps": 1, "num_inference_steps": 4}
    compiles = []

    def fails_once(gm, example_inputs):  # the head's first compile (step 1, the first decided step) fails
        compiles.append(gm)
        if len(compiles) == 1:
            raise RuntimeError("backend down once")
        return gm.forward

    model, reference = dittofx.optimize(z.build(), cfg, split_at_decision={"backend": fails_once}), dittofx.optimize(z.build(), cfg)
    with torch.no_grad():
        for s in range(4):
            if s == 1:
                with pytest.raises(Exception, match="backend down once"):
                    model(**z.inputs(s, 1 - s / 4))
            assert torch.equal(model(**z.inputs(s, 1 - s / 4))[0], reference(**z.inputs(s, 1 - s / 4))[0])
    assert len(compiles) == 2 and "_dittofx" in model.__dict__  # not the first call: still optimized
    assert dittofx.summary(model)[0].cached_steps == dittofx.summary(reference)[0].cached_steps


def test_a_pre_hook_that_drops_the_head_keyword_is_told_and_runs_uncached(caplog):
    """The keyword tells the forward that dittofx's pre-hook ran for this call: dropped by a later
    pre-hook, the call runs as the model's own forward (never a head-less tail), said once."""
    z = zoo.get("pixart")
    model = dittofx.optimize(z.build(), {"residual_diff_threshold": 0.1, "max_warmup_steps": 0}, split_at_decision=True)
    plain = z.build()
    model.register_forward_pre_hook(lambda m, args, kwargs: (args, {k: v for k, v in kwargs.items() if not k.startswith("_")}),
                                    with_kwargs=True)  # fmt: skip
    with torch.no_grad():
        for s in range(3):
            assert torch.equal(model(**z.inputs(s, 1 - s / 3))[0], plain(**z.inputs(s, 1 - s / 3))[0])
    assert caplog.text.count("not through the module's call") == 1 and "pre-hooks after dittofx.optimize that drop keywords" in caplog.text


@pytest.mark.parametrize("signal_every_step", [False, True])
@pytest.mark.parametrize("newton", [False, True])
def test_the_heads_finish_makes_a_cached_steps_updates_and_none_on_a_step_that_computes(signal_every_step, newton):
    """The split head finishes the step before the host reads its decision: on a cached step its
    `finish_step(cached_only=True)` leaves the state as the full update does; on a step that
    computes it changes nothing (TeaCache's `p` aside: it takes `h_fn` at every step, and the
    compute tail writes the same one again), so the compute tail's full update runs once."""
    from dittofx.runtime import gates
    from dittofx.runtime.state import CacheState

    gen = torch.Generator().manual_seed(0)

    def state():
        s = CacheState(torch.zeros(2, 3), [torch.zeros(2, 3)], 2, 8, None)
        with torch.no_grad():
            for t in s.tensors():  # a request under way: counters and stores nonzero
                t.copy_(torch.randint(1, 4, t.shape, generator=gen) if not t.is_floating_point() else torch.rand(t.shape, generator=gen))
            s.step.fill_(3)
        return s

    h_fn, h0, out, inp = (torch.rand(2, 3, generator=gen) for _ in range(4))
    for cache in (True, False):
        before = state()
        full, cached_only = (CacheState(torch.zeros(2, 3), [torch.zeros(2, 3)], 2, 8, None) for _ in range(2))
        for s in (full, cached_only):
            for t, b in zip(s.tensors(), before.tensors()):
                t.copy_(b)

        def finish(s, **kw):
            t = dict(s.named_buffers())
            gates.finish_step(
                torch.tensor(cache), torch.tensor(0.05), t["step"], torch.tensor(2), t["valid"], t["cached_count"],
                t["cont_count"], t["acc"], t["hist_diff"], t["hist_cached"], t["p"], h_fn, h0, [t["residual_0"]], [out],
                [inp], t["taylor_times"], torch.tensor(5.0), signal_every_step=signal_every_step, newton=newton, **kw,
            )  # fmt: skip

        finish(full)
        finish(cached_only, cached_only=True)
        want = dict((full if cache else before).named_buffers())
        for name, got in cached_only.named_buffers():
            expected = want[name]
            if name == "p" and signal_every_step:  # p[0] takes h_fn on every step
                expected = torch.cat([h_fn[None], expected[1:]])
            torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=f"{name}, cache={cache}")


class _Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = torch.nn.Linear(d, d)

    def forward(self, hidden_states, temb):
        return hidden_states + torch.tanh(self.proj(hidden_states) + temb)


def _written(model, h, temb):  # after every block read temb: harmless uncached
    return (model.out(h) + temb.mul_(3.0),)


EPILOGUES = {
    "pure": (lambda model, h, temb: (model.out(h) + temb,), True),
    "writes in place a value the middle read": (_written, False),
    "writes it through a list (foreach)": (lambda model, h, temb: (torch._foreach_mul_([temb], 3.0), model.out(h) + temb)[1:], False),
    "draws random numbers": (lambda model, h, temb: (model.out(h) + 0.01 * torch.randn_like(h),), False),
    "returns a size": (lambda model, h, temb: (model.out(h), h.shape[1]), False),
}


class _Toy(torch.nn.Module):
    def __init__(self, epilogue, n=6, d=8):
        super().__init__()
        torch.manual_seed(0)
        self.epilogue = epilogue
        self.emb = torch.nn.Linear(1, d)
        self.blocks = torch.nn.ModuleList([_Block(d) for _ in range(n)])
        self.out = torch.nn.Linear(d, d)

    def forward(self, hidden_states, timestep):
        temb = self.emb(timestep[:, None, None] / 1000)
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        return self.epilogue(self, hidden_states, temb)


@pytest.mark.parametrize("epilogue", sorted(EPILOGUES))
def test_the_head_runs_the_cache_path_only_where_what_follows_the_cond_allows_it(epilogue):
    """The head runs the cache path, Bn and epilogue before the host reads the decision; a step
    that computes runs them again in its tail. Not where that code writes in place into a value
    the middle reads (the tail's middle would read the written value), draws random numbers (a
    computed step would draw twice) or returns a size: there the head stops at the cond, and
    every form gives the cond graph's outputs and leaves the random stream where it leaves it."""
    from dittofx.passes.split import speculates

    fn, speculating = EPILOGUES[epilogue]
    cfg = {"residual_diff_threshold": 1.0, "max_warmup_steps": 1, "max_continuous_cached_steps": 1, "num_inference_steps": 8}
    runs = {}
    for name, options in (("cond", {}), ("split", {"split_at_decision": True})):
        model = dittofx.optimize(_Toy(fn), cfg, **options)
        torch.manual_seed(123)
        with torch.no_grad():
            outs = [model(hidden_states=torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(0)) + 0.02 * s,
                          timestep=torch.full((1,), 1000.0 * (1 - s / 8))) for s in range(8)]  # fmt: skip
        runs[name] = (outs, torch.rand(()), dittofx.summary(model)[0].cached_steps, model)
    (want, want_rand, want_cached, _), (got, got_rand, got_cached, split) = runs["cond"], runs["split"]
    assert want_cached == [1, 3, 5, 7] and got_cached == want_cached, (want_cached, got_cached)
    for a, b in zip(tree_leaves(got), tree_leaves(want)):
        assert (a == b) if isinstance(a, int) else torch.equal(a, b)
    assert torch.equal(got_rand, want_rand)
    assert speculates(split._dittofx.current[1].graphs["device"]) is speculating
