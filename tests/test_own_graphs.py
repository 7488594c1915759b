"""`optimize(..., cuda_graphs=True)` (dittofx/runtime/graphs.py): dittofx compiles its graphs and,
on CUDA, replays them from CUDA graphs of its own. On CPU the compiled graphs run without capture:
these tests check the engine's wiring (which graph runs, split steps, the schedule and outputs
against the torch.cond graph run eagerly), the options and the replays' keys. The capture path
(copies into the graph's own inputs, the head's outputs read in place, the state kept through the
warm-up, outputs copied, the address check) runs here on a fake CUDA graph that replays the
captured call into the captured tensors; the conditional nodes need CUDA. With
DITTOFX_TEST_DEVICE=cuda on a GPU (the runbook's `own-graphs-cuda` step) the same tests capture for
real."""

import logging

import pytest
import torch
from torch.utils._pytree import tree_leaves

import dittofx
import zoo
from dittofx.runtime import graphs
from dittofx.runtime.graphs import Replays, if_else_on_device
from test_cfg_and_api import uncond
from test_export import DEVICE, build, inputs  # DITTOFX_TEST_DEVICE: the runbook's GPU steps set "cuda" (real captures)
from test_split import CASES, STEPS, steps


needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs: DITTOFX_TEST_DEVICE=cuda on a GPU")
CFG = {"residual_diff_threshold": 0.1, "max_warmup_steps": 2, "num_inference_steps": STEPS,
       "max_continuous_cached_steps": 2}  # fmt: skip  # forces device-decided computes: both tails run


class FakeCudaGraph:
    """What a CUDA graph's replay does, on CPU: the captured call again, on the tensors it was
    captured with (the inputs it closes over), into the tensors the capture returned."""

    def __init__(self, run):
        self.run, self.outputs = run, run()

    def replay(self):
        for mine, new in zip(self.outputs, self.run(), strict=True):
            if isinstance(mine, torch.Tensor):
                mine.copy_(new)


@pytest.fixture
def captures(monkeypatch):
    """The captures made, in a list: on CUDA real ones, elsewhere FakeCudaGraphs."""
    made, real = [], graphs.record

    def fake(run, warm_up, pool):  # as graphs.record, all of it run: the capture's call too
        warm_up(), warm_up()
        graph = FakeCudaGraph(run)
        return graph, graph.outputs

    def record(run, warm_up, pool):
        graph, outputs = (real if DEVICE == "cuda" else fake)(run, warm_up, pool)
        made.append(graph)
        return graph, outputs

    monkeypatch.setattr(graphs, "record", record)
    if DEVICE != "cuda":
        monkeypatch.setattr(graphs, "CAPTURED_ON", {"cuda", "cpu"})
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    return made


class _State:
    def __init__(self):
        self.t = [torch.zeros(2)]

    def tensors(self):
        return self.t


def test_own_graphs_run_the_steps_of_the_cond_graph():
    z = zoo.get("pixart")
    in_graph, own = dittofx.optimize(z.build(), CFG), dittofx.optimize(z.build(), CFG, cuda_graphs=True)
    for _request in range(2):
        for want, got in zip(steps(in_graph, z), steps(own, z)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        want, got = dittofx.summary(in_graph)[0], dittofx.summary(own)[0]
        assert got.cached_steps == want.cached_steps and got.cached_steps, got.cached_steps
    assert sorted({name for name, *_ in own._dittofx.replays.by_key}) == ["compute", "device"]


def cfg_steps(model, z):
    """Both CFG branches' outputs of every step, all kept to the end (a replay's outputs must be
    the caller's: the next replay writes into the graph's own)."""
    with torch.no_grad():
        return [model(**kwargs)[0] for s in range(STEPS) for kwargs in (inputs(z, s, 1 - s / STEPS), uncond(inputs(z, s, 1 - s / STEPS)))]


FORMS = ["conditional nodes", "no conditional nodes", "split_at_decision"]


@pytest.fixture(params=FORMS)
def form(request, monkeypatch, caplog):
    """How steps decided on the device run: on CPU each form is set; on CUDA the one this torch
    gives runs (the other one of the first two skips)."""
    if DEVICE == "cuda" and request.param != "split_at_decision" and (request.param == "conditional nodes") != graphs.conditional_nodes():
        pytest.skip(f"this torch has {'no ' if not graphs.conditional_nodes() else ''}CUDA-graph conditional nodes")
    if DEVICE != "cuda":
        monkeypatch.setattr(graphs, "conditional_nodes", lambda: request.param == "conditional nodes")
    caplog.set_level(logging.WARNING, logger="dittofx")
    return request.param


def test_captured_replays_run_the_steps_of_the_cond_graph_on_both_cfg_branches(captures, form, caplog):
    z = zoo.get("pixart")
    cfg = {**CFG, "enable_separate_cfg": True}
    in_graph = dittofx.optimize(build(z), cfg)
    own = dittofx.optimize(build(z), cfg, cuda_graphs=True, split_at_decision=form == "split_at_decision")
    for _request in range(2):
        for want, got in zip(cfg_steps(in_graph, z), cfg_steps(own, z), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        want = {s.branch: s.cached_steps for s in dittofx.summary(in_graph)}
        assert {s.branch: s.cached_steps for s in dittofx.summary(own)} == want and all(want.values()), want
    said = [r.getMessage() for r in caplog.records if "captures no CUDA-graph conditional nodes" in r.getMessage()]
    assert len(said) == (form == "no conditional nodes"), said  # once, for the form that falls back
    replays = own._dittofx.replays.by_key
    names = ["compute", "device"] if form == "conditional nodes" else ["compute", "split-cache", "split-compute", "split-head"]
    assert sorted(name for name, *_ in replays) == sorted(2 * names)  # per branch, kept across requests
    assert len(captures) == len(replays)
    for (name, state, *_), tail in replays.items():  # the tails read their head's outputs where they are
        if name in ("split-cache", "split-compute"):
            head = next(r for (n, s, *_), r in replays.items() if n == "split-head" and s == state)
            assert [x for x in tail.inputs if any(x is o for o in head.outputs)] == list(head.outputs), name


@pytest.mark.parametrize("case", ["flux dbcache F1B1 (views out of the middle)", "zimage (higher-order ops in the middle)"])
def test_captured_steps_decided_on_the_device_match_the_cond_graph(captures, case, monkeypatch):
    if DEVICE != "cuda":
        monkeypatch.setattr(graphs, "conditional_nodes", lambda: True)
    name, cfg = CASES[case]
    z, cfg = zoo.get(name), {**cfg, "num_inference_steps": STEPS}
    in_graph, own = dittofx.optimize(build(z), cfg), dittofx.optimize(build(z), cfg, cuda_graphs=True)
    with torch.no_grad():
        for s in range(STEPS):
            want, got = (tree_leaves(model(**inputs(z, s, 1 - s / STEPS))) for model in (in_graph, own))
            for w, g in zip(want, got, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())
    want = dittofx.summary(in_graph)[0].cached_steps
    assert dittofx.summary(own)[0].cached_steps == want and want, want
    replays = own._dittofx.replays.by_key
    decided = "device" if DEVICE != "cuda" or graphs.conditional_nodes() else "split-head"
    assert decided in {name for name, *_ in replays} and len(captures) == len(replays), list(replays)


def test_graphs_captured_under_inference_mode_take_later_calls_outside_it(captures):
    """A capture's own input tensors take each later call's inputs: made under inference mode,
    they would refuse the copies of a call outside it."""
    z = zoo.get("pixart")
    in_graph, own = dittofx.optimize(build(z), CFG), dittofx.optimize(build(z), CFG, cuda_graphs=True)
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            got = [own(**inputs(z, s, 1 - s / STEPS))[0] for s in range(STEPS)]
        with torch.no_grad():
            want = [in_graph(**inputs(z, s, 1 - s / STEPS))[0] for s in range(STEPS)]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())
    assert captures and dittofx.summary(own)[0].cached_steps == dittofx.summary(in_graph)[0].cached_steps != []


def _same_addresses(tensors, ptrs, indices):  # torch._C's, where this torch has none (CPU builds)
    return all(tensors[i].data_ptr() == ptrs[i] for i in indices)


@pytest.mark.parametrize("check", ["in C", "in Python"])
def test_a_replay_refuses_weights_moved_since_its_capture(captures, check, monkeypatch):
    if check == "in Python":
        monkeypatch.setattr(graphs, "_same_addresses", None)
    elif graphs._same_addresses is None:
        monkeypatch.setattr(graphs, "_same_addresses", _same_addresses)
    z = zoo.get("pixart")
    model = dittofx.optimize(build(z), {"num_inference_steps": STEPS}, cuda_graphs=True)
    with torch.no_grad():
        model(**inputs(z, 0, 1.0))
        weight = next(model.parameters())
        weight.data = weight.data.clone()
        with pytest.raises(RuntimeError, match=r"weights or cache state moved since its CUDA graph was captured.*optimize it again"):
            model(**inputs(z, 1, 0.9))


@needs_cuda
@pytest.mark.skipif(DEVICE == "cuda" and not graphs.conditional_nodes(), reason="this torch has no CUDA-graph conditional nodes")
def test_if_else_on_device_runs_the_branch_the_gpu_reads():
    pred, x = torch.zeros((), dtype=torch.bool, device="cuda"), torch.randn(8, 16, device="cuda")
    w = torch.randn(16, 16, device="cuda")
    then, otherwise = lambda: (x, None), lambda: (torch.nn.functional.linear(x, w).relu(), None)  # then: an input as is
    then(), otherwise()  # the kernels load (and cuBLAS sets up) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, none = if_else_on_device(pred, then, otherwise)
    assert out.data_ptr() != x.data_ptr() and none is None
    for flag in (True, False, False, True):
        pred.fill_(flag)
        graph.replay()
        torch.testing.assert_close(out, x if flag else torch.nn.functional.linear(x, w).relu())


def test_each_replay_compiles_its_own_code_so_resolutions_never_reach_the_recompile_limit():
    graph, replays, state = torch.fx.symbolic_trace(lambda s, x: (x * 2 + s.sum(),)), Replays(), _State()
    with torch._dynamo.config.patch(recompile_limit=1):
        for size in (3, 4, 5):  # one graph, three input sizes: three compiles of fullgraph=True
            x = torch.arange(size, dtype=torch.float32)
            (got,) = replays.get("compute", {"compute": graph}, "cond", state, [x])(state.tensors(), [x])
            assert torch.equal(got, x * 2)


def test_bad_cuda_graphs_option_raises_and_leaves_the_model_untouched():
    z = zoo.get("pixart")
    model = z.build()
    with pytest.raises(TypeError, match=r"cuda_graphs='yes': must be True or False"):
        dittofx.optimize(model, {}, cuda_graphs="yes")
    with pytest.raises(ValueError, match=r"cuda_graphs=True with split_at_decision=\{'mode': 'reduce-overhead'\}: .*give split_at_decision=True"):
        dittofx.optimize(model, {}, cuda_graphs=True, split_at_decision={"mode": "reduce-overhead"})
    with pytest.raises(ValueError, match=r"cuda_graphs=True with method='dbprune'.*allowed with 'dbcache' and 'teacache'"):
        dittofx.optimize(model, {"method": "dbprune"}, cuda_graphs=True)
    assert "_dittofx" not in model.__dict__ and "forward" not in model.__dict__


def test_torch_compile_on_top_says_to_call_the_model_without_it():
    z = zoo.get("pixart")
    model = dittofx.optimize(z.build(), {"num_inference_steps": STEPS}, cuda_graphs=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"cuda_graphs=True is called without torch.compile"):
        with torch.no_grad():
            torch.compile(model, fullgraph=True)(**z.inputs(0, 1.0))


def test_replays_are_kept_per_graph_state_and_input_sizes_and_go_with_their_state():
    graph = {name: torch.fx.symbolic_trace(torch.nn.Identity()) for name in ("compute", "split-head")}
    replays, a, b, c = Replays(), _State(), _State(), _State()
    x, y = torch.zeros(3), torch.zeros(4)
    first = replays.get("compute", graph, "cond", a, [x, 1])
    assert replays.get("compute", graph, "cond", a, [torch.ones(3), 1]) is first  # same sizes: the same capture
    assert replays.get("compute", graph, "cond", a, [y, 1]) is not first  # other sizes
    assert replays.get("compute", graph, "cond", a, [x, 2]) is not first  # other non-tensor inputs
    assert replays.get("compute", dict(graph), "cond", a, [x, 1]) is not first  # another entry's graphs
    assert replays.get("split-head", graph, "cond", a, [x, 1]).owned_outputs is False
    other_branch = replays.get("compute", graph, "uncond", b, [x, 1])
    assert replays.get("compute", graph, "cond", c, [x, 1]) is not first  # a new state on "cond": a's captures go
    assert {key[1] for key in replays.by_key} == {id(b), id(c)}
    assert replays.get("compute", graph, "uncond", b, [x, 1]) is other_branch
    with pytest.raises(TypeError, match=r"an input of the call is a float \(0.5\).*pass it as a tensor"):
        replays.get("compute", graph, "uncond", b, [x, 0.5])
