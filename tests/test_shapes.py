"""Requests of different batch sizes and resolutions: correct outputs and no stale state."""

import logging

import pytest
import torch

import dittofx
import zoo
from reference import NaiveConfig, NaiveDBCache

STEPS = 4
CFG = {"residual_diff_threshold": 0.2, "max_warmup_steps": 1, "num_inference_steps": STEPS}


def request(batch: int, side: int, seed: int, steps: int = STEPS, rising: bool = False):
    g = torch.Generator().manual_seed(seed)
    base, drift = torch.randn(batch, 4, side, side, generator=g), torch.randn(batch, 4, side, side, generator=g)
    text = torch.randn(batch, 7, 32, generator=g)
    return [
        dict(hidden_states=base + 0.02 * s * drift, encoder_hidden_states=text,
             timestep=torch.full((batch,), 1000.0 * (s / steps if rising else 1 - s / steps)), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        for s in range(steps)
    ]  # fmt: skip


def run(model, steps):
    with torch.no_grad():
        outs = [model(**kw)[0] for kw in steps]
    return outs, dittofx.summary(model, log_table=False)[0].cached_steps


def test_batch_and_resolution_changes_between_requests(caplog):
    z = zoo.get("pixart")
    model = dittofx.optimize(z.build(), CFG)
    sequence = [(1, 8), (3, 8), (1, 8), (1, 16), (1, 8)]
    cached_any = False
    for i, (batch, side) in enumerate(sequence):
        steps = request(batch, side, seed=i)
        with caplog.at_level(logging.WARNING, logger="dittofx"):
            got, got_cached = run(model, steps)
        fresh, fresh_cached = run(dittofx.optimize(z.build(), CFG), steps)  # never saw another request
        assert got_cached == fresh_cached
        cached_any |= bool(got_cached)
        for a, b in zip(got, fresh):
            assert a.shape == (batch, 8, side, side)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert cached_any
    # batch 1 was specialized by export, so batch 3 is captured again; 16x16 too, but for another
    # reason: PixArt's PatchEmbed keeps a table for its first size and compares sizes in Python,
    # which export traced without a guard; the first call at 16x16 checks the symbolic graph against
    # the original forward, sees it is wrong there, and captures again, symbolically: that graph
    # computes the table for any size (tests/test_recompiles.py: it serves three more resolutions)
    assert len(model._dittofx.entries) == 3
    assert model._dittofx.entries[2].captured.dynamic_dims
    assert "changed sizes" not in caplog.text  # whole requests: nothing restarts mid-request


def test_sizes_alternating_within_requests_warn_once_that_nothing_caches(caplog):
    """Calls of two sizes on one branch within a request (e.g. a second call per step at another
    batch size): each call is a step whose stored residuals the next call's sizes drop, so nothing
    caches: said once."""
    z = zoo.get("pixart")
    model = dittofx.optimize(z.build(), dict(CFG, num_inference_steps=2 * STEPS))
    small, large = request(1, 8, seed=0), request(2, 8, seed=1)
    with caplog.at_level(logging.WARNING, logger="dittofx"), torch.no_grad():
        for s in range(STEPS):
            model(**small[s])
            model(**large[s])
    assert caplog.text.count("changed sizes (or dtype) at step 1 of a request of 8 on branch 'default'") == 1
    (stats,) = dittofx.summary(model, log_table=False)
    assert stats.cached_steps == []


@pytest.mark.parametrize("rising", [False, True], ids=["timesteps falling", "timesteps rising (Z-Image, Lumina2)"])
def test_sizes_changing_within_a_request_keep_its_step_count(rising, caplog):
    """A request whose batch changes at a step (CFG on for some steps only, diffusers' CFG cutoff
    callbacks): what was stored goes, the request's count goes on (SPEC §3: its state resets after
    its length), so the next request starts fresh. Expected by hand, at a threshold every diff is
    under, batches 1, 1, 2, 2, 1, 1: step 0 computes (warmup), 1 caches, 2 computes (new sizes:
    nothing stored), 3 caches, 4 computes (new sizes again), 5 caches; computed steps equal the
    uncached model; two equal requests give equal outputs. With the length known the count alone
    ends a request: a timestep that rises within one (as Z-Image's) starts none."""
    z = zoo.get("pixart")
    plain = z.build()
    model = dittofx.optimize(z.build(), dict(CFG, residual_diff_threshold=1e9, num_inference_steps=6))
    one, two = request(1, 8, seed=0, steps=6, rising=rising), request(2, 8, seed=0, steps=6, rising=rising)
    steps = [one[0], one[1], two[2], two[3], one[4], one[5]]
    outs = []
    for _request in range(2):
        with caplog.at_level(logging.WARNING, logger="dittofx"):
            got, cached = run(model, steps)
        assert cached == [1, 3, 5]
        with torch.no_grad():
            for s in (0, 2, 4):
                assert torch.equal(got[s], plain(**steps[s])[0])
        outs.append(got)
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert caplog.text.count("changed sizes (or dtype) at step 2 of a request of 6") == 1


def test_a_new_request_at_new_sizes_before_the_last_ended_starts_fresh():
    """Request length unknown: its timestep rose (SPEC §3's new-request rule, read on the host
    where the sizes change): an interrupted request, then one at another resolution, runs as on a
    model that never saw the first."""
    z = zoo.get("pixart")
    cfg = dict(CFG, num_inference_steps=None)
    model = dittofx.optimize(z.build(), cfg)
    run(model, request(1, 8, seed=0)[:2])
    steps = request(1, 16, seed=1)
    got, cached = run(model, steps)
    fresh, fresh_cached = run(dittofx.optimize(z.build(), cfg), steps)
    assert cached == fresh_cached and cached
    assert all(torch.equal(a, b) for a, b in zip(got, fresh))


def test_graphs_wrong_at_new_sizes_get_one_symbolic_recapture_then_static_ones(monkeypatch):
    """The capture policy on its own: every symbolic graph is declared wrong at sizes it was not
    captured at (a model whose size-dependent Python export misses at every size)."""
    z = zoo.get("pixart")
    model = dittofx.optimize(z.build(), CFG)
    engine = model._dittofx
    checked = []

    def wrong_elsewhere(entry, args, kwargs):
        checked.append(entries.index(entry))
        return False

    entries = engine.entries
    monkeypatch.setattr(engine, "_still_valid", wrong_elsewhere)
    for side in (8, 16, 12, 12, 8):
        got, _ = run(model, request(1, side, seed=side))
        want, _ = run(dittofx.optimize(z.build(), CFG), request(1, side, seed=side))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [bool(e.captured.dynamic_dims) for e in entries] == [True, True, False]  # 8, 16 symbolic; 12 static
    assert [e.recaptured for e in entries] == [False, True, True]
    assert checked == [0, 0, 1]  # at 16: the first graph; at 12: both symbolic ones; the sizes seen are not checked again


class _FramesBranch(torch.nn.Module):
    """A temporal term only when `num_frames > 1`, weighted by the step: small at the first step."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.inp, self.extra, self.out = torch.nn.Linear(d, d), torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x, timestep, num_frames: int):
        h = self.inp(x)
        if num_frames > 1:
            h = h + (1 - timestep / 1000) * self.extra(h)
        for block in self.blocks:
            h = h + 0.1 * torch.tanh(block(h))
        return (self.out(h),)


def test_an_int_input_outside_the_range_its_graph_was_traced_for_gets_a_graph_of_its_own():
    """export records `if num_frames > 1` as a range of the int's symbol (not an assert in the
    graph): the graph captured at num_frames=1 is not offered num_frames=2 (the check against the
    model's own forward, at the first step where the term is 0, let it serve the whole request)."""
    torch.manual_seed(0)
    plain = _FramesBranch()
    model = dittofx.optimize(_FramesBranch(), {"residual_diff_threshold": 0.0, "max_warmup_steps": 0, "num_inference_steps": 4})
    model.load_state_dict(plain.state_dict())
    x = torch.randn(1, 6, 8)
    with torch.no_grad():
        for frames in (1, 2, 1):
            for t in (1000.0, 750.0, 500.0, 250.0):
                assert torch.equal(model(x, torch.tensor([t]), frames)[0], plain(x, torch.tensor([t]), frames)[0]), (frames, t)
    assert len(model._dittofx.entries) == 2


def test_an_int_export_specialized_keys_its_graph_by_value(caplog):
    """LTX's first call for one image (num_frames=1): export specializes the 1 (its placeholder is a
    SymInt equal to 1), so that graph serves 1 frame only; a video after it gets a graph of its own
    (the first graph sized its cache state for one frame's tokens and crashed on every longer call),
    which keeps num_frames symbolic: no capture per value to warn about."""
    z = zoo.get("ltx")
    model = dittofx.optimize(z.build(), {"residual_diff_threshold": 0.0, "max_warmup_steps": 0, "num_inference_steps": 2})
    plain = z.build()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="dittofx"):
        for frames in (1, 2, 3, 1):
            for s in range(2):
                kwargs = dict(z.inputs(s, 1 - s / 2), num_frames=frames)
                kwargs["hidden_states"] = kwargs["hidden_states"].repeat(1, frames, 1)
                assert torch.equal(model(**kwargs)[0], plain(**kwargs)[0]), (frames, s)
    assert [e.captured.dynamic_dims.get(4) for e in model._dittofx.entries] == [None, ()]  # num_frames: 1, then symbolic
    assert "Python-number input" not in caplog.text


def test_a_capture_export_kept_no_size_symbolic_in_says_why(caplog):
    """Cosmos takes `np.sqrt` of a ratio of sizes: a symbolic size makes it a SymFloat numpy cannot
    take, so its capture is static: said once, with export's reason (FLUX's stays symbolic: no word)."""
    for name, static in (("cosmos", True), ("flux", False)):
        z = zoo.get(name)
        model = dittofx.optimize(z.build(), {"residual_diff_threshold": 0.0, "max_warmup_steps": 0, "num_inference_steps": 2})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dittofx"), torch.no_grad():
            for s in range(2):
                model(**z.inputs(s, 1 - s / 2), return_dict=False)
        said = [r.getMessage() for r in caplog.records if "captured with every size fixed" in r.getMessage()]
        assert len(said) == static, (name, said)
        assert not static or "sqrt" in said[0]
        assert (model._dittofx.entries[0].captured.dynamic_dims == {}) == static


def test_the_measured_stream_is_the_largest_at_each_size():
    """The graph measures the largest carried stream of the last Fn block, as the reference (and the
    block-by-block path) picks it per call. FLUX captured with more text (40) than image (16)
    tokens measured the text stream at every later size of that symbolic graph (helper-52): a
    request with 7 text tokens must measure the image stream and cache as the reference does."""
    z = zoo.get("flux")

    def inputs(s, text_tokens):
        g = torch.Generator().manual_seed(5)
        return dict(z.inputs(s, 1 - s / 6), encoder_hidden_states=torch.randn(1, text_tokens, 32, generator=g), txt_ids=torch.zeros(text_tokens, 3))

    probe = NaiveDBCache(z.build(), z.block_lists, NaiveConfig(Fn=1, Bn=0, threshold=0.0, max_warmup_steps=1))
    with torch.no_grad():
        for s in range(6):
            probe(**inputs(s, 7), return_dict=False)
    measured = sorted(d for d in probe.diffs if d == d)
    threshold = measured[len(measured) // 2] * 1.05
    cfg = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": threshold, "num_inference_steps": 6, "max_warmup_steps": 1}
    model = dittofx.optimize(z.build(), cfg)
    reference = NaiveDBCache(z.build(), z.block_lists, NaiveConfig(Fn=1, Bn=0, threshold=threshold, max_warmup_steps=1))
    with torch.no_grad():
        for s in range(6):
            model(**inputs(s, 40), return_dict=False)
        got = [model(**inputs(s, 7), return_dict=False)[0] for s in range(6)]
        want = [reference(**inputs(s, 7), return_dict=False)[0] for s in range(6)]
    stats = dittofx.summary(model, log_table=False)[0]
    assert 0 < len(reference.cached_steps) < 5 and stats.cached_steps == reference.cached_steps, (stats.cached_steps, reference.cached_steps)
    assert stats.diffs[1:] == pytest.approx(reference.diffs[1:], rel=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_a_graph_whose_stream_is_no_longer_the_largest_serves_where_no_other_can_be_made(caplog):
    """HunyuanImage with more text (40) than image (16) tokens after a request with fewer: no capture
    at those sizes pairs the middle (the text stream as the carried hidden), so the graph that
    measures the image stream goes on serving them, said once, rather than the model running
    uncached (helper-54)."""
    z = zoo.get("hunyuanimage")

    def more_text(kw, n=40):
        out = dict(kw)
        for k, v in kw.items():
            dims = [i for i, d in enumerate(v.shape) if d == zoo.TXT_TOKENS] if isinstance(v, torch.Tensor) and ("encoder" in k or "text" in k) else []
            if dims:
                out[k] = v.repeat_interleave(-(-n // zoo.TXT_TOKENS), dim=dims[0]).narrow(dims[0], 0, n).clone()
        return out

    cfg = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.5, "num_inference_steps": 6, "max_warmup_steps": 1}
    model, plain = dittofx.optimize(z.build(), cfg), z.build()
    with caplog.at_level(logging.WARNING, logger="dittofx"), torch.no_grad():
        for s in range(6):
            model(**z.inputs(s, 1 - s / 6))
        got = model(**more_text(z.inputs(0, 1.0)))[0]  # step 0 of a request computes: the plain model's output
        want = plain(**more_text(z.inputs(0, 1.0)))[0]
        for s in range(1, 6):
            model(**more_text(z.inputs(s, 1 - s / 6)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert "no graph measuring that one could be made" in caplog.text and "uncached" not in caplog.text
    assert dittofx.summary(model, log_table=False)[0].cached_steps  # the second request caches
