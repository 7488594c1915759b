"""What inductor's CUDA-graph trees (`mode="reduce-overhead"`) need from the compiled step graphs,
checked on CPU where no CUDA graph can be recorded: a graph that mutates an input which is not a
static input (parameter, module buffer) is run without CUDA graphs (`check_for_mutation`), and
every non-static input is copied into the graph's own buffer on every replay. So the cache state
(mutated in place on every step) and the model's weights and constants must all reach the graph
as static inputs, and the steps the host decides (warmup, a static mask) must run graphs without
`torch.cond` (inductor's CUDA graphs skip a graph holding one)."""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.utils import _pytree as pytree

import dittofx
import zoo

STEPS = 10
CASES = {
    "dbcache dynamic": {"residual_diff_threshold": 0.1, "max_warmup_steps": 2},
    "dbcache static fast mask, taylorseer": {"residual_diff_threshold": 1e9, "max_warmup_steps": 0, "scm_steps_mask_policy": "fast",
                                             "scm_steps_policy": "static", "enable_taylorseer": True},
    "dbprune": {"method": "dbprune", "residual_diff_threshold": 0.05, "max_warmup_steps": 2},
}  # fmt: skip


def inspecting_backend(graphs: list[dict]):
    """A dynamo backend recording, per compiled graph, what cudagraph trees would see: mutated
    inputs that are not static, the sources of the non-static tensor inputs, and any cond."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        sources = [n.name for n in gm.graph.find_nodes(op="placeholder")]  # dynamo names them after their source

        def forward_compiler(aot_gm: torch.fx.GraphModule, aot_inputs):
            meta = torch._guards.TracingContext.try_get().fw_metadata
            static = set(meta.static_input_indices)
            graphs.append({
                "mutated_not_static": [i for i, info in enumerate(meta.input_info) if info.mutates_data and i not in static],
                "not_static": [sources[i] for i, x in enumerate(aot_inputs) if isinstance(x, torch.Tensor) and i not in static],
                "has_cond": any(n.target is torch.ops.higher_order.cond for n in aot_gm.graph.nodes),
            })  # fmt: skip
            return make_boxed_func(aot_gm.forward)

        return aot_autograd(fw_compiler=forward_compiler)(gm, example_inputs)

    return backend


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_weights_and_constants_are_static_inputs_and_host_decided_steps_hold_no_cond(case):
    z = zoo.get("pixart")
    torch._dynamo.reset()
    model = dittofx.optimize(z.build(), {**CASES[case], "num_inference_steps": STEPS})
    graphs: list[dict] = []
    compiled = torch.compile(model, fullgraph=True, backend=inspecting_backend(graphs))
    user_tensors = sum(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(z.inputs(0, 1.0)))
    with torch.no_grad():
        for s in range(STEPS):
            compiled(**z.inputs(s, 1 - s / STEPS))
    assert dittofx.summary(model)[0].cached_steps, "the config should cache some steps"
    assert graphs
    for g in graphs:
        assert g["mutated_not_static"] == [], g  # else CUDA-graph trees would run this graph without CUDA graphs
        assert len(g["not_static"]) == user_tensors, g  # only the call's own tensors are copied per replay
    if CASES[case].get("scm_steps_policy") == "static":  # every decision made on the host
        assert not any(g["has_cond"] for g in graphs)


@pytest.mark.parametrize(
    "case, split, graphs_in_use, warned_at",
    [("dbcache dynamic", False, True, [2]), ("dbcache dynamic", True, True, []), ("dbcache dynamic", False, False, []),
     ("dbprune", False, True, [2]), ("dbcache dynamic", None, True, [])],
)  # fmt: skip
def test_a_device_decided_step_warns_once_where_cuda_graphs_are_in_use(monkeypatch, caplog, case, split, graphs_in_use, warned_at):
    """Its graph holds the torch.cond, which inductor's CUDA graphs skip (on the H100, PixArt-512
    with a threshold under mode="reduce-overhead" ran 2.1x slower than uncached): said once, at
    the first step the device decides (here step 2, after two warmup steps), and not with
    split_at_decision, whose tail graphs hold no cond, nor with its default (None), which would have
    split a call under CUDA graphs: one that runs the cond is not under them. The advice is
    split_at_decision, except for DBPrune, which refuses it. Whether CUDA-graph trees are in use is faked here (CPU);
    `cuda_graphs_in_use` itself says False for a CPU device."""
    import logging

    from dittofx.runtime import engine

    assert engine.cuda_graphs_in_use(torch.device("cpu")) is False
    monkeypatch.setattr(engine, "cuda_graphs_in_use", lambda device: graphs_in_use)
    z = zoo.get("pixart")
    model = dittofx.optimize(z.build(), {**CASES[case], "num_inference_steps": STEPS}, split_at_decision=split)
    warned, messages = [], []
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="dittofx"):
        for s in range(STEPS):
            caplog.clear()
            model(**z.inputs(s, 1 - s / STEPS))
            said = [r.getMessage() for r in caplog.records if "records no CUDA graph" in r.getMessage()]
            warned += [s] * len(said)
            messages += said
    assert warned == warned_at
    assert all(("split_at_decision" in m) == (case != "dbprune") for m in messages), messages
    assert dittofx.summary(model)[0].cached_steps, "the config should cache some steps"
