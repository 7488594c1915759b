"""Differential test: dittofx DBPrune (SPEC §7) against cache-dit 1.5.3's own DBPrune
(`cache_dit.DBPruneConfig`), on configs where the two agree.

Two fresh instances of the same tiny zoo model get the same DBPrune config, one through
`cache_dit.enable_cache(BlockAdapter(...))`, one through `dittofx.optimize(...)` (a dict with
method "dbprune"). Both run the same denoising calls; per call, the set of pruned blocks, the
diffs both sides measure, the pruned steps and the outputs must agree.

Where SPEC §7 and cache-dit meet (cache_dit/caching/ under site-packages):

* cache-dit (cache_blocks/pattern_base.py, pattern_3_4_5.py `compute_or_prune`): per block outside
  Fn/Bn/`non_prune_block_ids`, `can_prune` = `can_cache` with the block's input against its input
  stored at its last compute (`set_Fn_buffer(original_hidden_states, prefix=..._{id}_Fn_original)`),
  `similarity()` = mean|p - x| / mean|p| < threshold; a pruned block returns input + stored residual.
  Warmup as DBCache: `range(0, max_warmup_steps, warmup_interval)`.
* dittofx decides every block from one reduction where the middle starts (SPEC §7's second
  sentence): block j's diff is sum|x - x_j| / sum|input_j|, x the middle's input now and x_j the
  middle's input when block j last ran. That equals cache-dit's diff of block j's own input exactly
  when every prunable block before j is pruned at this step (and, so far, j ran at every step an earlier prunable block ran), and
  no non-prunable block lies between the middle's start and j. The cases below are chosen so that
  (a) the first prunable block's diff is compared always, (b) a later block's diff where that holds,
  and (c) the decisions and outputs everywhere: a margin check makes sure no diff lies near the
  threshold on either side.

cache-dit side, patched:
* `PrunedBlocks_Pattern_3_4_5.compute_or_prune` calls `self._process_block_outputs(hidden, enc)`
  but `CachedBlocks_Pattern_3_4_5._process_block_outputs` takes one argument: DBPrune on any
  Pattern_3/4/5 model (PixArt, Sana, ...) raises TypeError at its first computed block. The extra
  argument is dropped (`_cachedit_fixes`).
* `_maybe_prune` is wrapped to record (step, branch, block, pruned, diff) per block.

Deliberate differences, kept out of the configs below:
* multi-list chains (FLUX): cache-dit gives each block list its own context, so Fn/Bn and
  `non_prune_block_ids` apply to each list (FLUX Fn=1 protects `single_transformer_blocks.0` too);
  dittofx counts Fn/Bn over the whole chain (SPEC §2) and `non_prune_block_ids` in chain positions
  (README). The FLUX case gives dittofx `non_prune_block_ids=[2]` for the same prunable set.
* `residual_diff_threshold >= 1`: cache-dit prunes without measuring; SPEC compares.
* batch > 1: cache-dit pools the diff over the batch, dittofx takes the largest per sample (SPEC §3).
* max_cached_steps / max_continuous_cached_steps / steps_computation_mask / dynamic threshold:
  cache-dit applies them to DBPrune; dittofx's DBPrune has no such fields and refuses them.
* new request: cache-dit refreshes one call late (see test_cachedit_differential); the cache-dit
  side calls `cache_dit.refresh_context` between requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cache_dit
import pytest
import torch
from cache_dit import BlockAdapter, ForwardPattern
from cache_dit.caching.cache_blocks.pattern_3_4_5 import CachedBlocks_Pattern_3_4_5, PrunedBlocks_Pattern_3_4_5
from cache_dit.caching.cache_blocks.pattern_base import PrunedBlocks_Pattern_Base
from torch.utils._pytree import tree_leaves

import dittofx
import zoo
from dittofx.runtime import gates
from test_cachedit_differential import STEPS, _calls  # the same calls: requests, steps, CFG branches
PATTERNS = {"pixart": ForwardPattern.Pattern_3, "wan": ForwardPattern.Pattern_2, "flux": ForwardPattern.Pattern_1}


@dataclass
class Case:
    name: str
    config: dict  # DBPruneConfig fields given to both sides
    threshold: float
    dittofx_extra: dict = field(default_factory=dict)  # chain positions for what cache-dit does per list
    cfg: bool = False  # two calls per step, enable_separate_cfg=True
    requests: int = 1
    # chain positions of the middle blocks that are not prunable (their output feeds later blocks fresh)
    middle_fixed: tuple[int, ...] = ()


CASES = [
    # one prunable block (2): its input is the middle's input
    Case("pixart", dict(Fn_compute_blocks=2, Bn_compute_blocks=1, max_warmup_steps=2), 0.05),
    # two prunable blocks, warmup interval, two requests
    Case("pixart", dict(Fn_compute_blocks=1, Bn_compute_blocks=1, max_warmup_steps=4, warmup_interval=2), 0.05, requests=2),
    # separate CFG branches; non_prune_block_ids leaves block 1 only
    Case("wan", dict(Fn_compute_blocks=1, Bn_compute_blocks=1, max_warmup_steps=2, non_prune_block_ids=[2]), 0.05, cfg=True),
    # three prunable blocks, separate CFG
    Case("wan", dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2), 0.05, cfg=True),
    # two block lists: cache-dit's Fn=1 per list keeps single_transformer_blocks.0 (chain 2) unpruned
    Case("flux", dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2), 0.05,
         dittofx_extra=dict(non_prune_block_ids=[2]), middle_fixed=(2,)),
]  # fmt: skip


def _case_id(c: Case) -> str:
    return f"{c.name}-F{c.config['Fn_compute_blocks']}B{c.config['Bn_compute_blocks']}" + "-cfg" * c.cfg + f"-r{c.requests}"


@pytest.fixture(autouse=True)
def _cachedit_fixes(monkeypatch):
    def process_block_outputs(self, hidden_states, new_encoder_hidden_states=None):
        return CachedBlocks_Pattern_3_4_5._process_block_outputs(self, hidden_states)

    monkeypatch.setattr(PrunedBlocks_Pattern_3_4_5, "_process_block_outputs", process_block_outputs)


def _run_cachedit(z, case: Case, monkeypatch):
    record = []

    def wrap(cls):
        orig = cls._maybe_prune

        def _maybe_prune(self, block_id, hidden_states, prefix="Bn_original"):
            ctx = self.context_manager.get_context()
            diffs = ctx.cfg_residual_diffs if ctx.is_separate_cfg_step() else ctx.residual_diffs
            key = str(ctx.get_current_step())
            before = len(diffs.get(key, []))
            pruned = orig(self, block_id, hidden_states, prefix)
            after = diffs.get(key, [])
            if not self._skip_prune(block_id):
                record.append((self.cache_prefix, block_id, bool(pruned), after[-1] if len(after) > before else None))
            return pruned

        monkeypatch.setattr(cls, "_maybe_prune", _maybe_prune)

    wrap(PrunedBlocks_Pattern_Base)
    wrap(PrunedBlocks_Pattern_3_4_5)
    model = z.build()
    lists = [model.get_submodule(b) for b in z.block_lists]
    offsets = dict(zip(z.block_lists, [sum(len(x) for x in lists[:i]) for i in range(len(lists))]))
    config = cache_dit.DBPruneConfig(residual_diff_threshold=case.threshold, num_inference_steps=STEPS,
                                     enable_separate_cfg=case.cfg, **case.config)  # fmt: skip
    pattern = PATTERNS[case.name]
    adapter = BlockAdapter(transformer=model, blocks=lists if len(lists) > 1 else lists[0],
                           forward_pattern=[pattern] * len(lists) if len(lists) > 1 else pattern,
                           check_forward_pattern=False)  # fmt: skip
    cache_dit.enable_cache(adapter, cache_config=config)
    outputs, per_call, pruned_steps = [], [], []
    with torch.no_grad():
        for request, step, branch, kw in _calls(z, case):
            if request > 0 and step == 0 and branch == "cond":
                pruned_steps.append(_cachedit_pruned_steps(model, case))
                cache_dit.refresh_context(model, num_inference_steps=STEPS)
            n = len(record)
            outputs.append(tree_leaves(model(**kw))[0])
            per_call.append({offsets[p] + b: (pruned, d) for p, b, pruned, d in record[n:]})
    pruned_steps.append(_cachedit_pruned_steps(model, case))
    return outputs, per_call, pruned_steps


def _cachedit_pruned_steps(model, case: Case) -> dict:
    """branch -> steps with any block pruned, over all block lists (a context each)."""
    ctxs = [model._context_manager.get_context(n) for n in model._context_names]
    got = {"cond": sorted(set().union(*(c.get_pruned_steps() for c in ctxs)))}
    if case.cfg:
        got["uncond"] = sorted(set().union(*(c.get_cfg_pruned_steps() for c in ctxs)))
    return got


def _run_dittofx(z, case: Case, monkeypatch):
    seen = []
    orig = gates.prune_decide

    def prune_decide(*args, **kwargs):  # goes into the graph at capture (the first call)
        diffs, pruned = orig(*args, **kwargs)
        seen.append((diffs.clone(), pruned.clone()))
        return diffs, pruned

    monkeypatch.setattr(gates, "prune_decide", prune_decide)
    model = z.build()
    config = dict(case.config, **case.dittofx_extra, method="dbprune", residual_diff_threshold=case.threshold,
                  num_inference_steps=STEPS)  # fmt: skip
    if case.cfg:
        config["enable_separate_cfg"] = True
    dittofx.optimize(model, config)
    outputs, per_call, pruned_steps = [], [], []
    with torch.no_grad():
        for request, step, branch, kw in _calls(z, case):
            if request > 0 and step == 0 and branch == "cond":
                pruned_steps.append(_dittofx_pruned_steps(model, case))
            n = len(seen)
            outputs.append(tree_leaves(model(**kw))[0])
            assert len(seen) == n + 1, "one prune decision per call"
            diffs, pruned = seen[-1]
            blocks = model._dittofx.entries[0].pruned_blocks
            per_call.append({j: (bool(pruned[i]), None if math.isnan(diffs[i].item()) else diffs[i].item())
                             for i, j in enumerate(blocks)})  # fmt: skip
    pruned_steps.append(_dittofx_pruned_steps(model, case))
    return outputs, per_call, pruned_steps


def _dittofx_pruned_steps(model, case: Case) -> dict:
    return {(st.branch if case.cfg else "cond"): list(st.cached_steps) for st in dittofx.summary(model, log_table=False)}


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_dittofx_dbprune_matches_cachedit(case: Case, monkeypatch):
    z = zoo.get(case.name)
    want_out, want_calls, want_steps = _run_cachedit(z, case, monkeypatch)
    got_out, got_calls, got_steps = _run_dittofx(z, case, monkeypatch)
    context = f"{case.name} threshold={case.threshold} config={case.config}"

    assert got_steps == want_steps, (context, got_steps, want_steps)
    for steps in want_steps:  # meaningful: some steps prune, some compute after warmup
        for branch, pruned in steps.items():
            assert 0 < len(pruned) < STEPS - 2, (context, branch, pruned)

    assert len(got_calls) == len(want_calls)
    first = min(want_calls[-1])  # the first prunable block: its input is the middle's input
    assert sorted(got_calls[-1]) == sorted(want_calls[-1]), (context, "prunable blocks", got_calls[-1], want_calls[-1])
    for i, (want, got) in enumerate(zip(want_calls, got_calls)):
        where = f"{context} call {i}"
        want_pruned = sorted(j for j, (p, _) in want.items() if p)
        assert sorted(j for j, (p, _) in got.items() if p) == want_pruned, (where, got, want)
        for j, (_, d) in [*want.items(), *got.items()]:  # no diff near the threshold on either side
            assert d is None or abs(d - case.threshold) > 0.02 * case.threshold, (where, "ambiguous threshold", j, d)
        for j, (_, d) in want.items():
            exact = j == first or (
                all(want[k][0] for k in want if k < j) and not any(first < k < j for k in case.middle_fixed)
            )
            assert (d is None) == (got[j][1] is None), (where, j, got, want)
            if exact and d is not None:
                assert abs(got[j][1] - d) <= 1e-4 * max(abs(d), 1e-6), (where, j, got[j][1], d)

    for i, (got, want) in enumerate(zip(got_out, want_out)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=lambda m: f"{context} call {i}: {m}")


def test_cachedit_config_object_means_the_same_on_one_block_list(monkeypatch):
    """A `cache_dit.DBPruneConfig` handed to dittofx as it is prunes as cache-dit does (one block list)."""
    z = zoo.get("pixart")
    case = Case("pixart", dict(Fn_compute_blocks=1, Bn_compute_blocks=1, max_warmup_steps=2, non_prune_block_ids=[1]), 0.05)
    want_out, _, want_steps = _run_cachedit(z, case, monkeypatch)
    model = dittofx.optimize(z.build(), cache_dit.DBPruneConfig(residual_diff_threshold=0.05, num_inference_steps=STEPS, **case.config))
    with torch.no_grad():
        got_out = [tree_leaves(model(**kw))[0] for _, _, _, kw in _calls(z, case)]
    assert _dittofx_pruned_steps(model, case) == want_steps[0] and want_steps[0]["cond"], (want_steps,)
    for got, want in zip(got_out, want_out):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
