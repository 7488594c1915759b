"""Context/sequence parallel decisions (SPEC §3): with the sums all-reduced over the group, every
rank makes the single-process decision. Two processes on CPU (torchrun, gloo)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dittofx
from dist_toy import CFG, STEPS, build, inputs

HERE = Path(__file__).resolve().parent


def torchrun(tmp_path: Path, mode: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "dist_toy.py"), str(tmp_path), mode]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def single():
    model = dittofx.optimize(build(), CFG)
    with torch.no_grad():
        outs = [model(**inputs(s)) for s in range(STEPS)]
    return dittofx.summary(model, log_table=False)[0].cached_steps, outs


def test_all_reduced_sums_give_every_rank_the_single_process_decisions(tmp_path, single):
    cached, outs = single
    assert 0 < len(cached) < STEPS - 1
    ranks = torchrun(tmp_path, "group")
    assert ranks[0]["cached"] == ranks[1]["cached"] == cached
    for s in range(STEPS):
        joined = torch.cat([ranks[0]["outs"][s], ranks[1]["outs"][s]], dim=1)
        torch.testing.assert_close(joined, outs[s], rtol=1e-5, atol=1e-6)


def test_without_the_group_the_ranks_disagree(tmp_path, single):
    """The control: per-shard diffs alone lead the two ranks to different schedules."""
    ranks = torchrun(tmp_path, "local")
    assert ranks[0]["cached"] != ranks[1]["cached"]
