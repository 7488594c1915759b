"""Host syncs per step (issue 7): a decision the host can make (warmup, nothing stored yet, a mask's
1, a static mask's 0, TeaCache's first and last step) runs a graph with no device predicate and no
copy to the host; every other step reads exactly one predicate (its torch.cond). Counted on CPU by
an instrument that sees every scalar read and host copy (`host_reads.HostReads`)."""

import pytest

import dittofx
import zoo
from host_reads import reads_per_step

STEPS = 12
FAST = dittofx.steps_mask(mask_policy="fast", total_steps=STEPS)
CASES = {  # config, the steps the host decides (worked out here from SPEC §3/§6, not by dittofx)
    "dbcache warmup + dynamic mask": (
        {"residual_diff_threshold": 0.1, "max_warmup_steps": 2, "scm_steps_mask_policy": "fast", "scm_steps_policy": "dynamic"},
        {s for s in range(STEPS) if s < 2 or FAST[s]},
    ),
    "dbcache warmup interval": (
        {"residual_diff_threshold": 0.1, "max_warmup_steps": 6, "warmup_interval": 3},
        {0, 3},  # warmup steps off the interval go on to the device gates (SPEC §3 gate 1)
    ),
    "dbcache static mask": (
        {"residual_diff_threshold": 0.1, "max_warmup_steps": 0, "scm_steps_mask_policy": "fast", "scm_steps_policy": "static"},
        set(range(STEPS)),
    ),
    "teacache": ({"method": "teacache", "rel_l1_thresh": 0.3, "coefficients": [1.0, 0.0]}, {0, STEPS - 1}),
}  # fmt: skip


@pytest.mark.parametrize("split", [False, True], ids=["cond", "split_at_decision"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_host_decided_steps_never_sync_and_the_others_read_one_predicate(case, split):
    """In the graph (the cond reads its predicate) or split there (the host reads the head's)."""
    cfg, on_host = CASES[case]
    z = zoo.get("flux" if cfg.get("method") == "teacache" else "pixart")
    model = dittofx.optimize(z.build(), {**cfg, "num_inference_steps": STEPS}, split_at_decision=split)
    want = [(0, 0) if s in on_host else (0, 1) for s in range(STEPS)]
    for _request in range(2):  # the host's step count starts again with the second request
        assert reads_per_step(model, z, STEPS) == want


def test_unknown_request_length_decides_every_step_on_the_device():
    """Without `num_inference_steps` a new request shows only in the timestep, on the device."""
    z = zoo.get("pixart")
    model = dittofx.optimize(z.build(), {"residual_diff_threshold": 0.1, "max_warmup_steps": 2})
    assert reads_per_step(model, z, 6) == [(0, 1)] * 6
