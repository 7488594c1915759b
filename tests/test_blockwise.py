"""Models whose forward torch.export cannot capture, cached block by block in eager Python
(`runtime/blockwise.py`). Their DBCache, TaylorSeer and mask schedules are checked against the
naive reference with the other models (test_dbcache_models.py, test_methods.py); here: what only
this path does (the warning, explain, CFG branches, new sizes, torch.compile, what it refuses)."""

import logging

import pytest
import torch

import dittofx
import zoo
from reference import NaiveConfig, NaiveDBCache
from test_bad_input import assert_untouched, snapshot
from test_dbcache_models import WeightReads

STEPS = 6
CFG = {"residual_diff_threshold": 0.6, "max_warmup_steps": 1, "num_inference_steps": STEPS}


def run(model, z, make_inputs=lambda kw: kw, steps=STEPS):
    with torch.no_grad():
        return [model(**make_inputs(z.inputs(s, 1 - s / steps)), return_dict=False)[0] for s in range(steps)]


def uncond(kwargs):
    return dict(kwargs, encoder_hidden_states=torch.zeros_like(kwargs["encoder_hidden_states"]))


def test_the_fallback_warns_with_the_blocking_line_and_explain_says_how_it_caches(caplog):
    z = zoo.get("lumina2")
    model = dittofx.optimize(z.build(), CFG)
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        run(model, z)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "dittofx"]
    assert "transformer_lumina2.py:" in warning and "block by block in eager Python instead (layers, 4 blocks)" in warning
    text = dittofx.explain(model)
    assert "path: eager, block by block" in text and "chain: layers (4 blocks)" in text
    assert "middle = 3 blocks (layers.1..layers.3)" in text
    stats = dittofx.summary(model)[0]
    assert stats.name == "layers" and stats.cached_steps and stats.computed_steps[0] == 0
    with pytest.raises(ValueError, match="block by block in eager Python.*no program to export"):
        dittofx.export(model, ((), z.inputs(0, 1.0)))


def test_cfg_branches_keep_separate_states():
    z = zoo.get("hunyuanvideo15")
    expected = {}
    for branch, make in (("cond", lambda kw: kw), ("uncond", uncond)):
        alone = dittofx.optimize(z.build(), CFG)
        expected[branch] = (run(alone, z, make), dittofx.summary(alone)[0].cached_steps)
    assert expected["cond"][1], "test needs caching"
    model = dittofx.optimize(z.build(), CFG)
    got = {"cond": [], "uncond": []}
    with torch.no_grad():
        for s in range(STEPS):
            for branch, make in (("cond", lambda kw: kw), ("uncond", uncond)):
                with model.cache_context(branch):
                    got[branch].append(model(**make(z.inputs(s, 1 - s / STEPS)), return_dict=False)[0])
    stats = {st.branch: st for st in dittofx.summary(model)}
    for branch in ("cond", "uncond"):
        assert stats[branch].cached_steps == expected[branch][1]
        assert all(torch.equal(a, b) for a, b in zip(got[branch], expected[branch][0]))


def test_new_sizes_get_a_fresh_state_and_their_first_step_computes():
    z = zoo.get("lumina2")
    original = z.build()
    model = dittofx.optimize(z.build(), dict(CFG, num_inference_steps=None))
    run(model, z, steps=3)
    assert dittofx.summary(model)[0].cached_steps == [1, 2]
    big = dict(z.inputs(3, 0.5), hidden_states=torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        outs = [model(**dict(big, timestep=torch.tensor([t])), return_dict=False)[0] for t in (0.5, 0.45)]
        want = original(**dict(big, timestep=torch.tensor([0.5])), return_dict=False)[0]
    assert outs[0].shape == (1, 4, 12, 12) and torch.equal(outs[0], want)  # computed, not the old residual
    assert dittofx.summary(model)[0].cached_steps == [1]  # the new sizes' state: step 0 computed, step 1 cached


TEACACHE = {"method": "teacache", "rel_l1_thresh": 0.05, "coefficients": [2.0, 0.5, 0.0], "num_inference_steps": STEPS}


@pytest.mark.parametrize("cfg", [CFG, TEACACHE], ids=["dbcache", "teacache"])
def test_compiled_blockwise_model_makes_the_eager_decisions(cfg):
    z = zoo.get("lumina2")
    eager = dittofx.optimize(z.build(), cfg)
    want = run(eager, z)
    model = dittofx.optimize(z.build(), cfg)
    got = run(torch.compile(model), z)
    assert dittofx.summary(eager)[0].cached_steps, "test needs caching"
    assert dittofx.summary(model)[0].cached_steps == dittofx.summary(eager)[0].cached_steps
    if cfg.get("method") == "teacache":  # explain names the torch call of block 0 the decision reads
        (index,) = [i for i, _ in eager._dittofx.blockwise.signal_calls.values()]
        text = dittofx.explain(eager)
        assert "Fn = 0 blocks, middle = 4 blocks (layers.0..layers.3), Bn = 0 blocks" in text
        assert f"TeaCache signal: layers.0's modulated input of the largest stream entering it, per input sizes: torch call {index} ('mul')" in text
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())


def test_disable_unwraps_the_blocks():
    z = zoo.get("omnigen")
    model = z.build()
    ref = run(model, z, steps=2)
    dittofx.optimize(model, CFG)
    run(model, z, steps=2)
    assert all("forward" in b.__dict__ for b in model.layers)
    dittofx.disable(model)
    assert not any("forward" in b.__dict__ for b in model.layers)
    assert all(torch.equal(a, b) for a, b in zip(run(model, z, steps=2), ref))


@pytest.mark.parametrize(
    "cfg, error, words",
    [
        ({"method": "dbprune"}, RuntimeError, "The block-by-block fallback serves method='dbcache' and 'teacache' only"),
        # the config does not fit the chain: a ValueError naming the field, as on the graph path
        ({"Fn_compute_blocks": 3, "Bn_compute_blocks": 2}, ValueError, "Fn_compute_blocks + Bn_compute_blocks = 3 + 2 = 5: must be <= the number of blocks in the chain (4"),
        # a ModuleList, so optimize takes it (a name that is none is refused there: test_bad_input), but of no blocks
        ({"blocks": ["layers.0.attn.to_out"]}, ValueError,
         "blocks=['layers.0.attn.to_out']: ['layers.0.attn.to_out'] not found as block lists of Lumina2Transformer2DModel"),
    ],
)  # fmt: skip
def test_what_the_fallback_refuses_leaves_the_model_untouched(cfg, error, words):
    z = zoo.get("lumina2")
    model = z.build()
    before = snapshot(model)
    dittofx.optimize(model, cfg)
    with pytest.raises(error) as info, torch.no_grad():
        model(**z.inputs(0, 1.0), return_dict=False)
    assert words in str(info.value)
    assert_untouched(model, before)
    assert not any("forward" in b.__dict__ for b in model.layers)


def test_a_named_block_list_is_taken():
    z = zoo.get("lumina2")
    model = dittofx.optimize(z.build(), dict(CFG, blocks=["layers"], Fn_compute_blocks=2))
    run(model, z)
    assert "Fn = 2 blocks (layers.0..layers.1)" in dittofx.explain(model)


class FeatureDiT(torch.nn.Module):
    """A forward export cannot capture (`.item()` drives Python) whose blocks hand the stream
    straight on. `collect`: the output also reads every block's output (features gathered for the
    end), which a cached step cannot give: the middle blocks pass their input through."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, hidden_states, temb):
            return hidden_states + torch.tanh(self.proj(hidden_states) + temb)

    def __init__(self, collect: bool):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([self.Block() for _ in range(4)])
        self.collect = collect

    def forward(self, hidden_states, timestep):
        temb = timestep[:, None, None] / 1000
        if timestep.max().item() > 2000:  # data-dependent Python: no graph
            temb = temb * 0
        features = []
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
            features.append(hidden_states)
        return hidden_states + 0.5 * torch.stack(features).mean(0) if self.collect else hidden_states


@pytest.mark.parametrize("collect", [False, True])
def test_a_forward_reading_middle_outputs_elsewhere_is_refused(collect):
    model = FeatureDiT(collect)
    before = snapshot(model)
    dittofx.optimize(model, CFG)
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        if not collect:  # the control: the same model without the features caches
            out = model(x, torch.tensor([900.0]))
            assert torch.equal(out, FeatureDiT(collect).forward(x, torch.tensor([900.0])))
            assert "block by block" in dittofx.explain(model)
            return
        with pytest.raises(
            RuntimeError,
            match=r"not possible either: a cached step replaying a computed one changes output 0.*reads a middle block's output outside",
        ):
            model(x, torch.tensor([900.0]))
    assert_untouched(model, before)
    assert not any("forward" in b.__dict__ for b in model.blocks)


def test_a_named_list_with_code_between_its_blocks():
    """HiDream's double blocks alone (named): between them the text stream is cut back and joined
    with the next llama layer's. The residual is taken against the skeleton (the middle as
    identities, that code kept), as the naive reference does. (By default its single blocks join,
    tested with the other models in test_dbcache_models.py.)"""
    z = zoo.get("hidream")
    naive = NaiveConfig(Fn=1, Bn=0, threshold=0.3, max_warmup_steps=2, max_continuous_cached_steps=3)
    reference = NaiveDBCache(z.build(), ("double_stream_blocks",), naive)
    expected = run(reference, z, steps=10)
    assert 0 < len(reference.cached_steps) < 8, reference.cached_steps
    cfg = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.3, "max_warmup_steps": 2,
           "max_continuous_cached_steps": 3, "num_inference_steps": 10, "blocks": ["double_stream_blocks"]}  # fmt: skip
    model = dittofx.optimize(z.build(), cfg, example_inputs=((), z.inputs(0, 1.0)))  # set up outside WeightReads
    reads = []
    outs = []
    with torch.no_grad():
        for s in range(10):
            with WeightReads(list(model.double_stream_blocks[1].parameters())) as watch:
                outs.append(model(**z.inputs(s, 1 - s / 10), return_dict=False)[0])
            reads.append(watch.hits)
    stats = dittofx.summary(model)[0]
    assert stats.name == "double_stream_blocks" and stats.cached_steps == reference.cached_steps
    assert [s for s in range(10) if reads[s] == 0] == stats.cached_steps
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    for got, want in zip(stats.diffs, reference.diffs):
        assert (got != got and want != want) or abs(got - want) <= 1e-5 * max(1.0, abs(want))


class TinyDiT(torch.nn.Module):
    """Uncapturable (`.item()` drives Python); `capturable=True` drops that line, so the same
    weights run on the graph path: the independent expectation for the step logic."""

    class Block(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.proj = torch.nn.Linear(d, d)

        def forward(self, hidden_states, temb):
            return hidden_states + torch.tanh(self.proj(hidden_states) + temb)

    def __init__(self, capturable: bool = False, n: int = 4, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([self.Block(d) for _ in range(n)])
        self.out = torch.nn.Linear(d, d)
        self.capturable = capturable

    def forward(self, hidden_states, timestep):
        temb = timestep[:, None, None] / 1000
        if not self.capturable and timestep.max().item() > 2000:
            temb = temb * 0
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        return self.out(hidden_states)


def tiny_inputs(step, steps=8, seed=0, d=8):
    x = torch.randn(1, 5, d, generator=torch.Generator().manual_seed(seed)) + 0.02 * step
    return dict(hidden_states=x, timestep=torch.full((1,), 1000.0 * (1 - step / steps)))


def tiny_request(model, cfg, steps=8):
    """One request of `steps` on `model` optimized with `cfg`: its outputs and cached steps."""
    dittofx.optimize(model, cfg)
    with torch.no_grad():
        outs = [model(**tiny_inputs(s, steps)) for s in range(steps)]
    return outs, dittofx.summary(model, log_table=False)[0].cached_steps


class BranchyBlock(TinyDiT.Block):
    """Data-dependent Python before the modulation: a different torch call sequence at equal sizes."""

    def forward(self, hidden_states, temb):
        if hidden_states.mean() > 1.0:
            hidden_states = hidden_states * 1.0
        return hidden_states + torch.tanh(self.proj(hidden_states) + temb)


def test_a_forward_export_cannot_capture_prints_no_partial_graph(capsys):
    """torch.export prints the graph it had traced when it fails (hundreds of lines for a real
    model) to stderr; dittofx says once, in its warning, why the forward cannot be captured."""
    tiny_request(TinyDiT(), {"residual_diff_threshold": 0.1}, steps=2)
    assert "def forward" not in capsys.readouterr().err


def test_teacache_refuses_a_block_0_whose_calls_before_its_modulation_change():
    """The signal is found once per input sizes, as the index of a torch call of block 0; a later
    call at those sizes whose calls before it differ is an error, not a wrong signal."""
    model = TinyDiT()
    model.blocks = torch.nn.ModuleList([BranchyBlock(8) for _ in model.blocks])
    dittofx.optimize(model, {"method": "teacache", "rel_l1_thresh": 1.0, "coefficients": [1.0, 0.0], "num_inference_steps": 8})
    with torch.no_grad():
        for s in range(3):
            model(**tiny_inputs(s))
        shifted = dict(tiny_inputs(3), hidden_states=tiny_inputs(3)["hidden_states"] + 2.0)  # takes the branch
        with pytest.raises(RuntimeError, match="block 0 runs data-dependent code before its adaptive norm"):
            model(**shifted)


def test_a_one_step_request_caches_nothing_and_is_not_refused():
    """The replay check must not start a new request between its two calls."""
    model = dittofx.optimize(TinyDiT(), {"residual_diff_threshold": 0.6, "num_inference_steps": 1})
    with torch.no_grad():
        assert torch.equal(model(**tiny_inputs(0)), TinyDiT()(**tiny_inputs(0)))
    assert "block by block" in dittofx.explain(model)


@pytest.mark.parametrize("capturable", [True, False])
def test_a_call_that_raises_does_not_shift_later_schedules(capturable):
    steps = 8
    cfg = {"residual_diff_threshold": 0.25, "max_warmup_steps": 1, "num_inference_steps": steps,
           "steps_computation_mask": [1, 1, 0, 0, 1, 0, 0, 1], "steps_computation_policy": "static"}  # fmt: skip

    def request(model, seed, fail_at=None):
        with torch.no_grad():
            for s in range(steps):
                if s == fail_at:
                    with pytest.raises(RuntimeError):
                        model(**tiny_inputs(s, steps, seed=seed, d=9))  # wrong width: fails in block 0
                model(**tiny_inputs(s, steps, seed=seed))
        return dittofx.summary(model, log_table=False)[0].cached_steps

    clean = dittofx.optimize(TinyDiT(capturable), cfg)
    request(clean, 0)
    model = dittofx.optimize(TinyDiT(capturable), cfg)
    request(model, 0, fail_at=3)
    assert request(model, 1) == request(clean, 1) == [2, 3, 5, 6]


@pytest.mark.parametrize("capturable", [True, False])
def test_an_empty_middle_explains_and_summarizes(capturable):
    model = dittofx.optimize(TinyDiT(capturable), {"Fn_compute_blocks": 4, "num_inference_steps": 4, "residual_diff_threshold": 0.3})
    with torch.no_grad():
        for s in range(4):
            model(**tiny_inputs(s, 4))
    assert "Fn = 4 blocks" in dittofx.explain(model)
    assert [s.computed_steps for s in dittofx.summary(model, log_table=False)] == [[0, 1, 2, 3]]


def test_a_size_change_mid_request_keeps_the_step_index():
    """Qwen-Image 2.1 as its pipeline runs it by default (causal_condition, use_kv_cache=True): step 0
    'extract' over text and image, steps >= 1 'cached' over the image tokens only. The static mask
    still computes steps 0, 1, 3, 5 and caches 2, 4 (SPEC §3 gate 3, §5)."""
    import copy

    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache, QwenImage21Transformer2DModel

    z = zoo.get("qwenimage21")
    n, mask = 6, [1, 1, 0, 1, 0, 1]
    torch.manual_seed(0)
    model = QwenImage21Transformer2DModel.from_config({**z.build().config, "causal_condition": True}).eval()
    plain = copy.deepcopy(model)
    dittofx.optimize(model, {"residual_diff_threshold": 100.0, "max_warmup_steps": 0, "num_inference_steps": n,
                             "steps_computation_mask": mask, "steps_computation_policy": "static"})  # fmt: skip
    caches = [QwenImage21KVCache(len(model.transformer_blocks)) for _ in range(2)]
    with torch.no_grad():
        for s in range(n):
            mode = "extract" if s == 0 else "cached"
            kw = z.inputs(s, 1 - s / n)
            got = model(**kw, kv_cache=caches[0], kv_cache_mode=mode, return_dict=False)[0]
            want = plain(**kw, kv_cache=caches[1], kv_cache_mode=mode, return_dict=False)[0]
            assert torch.equal(got, want) == bool(mask[s]), f"step {s}"
    assert dittofx.summary(model)[0].cached_steps == [2, 4]


class GlueDiT(TinyDiT):
    """Code between every pair of blocks, changing the stream in place or making a new tensor:
    the two must cache alike (same decisions, same outputs)."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place

    def forward(self, hidden_states, timestep):
        temb = timestep[:, None, None] / 1000
        if timestep.max().item() > 2000:
            temb = temb * 0
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
            hidden_states = hidden_states.mul_(0.9) if self.in_place else hidden_states * 0.9
        return self.out(hidden_states)


def test_code_between_blocks_that_changes_streams_in_place_caches_like_new_tensors():
    cfg = {"residual_diff_threshold": 0.15, "max_warmup_steps": 1, "num_inference_steps": 8, "Fn_compute_blocks": 1, "Bn_compute_blocks": 1}
    want, want_cached = tiny_request(GlueDiT(in_place=False), cfg)
    got, got_cached = tiny_request(GlueDiT(in_place=True), cfg)
    assert 0 < len(want_cached) < 7 and got_cached == want_cached
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_hidream_refuses_an_fn_whose_last_block_joins_the_streams():
    """Its single blocks return the image and text streams joined: no residual against the image
    stream entering the chain can be measured there."""
    z = zoo.get("hidream")
    model = z.build()
    before = snapshot(model)
    dittofx.optimize(model, {"Fn_compute_blocks": 3})
    with pytest.raises(ValueError, match=r"Fn_compute_blocks=3: single_stream_blocks.0 returns no 'encoder_hidden_states' stream .* allowed here: Fn_compute_blocks <= 2"):
        with torch.no_grad():
            model(**z.inputs(0, 1.0), return_dict=False)
    assert_untouched(model, before)


def test_the_measured_stream_is_picked_per_call():
    """HiDream at the zoo's image size has more text tokens than image tokens, at 16x16 fewer: a
    request at the small size first must not fix which stream the diff measures (SPEC: the hidden
    stream, the largest)."""
    z = zoo.get("hidream")

    def big(s):
        return dict(z.inputs(s, 1 - s / 6), hidden_states=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) + 0.05 * s)

    cfg = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.34, "num_inference_steps": 6, "max_warmup_steps": 1}
    model = dittofx.optimize(z.build(), cfg)
    reference = NaiveDBCache(z.build(), z.block_lists, NaiveConfig(Fn=1, Bn=0, threshold=0.34, max_warmup_steps=1))
    with torch.no_grad():
        for s in range(6):
            model(**z.inputs(s, 1 - s / 6), return_dict=False)
        for s in range(6):
            model(**big(s), return_dict=False)
            reference(**big(s), return_dict=False)
    assert reference.cached_steps and dittofx.summary(model, log_table=False)[0].cached_steps == reference.cached_steps


def test_hidream_with_as_many_text_as_image_tokens_caches_as_the_reference():
    """2 T5 + 2 x 7 llama tokens = 16 text tokens, as many as image tokens: both double-block outputs
    have the shape of both inputs, the image stream passes on as is, the text is cut and joined
    again (no identity). Which output is which follows from the image's identity; the reference is
    told the streams (HiDream's source: double blocks return (image, text), single blocks the joined
    stream)."""
    z = zoo.get("hidream")

    def inputs(s):
        return dict(z.inputs(s, 1 - s / 6), encoder_hidden_states_t5=torch.randn(1, 2, 8, generator=torch.Generator().manual_seed(5)))

    streams = [["hidden_states", "encoder_hidden_states"]] * 2 + [["hidden_states"]] * 2
    naive = NaiveConfig(Fn=1, Bn=0, threshold=0.34, max_warmup_steps=1)
    reference = NaiveDBCache(z.build(), z.block_lists, naive, formats=streams)
    cfg = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.34, "num_inference_steps": 6, "max_warmup_steps": 1}
    model = dittofx.optimize(z.build(), cfg)
    with torch.no_grad():
        got = [model(**inputs(s), return_dict=False)[0] for s in range(6)]
        want = [reference(**inputs(s), return_dict=False)[0] for s in range(6)]
    assert model._dittofx.blockwise.chain.streams == [tuple(f) for f in streams]
    assert reference.cached_steps and dittofx.summary(model, log_table=False)[0].cached_steps == reference.cached_steps
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


class TwoLists(TinyDiT):
    """Two lists whose blocks name the stream differently (`x`, then `hidden_states`), handed on
    unchanged: a middle spanning both takes its residual base by position, not by name."""

    class First(TinyDiT.Block):
        def forward(self, x, temb):
            return x + torch.tanh(self.proj(x) + temb)

    def __init__(self, capturable: bool):
        super().__init__(capturable, n=3)
        self.pre = torch.nn.ModuleList([self.First(8) for _ in range(2)])

    def forward(self, hidden_states, timestep):
        temb = timestep[:, None, None] / 1000
        if not self.capturable and timestep.max().item() > 2000:
            temb = temb * 0
        for block in [*self.pre, *self.blocks]:
            hidden_states = block(hidden_states, temb)
        return self.out(hidden_states)


def test_a_middle_spanning_lists_that_name_the_stream_differently_caches_as_the_graph_path():
    cfg = {"residual_diff_threshold": 0.3, "num_inference_steps": 8, "max_warmup_steps": 1}
    want, want_cached = tiny_request(TwoLists(capturable=True), cfg)
    got, got_cached = tiny_request(model := TwoLists(capturable=False), cfg)
    assert "chain: pre -> blocks (5 blocks)" in dittofx.explain(model)
    assert want_cached and got_cached == want_cached
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


class IndexAfterChain(TinyDiT):
    """After the chain a tensor index taken from its output picks from a fresh input `y`, which a
    list of its own then refines: that list does not continue the chain (an index reads `y`, it does
    not write it)."""

    def __init__(self):
        super().__init__(n=4, d=16)
        self.refiner = torch.nn.ModuleList([torch.nn.Linear(16, 16, bias=False) for _ in range(2)])

    def forward(self, hidden_states, y, timestep):
        temb = timestep[:, None, None] / 1000
        if timestep.max().item() > 2000:
            temb = temb * 0
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        gain = y[:, (hidden_states.mean() > 0).long()]
        for refine in self.refiner:
            y = refine(y)
        return self.out(hidden_states) + 0.1 * y.mean() + 0.01 * gain.mean()


def test_an_index_read_after_the_chain_joins_no_list():
    model = dittofx.optimize(IndexAfterChain(), {"residual_diff_threshold": 0.3, "num_inference_steps": 8, "max_warmup_steps": 1})
    y = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for s in range(8):
            model(**tiny_inputs(s, d=16), y=y)
    assert "chain: blocks (4 blocks)" in dittofx.explain(model) and dittofx.summary(model)[0].cached_steps


def test_layerwise_casting_caches_block_by_block_as_the_reference(caplog):
    """diffusers' layerwise casting (fp8 storage, fp32 compute) casts each layer's weights in place
    from a hook (`module.to`), which export cannot trace: the forward caches block by block, said
    once with the hook's line, and caches the reference's steps with its outputs."""
    z = zoo.get("flux")

    def build():
        model = z.build()
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        return model

    naive = NaiveConfig(Fn=1, Bn=0, threshold=0.3, max_warmup_steps=1)
    reference = NaiveDBCache(build(), z.block_lists, naive)
    cfg = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.3, "num_inference_steps": STEPS, "max_warmup_steps": 1}
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        model = dittofx.optimize(build(), cfg)
        got, want = run(model, z), run(reference, z)
    assert model._dittofx.blockwise is not None and "layerwise_casting.py" in caplog.text
    assert reference.cached_steps and dittofx.summary(model, log_table=False)[0].cached_steps == reference.cached_steps
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_a_graph_whose_cache_state_sizes_depend_on_the_data_caches_block_by_block(caplog):
    """Framepack's streams have data-dependent lengths. With Bn=0 its middle's output pairs with no
    carried input; with Bn=2 it pairs, but the state it would store has a data-dependent size, which
    no state made before the call can hold: that too caches block by block (it raised a sympy
    TypeError on the first call, and optimize was undone), with the reference's steps and outputs."""
    z = zoo.get("hunyuanvideo_framepack")
    naive = NaiveConfig(Fn=1, Bn=2, threshold=0.6, max_warmup_steps=1)
    reference = NaiveDBCache(z.build(), z.block_lists, naive)
    cfg = {**CFG, "Fn_compute_blocks": 1, "Bn_compute_blocks": 2}
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        model = dittofx.optimize(z.build(), cfg)
        got, want = run(model, z), run(reference, z)
    assert model._dittofx.blockwise is not None and "depends on the data" in caplog.text, caplog.text
    assert reference.cached_steps and dittofx.summary(model, log_table=False)[0].cached_steps == reference.cached_steps
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
