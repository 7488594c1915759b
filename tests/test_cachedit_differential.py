"""Differential test: dittofx DBCache against cache-dit's own DBCache (two independent implementations),
with TaylorSeer and steps computation masks.

Two fresh instances of the same tiny zoo model get the same DBCache config, one through
`cache_dit.enable_cache(BlockAdapter(...))`, one through `dittofx.optimize(...)`. Both run the same
denoising calls; the cached-step lists (per CFG branch), the measured relative-L1 diffs and the
outputs must agree.

Where SPEC §3 and cache-dit 1.5.3 meet (paths under .venv/lib/python3.11/site-packages/cache_dit/caching/):

* warmup: cache-dit's `CachedContext.warmup_steps` is `range(0, max_warmup_steps, warmup_interval)`
  (cache_contexts/cache_context.py), i.e. `s < max_warmup_steps and s % interval == 0`, as SPEC
  (the doc string's "less than or equal" is wrong, the code is what counts).
* diff: `similarity()` (cache_contexts/cache_manager.py) is `mean|p - r| / mean|p|` with `p` the Fn
  residual stored by `set_Fn_buffer` on compute steps only (pattern_base.py `forward`), i.e. the
  drift semantics of SPEC; mean/mean == sum/sum for equal element counts.
* `max_cached_steps` / `max_continuous_cached_steps`: `len(cached) >= max` / `run >= max` -> compute,
  with the run reset in `mark_step_begin` when the previous step was not cached; SPEC gates 4/5.
* TaylorSeer (`calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=k)`): the same Taylor
  update on compute steps and forecast on cached steps, of the middle's output (SPEC §4), once
  cache-dit's `TaylorSeerState.derivative` forms D(i+1) wherever D(i)_old exists, as SPEC §4 says:
  cache-dit 1.5.3 forms one only when its state's `current_step > 1` (calibrators/taylorseer.py), and
  a state made lazily at step 0 counts one step behind, so its first forecasts extrapolate with D0
  alone. That one condition is patched out on the cache-dit side (`_taylorseer_as_spec`).
* steps computation mask (`steps_computation_mask`, policy "dynamic" / "static"): SPEC gate 3.
* CFG, `enable_separate_cfg=True`, `cfg_compute_first=False`: even transformer calls are the non-CFG
  branch, odd calls the CFG branch, each with its own counters/buffers (`is_separate_cfg_step`);
  dittofx: call parity, branches "cond" / "uncond".

Deliberate differences, kept out of the configs below:

* `max_accumulated_residual_diff_threshold`: cache-dit's `add_residual_diff` adds every measured diff
  (compute steps too) to a sum that is never reset, and `can_cache` compares that sum *before* the
  current diff with `>=`; SPEC gate 6 sums the cached steps' diffs since the last compute plus the
  current diff, with `>`. Not comparable; not set here.
* steps mask and warmup: cache-dit shortens the warmup to the mask's leading 1s (`warmup_steps` is
  `min(max_warmup_steps, leading ones)`, cache_context.py), so a mask 0 inside `max_warmup_steps`
  may cache there; SPEC gate 1 computes every warmup step. The masks here start with as many 1s as
  `max_warmup_steps`.
* `residual_diff_threshold >= 1.0`: cache-dit's `similarity()` caches unconditionally without
  measuring (`if threshold >= 1.0: ... return True`); SPEC compares the diff. Thresholds here are < 1.
* `cfg_diff_compute_separate=False` with `cfg_compute_first=True`: cache-dit reuses a diff only on
  its CFG branch and only once the other branch recorded one for the step (`similarity`,
  cache_manager.py), so with the CFG branch first nothing is reused and each branch decides alone;
  SPEC §3 (and dittofx) has the second branch take the first's decision. Compared with
  `cfg_compute_first=False` only, where the two agree (tested against an independent expectation
  in test_cfg_and_api for both orders).
* batch > 1 (CFG batched in one call): cache-dit takes one mean over the batch; SPEC §3 a diff per
  sample, a step caching only if every sample passes. The calls here have batch 1.
* cache-dit's transformer-only enable defaults `enable_separate_cfg` from its adapter registry (True for
  Wan/Qwen-Image) and then splits calls by parity; dittofx defaults to one shared state when no
  `cache_context` name is set. Both sides are given `enable_separate_cfg` explicitly.
* New request: with a persistent (transformer-only) context cache-dit refreshes one call late:
  `CachedContextManager.maybe_refresh` tests `current_step >= num_inference_steps` in `set_context`,
  *before* `mark_step_begin` advances the step (pattern_base.py / pattern_3_4_5.py `forward`), so the
  first call of request 2 runs as step `num_inference_steps` of request 1 (its stale buffers, not in
  warmup, may even be cached) and request 2's step 0 is its second call. SPEC resets right after
  `num_inference_steps` steps. The cache-dit side therefore calls its documented
  `cache_dit.refresh_context(transformer, num_inference_steps=...)` between requests; dittofx relies
  on its automatic reset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cache_dit  # a declared test dependency (pinned 1.5.3): no importorskip, a missing one fails
import pytest
import torch
from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig
from cache_dit.caching.cache_contexts.calibrators.taylorseer import TaylorSeerState
from torch.utils._pytree import tree_leaves

import dittofx
import zoo

STEPS = 10


@dataclass
class Case:
    name: str  # zoo model
    pattern: ForwardPattern  # cache-dit's block I/O pattern for the model (its adapter registry)
    config: dict  # DBCache fields given to both, threshold added from the model's own diffs
    requests: int = 1
    cfg: bool = False  # two calls per step (cond, uncond) with enable_separate_cfg=True
    taylorseer_order: int = 0  # 0: no TaylorSeer


CASES = [
    # Wan (Pattern_2: hidden only out), CFG: separate branches whose decisions part (see _threshold).
    Case("wan", ForwardPattern.Pattern_2,
         dict(Fn_compute_blocks=1, Bn_compute_blocks=1, max_warmup_steps=2, max_continuous_cached_steps=2),
         cfg=True),
    # PixArt (Pattern_3: hidden in, hidden out), warmup interval and max_cached_steps, two requests.
    Case("pixart", ForwardPattern.Pattern_3,
         dict(Fn_compute_blocks=1, Bn_compute_blocks=1, max_warmup_steps=4, warmup_interval=2,
              max_cached_steps=4),
         requests=2),
    # CogVideoX (Pattern_0: dual stream, the middle updates the text stream too), Fn=2.
    Case("cogvideox", ForwardPattern.Pattern_0,
         dict(Fn_compute_blocks=2, Bn_compute_blocks=1, max_warmup_steps=1, max_continuous_cached_steps=3)),
    # Sana (Pattern_3), Bn=0: the middle runs to the end of the chain.
    Case("sana", ForwardPattern.Pattern_3,
         dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2, max_continuous_cached_steps=2)),
    # TaylorSeer order 2 over two requests (its history starts again), max_cached_steps.
    Case("pixart", ForwardPattern.Pattern_3,
         dict(Fn_compute_blocks=1, Bn_compute_blocks=1, max_warmup_steps=2, max_cached_steps=5),
         requests=2, taylorseer_order=2),
    # TaylorSeer on a dual stream (the text stream is forecast too), Fn=2.
    Case("cogvideox", ForwardPattern.Pattern_0,
         dict(Fn_compute_blocks=2, Bn_compute_blocks=1, max_warmup_steps=2), taylorseer_order=1),
    # CFG sharing the decision (cfg_diff_compute_separate=False): the uncond call of a step takes
    # the cond call's (cond first, so cache-dit has the diff to reuse; helper-55).
    Case("wan", ForwardPattern.Pattern_2,
         dict(Fn_compute_blocks=1, Bn_compute_blocks=1, max_warmup_steps=2, max_continuous_cached_steps=2,
              cfg_diff_compute_separate=False),
         cfg=True),
    # TaylorSeer with separate CFG branches (a history each).
    Case("wan", ForwardPattern.Pattern_2,
         dict(Fn_compute_blocks=1, Bn_compute_blocks=1, max_warmup_steps=2, max_continuous_cached_steps=2),
         cfg=True, taylorseer_order=2),
    # a dynamic mask (its 1s compute, its 0s go to the diff), and a static one with TaylorSeer.
    Case("pixart", ForwardPattern.Pattern_3,
         dict(Fn_compute_blocks=1, Bn_compute_blocks=1, max_warmup_steps=2,
              steps_computation_mask=[1, 1, 0, 0, 1, 0, 0, 1, 0, 1])),
    Case("pixart", ForwardPattern.Pattern_3,
         dict(Fn_compute_blocks=1, Bn_compute_blocks=1, max_warmup_steps=2,
              steps_computation_mask=[1, 1, 0, 0, 1, 0, 0, 1, 0, 1], steps_computation_policy="static"),
         taylorseer_order=2),
]  # fmt: skip


def _case_id(case: Case) -> str:
    extras = [f"taylor{case.taylorseer_order}"] * bool(case.taylorseer_order)
    extras += [f"mask-{case.config.get('steps_computation_policy', 'dynamic')}"] * ("steps_computation_mask" in case.config)
    return "-".join([case.name, *extras])


@pytest.fixture(autouse=True)
def _taylorseer_as_spec(monkeypatch):
    """cache-dit's TaylorSeer with SPEC §4's derivative rule (see the module doc string): D(i+1)
    wherever D(i)_old exists; its code otherwise (a shape change resets, the window is the number
    of steps since the last compute)."""

    def derivative(self, Y):
        dY = [Y] + [None] * (self.order - 1)
        window = self.current_step - self.last_non_approximated_step
        if self.state["dY_prev"][0] is not None and Y.shape != self.state["dY_prev"][0].shape:
            self.reset()
        for i in range(self.n_derivatives):
            if self.state["dY_prev"][i] is None:
                break
            dY[i + 1] = (dY[i] - self.state["dY_prev"][i]) / window
        return dY

    monkeypatch.setattr(TaylorSeerState, "derivative", derivative)


def _calls(z, case: Case):
    """The transformer calls of all requests: (request, step, branch, kwargs)."""
    for request in range(case.requests):
        for s in range(STEPS):
            kw = z.inputs(s, 1 - s / STEPS)
            yield request, s, "cond", kw
            if case.cfg:
                # a different "negative prompt": the uncond branch's diffs and decisions differ
                un = dict(kw)
                un["encoder_hidden_states"] = torch.roll(kw["encoder_hidden_states"], 1, dims=-1) * 2.0
                yield request, s, "uncond", un


def _context(model):
    (name,) = model._context_names  # one block list -> one cache-dit context
    return model._context_manager.get_context(name)


def _cachedit_stats(model, cfg: bool) -> dict:
    """branch -> (cached steps, {step: diff}) of cache-dit's current context."""
    ctx = _context(model)
    stats = {"cond": (ctx.get_cached_steps(), {int(k): v for k, v in ctx.get_residual_diffs().items()})}
    if cfg:
        stats["uncond"] = (ctx.get_cfg_cached_steps(), {int(k): v for k, v in ctx.get_cfg_residual_diffs().items()})
    return stats


def _dittofx_stats(model, cfg: bool) -> dict:
    by_branch = {}
    for st in dittofx.summary(model):
        branch = st.branch if cfg else "cond"
        by_branch[branch] = (list(st.cached_steps), list(st.diffs))
    return by_branch


def _run_cachedit(z, case: Case, threshold: float):
    model = z.build()
    config = DBCacheConfig(
        residual_diff_threshold=threshold, num_inference_steps=STEPS, enable_separate_cfg=case.cfg, **case.config
    )
    adapter = BlockAdapter(
        transformer=model,
        blocks=model.get_submodule(z.block_lists[0]),
        forward_pattern=case.pattern,
        check_forward_pattern=False,
    )
    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=case.taylorseer_order) if case.taylorseer_order else None
    cache_dit.enable_cache(adapter, cache_config=config, calibrator_config=calibrator)
    outputs, stats = [], []
    with torch.no_grad():
        for request, step, branch, kw in _calls(z, case):
            if request > 0 and step == 0 and branch == "cond":
                stats.append(_cachedit_stats(model, case.cfg))
                # see the module doc string: cache-dit's automatic refresh is one call late
                cache_dit.refresh_context(model, num_inference_steps=STEPS)
            outputs.append(tree_leaves(model(**kw))[0])
    stats.append(_cachedit_stats(model, case.cfg))
    return outputs, stats


def _run_dittofx(z, case: Case, threshold: float):
    model = z.build()
    config = dict(case.config, residual_diff_threshold=threshold, num_inference_steps=STEPS)
    if case.cfg:
        config["enable_separate_cfg"] = True
    if case.taylorseer_order:
        config.update(enable_taylorseer=True, taylorseer_order=case.taylorseer_order)
    dittofx.optimize(model, config)
    outputs, stats = [], []
    with torch.no_grad():
        for request, step, branch, kw in _calls(z, case):
            if request > 0 and step == 0 and branch == "cond":
                stats.append(_dittofx_stats(model, case.cfg))  # no refresh: dittofx resets by itself
            outputs.append(tree_leaves(model(**kw))[0])
    stats.append(_dittofx_stats(model, case.cfg))
    return outputs, stats


def _threshold(z, case: Case) -> float:
    """A threshold from the model's own diffs (cache-dit, one request, every step after warmup eligible)
    so that some steps cache and some compute: between the two diffs around the median; with CFG,
    between the two branches' diffs at the first eligible step (same history there), so that the
    branches' decisions part."""
    # (each branch measuring its own diff, so that shared decisions are tested where separate ones part)
    unlimited = {k: v for k, v in case.config.items() if not k.startswith("steps_computation") and k != "cfg_diff_compute_separate"}
    probe = Case(case.name, case.pattern, dict(unlimited, max_cached_steps=-1, max_continuous_cached_steps=-1),
                 cfg=case.cfg)  # fmt: skip
    _, (stats,) = _run_cachedit(z, probe, threshold=0.999)  # < 1: cache-dit still measures the diff
    if case.cfg:
        first = min(stats["cond"][1])
        return (stats["cond"][1][first] + stats["uncond"][1][first]) / 2
    diffs = sorted(stats["cond"][1].values())
    assert len(diffs) >= 4, diffs
    return (diffs[len(diffs) // 2 - 1] + diffs[len(diffs) // 2]) / 2


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_dittofx_matches_cachedit(case: Case):
    z = zoo.get(case.name)
    threshold = _threshold(z, case)

    want_out, want_stats = _run_cachedit(z, case, threshold)
    got_out, got_stats = _run_dittofx(z, case, threshold)
    context = f"{case.name} threshold={threshold:.6f} config={case.config}"

    assert len(got_stats) == len(want_stats) == case.requests
    for request, (want, got) in enumerate(zip(want_stats, got_stats)):
        assert sorted(got) == sorted(want), (context, request, got.keys(), want.keys())
        if case.cfg and case.config.get("cfg_diff_compute_separate", True):  # the threshold makes them part (_threshold)
            assert want["cond"][0] != want["uncond"][0], (context, want)
        elif case.cfg:  # ... where each branch decided alone; sharing the decision, they do not
            assert want["cond"][0] == want["uncond"][0], (context, want)
        for branch, (want_cached, want_diffs) in want.items():
            got_cached, got_diffs = got[branch]
            where = f"{context} request={request} branch={branch}"
            # the config is meaningful: some steps cache, some compute after warmup
            assert 0 < len(want_cached) < STEPS - 1, (where, want_cached)
            # no measured diff so close to the threshold that fp32 rounding could flip a decision
            margin = min((abs(d - threshold) for d in want_diffs.values()), default=threshold) / threshold  # a static mask measures none
            assert margin > 1e-4, (where, "ambiguous threshold", threshold, want_diffs)
            assert got_cached == want_cached, (where, "cached steps", got_cached, want_cached, got_diffs, want_diffs)
            if branch == "uncond" and not case.config.get("cfg_diff_compute_separate", True):
                # the second branch takes the first's decision and measures nothing (cache-dit logs the reused diff)
                assert all(math.isnan(d) for d in got_diffs), (where, got_diffs)
                continue
            # every diff cache-dit measured, dittofx measured too, with the same value
            for s, d in want_diffs.items():
                assert math.isfinite(got_diffs[s]), (where, s, got_diffs)
                assert abs(got_diffs[s] - d) <= 1e-4 * max(abs(d), 1e-6), (where, s, got_diffs[s], d)

    assert len(got_out) == len(want_out)
    for i, (got, want) in enumerate(zip(got_out, want_out)):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(
            got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item(), msg=lambda m: f"{context} call {i}: {m}"
        )
