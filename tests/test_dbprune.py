"""DBPrune (SPEC §7) on real diffusers classes against the naive reference `reference.NaiveDBPrune`,
and the host-sync budget: one device-to-host copy per step, no other host read."""

import math

import pytest
import torch
from torch.utils._pytree import tree_leaves

import dittofx
import zoo
from host_reads import reads_per_step
from reference import NaiveDBPrune

STEPS = 10


def run(model, z, steps=STEPS):
    with torch.no_grad():
        return [tree_leaves(model(**z.inputs(s, 1 - s / steps)))[0] for s in range(steps)]


@pytest.mark.parametrize(
    "name, fn, bn, non_prune",
    # hunyuanvideo: a transposed stream (a pruned block returns its input's strides); sana_wm: a
    # float made from sizes that the blocks read (no cond operand: made again in the branch)
    [("pixart", 1, 0, ()), ("flux", 1, 1, (2,)), ("wan", 1, 0, ()), ("qwenimage", 1, 1, ()), ("hunyuanvideo", 1, 0, ()),
     ("sana_wm", 1, 0, ())],
)
def test_dbprune_matches_naive_reference(name, fn, bn, non_prune):
    z = zoo.get(name)
    probe = NaiveDBPrune(z.build(), z.block_lists, Fn=fn, Bn=bn, threshold=-1.0, non_prune=non_prune)
    run(probe, z)
    measured = sorted(d for d in probe.diffs if d == d)
    threshold = measured[len(measured) // 2] * 1.02  # prunes on some steps, not all

    reference = NaiveDBPrune(z.build(), z.block_lists, Fn=fn, Bn=bn, threshold=threshold, max_warmup_steps=2,
                             non_prune=non_prune)  # fmt: skip
    expected = run(reference, z)
    assert 0 < len(reference.cached_steps) < STEPS - 2, reference.pruned_per_step

    model = dittofx.optimize(z.build(), dittofx.DBPruneConfig(
        Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=threshold, max_warmup_steps=2,
        non_prune_block_ids=non_prune, num_inference_steps=STEPS))  # fmt: skip
    got = run(model, z)
    stats = dittofx.summary(model)[0]
    assert model._dittofx.entries[0].pruned_blocks == reference.prunable
    assert f"prunable blocks: {reference.prunable}" in dittofx.explain(model)
    assert stats.pruned_blocks == reference.pruned_per_step
    assert stats.cached_steps == reference.cached_steps
    for a, b in zip(stats.diffs, reference.diffs):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5 * max(1.0, abs(b)), (stats.diffs, reference.diffs)
    for g, w in zip(got, expected):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


def test_one_host_sync_per_step():
    z = zoo.get("pixart")
    model = dittofx.optimize(z.build(), {"method": "dbprune", "residual_diff_threshold": 0.2, "max_warmup_steps": 1,
                                         "num_inference_steps": STEPS}, example_inputs=((), z.inputs(0, 1.0)))  # fmt: skip
    per_step = reads_per_step(model, z, STEPS)
    stats = dittofx.summary(model)[0]
    assert sum(stats.pruned_blocks) >= 2 * len(model._dittofx.entries[0].pruned_blocks), stats.pruned_blocks
    assert per_step == [(1, 0)] * STEPS  # one copy of the decision vector; every cond branches on it
    # (the instrument does see a device predicate: tests/test_host_sync.py counts DBCache's)


def test_bad_dbprune_config_and_nothing_to_prune():
    z = zoo.get("pixart")
    model = z.build()
    with pytest.raises(ValueError, match=r"non_prune_block_ids=\('a',\): must be a list of block indices >= 0"):
        dittofx.optimize(model, {"method": "dbprune", "non_prune_block_ids": ["a"]})
    with pytest.raises(ValueError, match=r"unknown cache_config key 'enable_taylorseer' for method='dbprune'; allowed keys: \[.*'non_prune_block_ids'"):
        dittofx.optimize(model, {"method": "dbprune", "enable_taylorseer": True})
    assert "_dittofx" not in model.__dict__
    forward = model.__dict__.get("forward")
    dittofx.optimize(model, {"method": "dbprune", "Fn_compute_blocks": 1, "Bn_compute_blocks": 1, "non_prune_block_ids": [1, 2]})
    with pytest.raises(ValueError, match=r"non_prune_block_ids=\[1, 2\] .* no block of the 4 in the chain is left to prune"):
        with torch.no_grad():
            model(**z.inputs(0, 1.0))
    assert "_dittofx" not in model.__dict__ and model.__dict__.get("forward") is forward  # restored
    dittofx.optimize(model, {"method": "dbprune", "non_prune_block_ids": [1, 9]})
    with pytest.raises(ValueError, match=r"non_prune_block_ids=\[1, 9\]: \[9\] past the chain; allowed: 0..3"):
        with torch.no_grad():
            model(**z.inputs(0, 1.0))
    assert "_dittofx" not in model.__dict__
    assert dittofx.DBPruneConfig(non_prune_block_ids=(3,)).short_name() == "DBPrune_F1B0_W8I1_R0.08_NP1"


def test_blocks_on_another_batch_than_the_middles_input_are_refused():
    """Latte folds frames into the batch of its temporal blocks: a per-sample input norm of the
    middle's input cannot stand for theirs, so DBPrune says so (DBCache caches Latte)."""
    z = zoo.get("latte")
    model = dittofx.optimize(z.build(), {"method": "dbprune"})
    with pytest.raises(ValueError, match=r"DBPrune: block temporal_transformer_blocks.0 runs on a batch of 16 where the middle's input has 2"):
        with torch.no_grad():
            model(**z.inputs(0, 1.0))
    assert "_dittofx" not in model.__dict__


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_threshold_zero_is_bitwise_the_plain_model(name):
    z = zoo.get(name)
    want = run(z.build(), z, 4)
    model = dittofx.optimize(z.build(), {"method": "dbprune", "residual_diff_threshold": 0.0, "max_warmup_steps": 0})
    got = run(model, z, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert dittofx.summary(model)[0].pruned_blocks == [0, 0, 0, 0]
