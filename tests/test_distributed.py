"""Context/sequence parallel decisions (SPEC §3): with the sums all-reduced over the group, every
rank makes the single-process decision. Two processes on CPU (torchrun, gloo): a toy DiT sharded by
hand with an explicit group, and a diffusers transformer under diffusers' own context parallelism."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dittofx
import dist_cp
import zoo
from dist_toy import CONFIGS, STEPS, build, inputs

HERE = Path(__file__).resolve().parent


def torchrun(tmp_path: Path, script: str, *args: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / script), str(tmp_path), *args]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def single_process(method: str):
    model = dittofx.optimize(build(), CONFIGS[method])
    with torch.no_grad():
        outs = [model(**inputs(s)) for s in range(STEPS)]
    stats = dittofx.summary(model, log_table=False)[0]
    return stats.cached_steps, stats.pruned_blocks, outs


@pytest.fixture(scope="module")
def single():
    cached, _, outs = single_process("dbcache")
    return cached, outs


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_all_reduced_sums_give_every_rank_the_single_process_decisions(tmp_path, method):
    cached, pruned, outs = single_process(method)
    assert 0 < len(cached) < STEPS - 1
    ranks = torchrun(tmp_path, "dist_toy.py", "group", method)
    assert ranks[0]["cached"] == ranks[1]["cached"] == cached
    assert ranks[0]["pruned"] == ranks[1]["pruned"] == pruned
    for s in range(STEPS):
        joined = torch.cat([ranks[0]["outs"][s], ranks[1]["outs"][s]], dim=1)
        torch.testing.assert_close(joined, outs[s], rtol=1e-5, atol=1e-6)


def test_without_the_group_the_ranks_disagree(tmp_path, single):
    """The control: per-shard diffs alone lead the two ranks to different schedules."""
    ranks = torchrun(tmp_path, "dist_toy.py", "local")
    assert ranks[0]["cached"] != ranks[1]["cached"]


def test_diffusers_context_parallelism_gives_every_rank_the_single_process_decisions(tmp_path):
    """Ulysses over 2 ranks (`enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))`,
    then `optimize` with no group): each rank sees half the tokens, the diffs are those of the whole
    sequence (a shard's own diff differs by ~1e-3 here), so both ranks cache the steps the single
    process caches and skip the middle blocks' all-to-alls together; the gathered outputs match.
    Enabling it after `optimize` is refused on the first call, and dittofx detaches."""
    z = zoo.get("wan")
    single = dittofx.optimize(z.build(), dist_cp.CFG)
    with torch.no_grad():
        outs = [single(**z.inputs(s, 1 - s / dist_cp.STEPS), return_dict=False)[0] for s in range(dist_cp.STEPS)]
    stats = dittofx.summary(single, log_table=False)[0]
    assert 0 < len(stats.cached_steps) < dist_cp.STEPS - 2
    for rank in torchrun(tmp_path, "dist_cp.py"):
        assert rank["cached"] == stats.cached_steps
        torch.testing.assert_close(torch.tensor(rank["diffs"]), torch.tensor(stats.diffs), rtol=1e-5, atol=0, equal_nan=True)
        for got, want in zip(rank["outs"], outs):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert "context parallelism was enabled after dittofx.optimize" in rank["refused"]
