"""Each pass on its own: capture (graph out), chain detection and partition (graph in, annotated
graph out), rewrite (graph in, cached graph out), and the engine's capture keys."""

import pytest
import torch

import dittofx
import zoo
from dittofx.passes.capture import capture
from dittofx.passes.partition import REGIONS, partition
from dittofx.passes.rewrite import RewriteOptions, rewrite
from dittofx.patterns.chain import find_chain


def captured(name, dynamic=False):
    z = zoo.get(name)
    model = z.build()
    graph = capture(model, (), z.inputs(0, 1.0), dynamic=dynamic)
    return z, model, graph, set(graph.weight_placeholders())


@pytest.mark.parametrize("name", zoo.names(capturable=True))
def test_chain_detection_matches_the_models_main_lists(name):
    """No per-model code: the lists found equal what a reader of the diffusers source names as the
    main chain (refiners, guidance approximators and hint blocks stay out)."""
    z, model, graph, weights = captured(name)
    chain = find_chain(graph.gm, model, weights)
    assert tuple(chain.lists) == z.block_lists
    calls = []  # the blocks in the order an uncaptured copy calls them (lists may interleave: Latte)
    eager = z.build()
    for lst in z.block_lists:
        for i, block in enumerate(eager.get_submodule(lst)):
            block.register_forward_pre_hook(lambda m, a, path=f"{lst}.{i}": calls.append(path))
    with torch.no_grad():
        eager(**z.inputs(0, 1.0))
    assert [b.path for b in chain.blocks] == list(dict.fromkeys(calls))


def test_capture_keeps_dims_symbolic_and_runs_on_live_weights():
    z, model, graph, _ = captured("flux", dynamic=True)
    assert graph.dynamic_dims[0] == (1,)  # hidden_states: tokens symbolic; batch 1 and the embedder's channels specialized
    live = dict(model.named_parameters()) | dict(model.named_buffers())
    kwargs = z.inputs(3, 0.7)

    def run_graph():
        return graph.gm(*(live[f] for f in graph.state_fqns), *graph.constants, *torch.utils._pytree.tree_leaves(kwargs))[0]

    with torch.no_grad():
        assert torch.equal(run_graph(), model(**kwargs)[0])
        model.proj_out.weight.mul_(2)  # the graph holds no copy: it sees the change
        assert torch.equal(run_graph(), model(**kwargs)[0])


class _Block(torch.nn.Module):
    """Reads a loop-invariant `t` through conversions: two that change nothing (as diffusers'
    `temb.float()` on a float tensor), one that does, one forced copy."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, h, t):
        s = t.float().mean() + t.type_as(h).sum() + t.to(torch.float64).sum().float() + t.to(h.dtype, copy=True).sum()
        return h + self.lin(h) * s


class _Stack(torch.nn.Module):
    def __init__(self, glue_after: int | None = None):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(4))
        self.glue = torch.nn.Linear(4, 4)
        self.glue_after = glue_after

    def forward(self, h, t):
        for i, block in enumerate(self.blocks):
            h = block(h, t)
            if i == self.glue_after:  # code between blocks, outside any block (a face adapter)
                h = h + torch.tanh(self.glue(h))
        return h


def _captured_toy(model):
    graph = capture(model, (torch.randn(2, 3, 4), torch.randn(5)), {}, dynamic=False)
    placeholders = graph.gm.graph.find_nodes(op="placeholder")
    return graph, set(placeholders[: len(graph.state_fqns) + len(graph.constants)])


def test_capture_drops_conversions_that_change_nothing():
    """A no-op `t.float()` is recorded by export as a node that the next block's `t.float()` reads,
    so `t` looked carried from block to block; capture replaces such nodes by their input."""
    model = _Stack().eval()
    graph, weights = _captured_toy(model)
    convs = [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target._overloadpacket in (torch.ops.aten.to, torch.ops.aten.type_as)]
    assert len(convs) == 4 * 3  # per block: to float64, back to float32, and the forced copy
    assert not any(n.target is torch.ops.aten.type_as.default for n in convs)
    h, t = torch.randn(2, 3, 4), torch.randn(5)
    live = dict(model.named_parameters())
    with torch.no_grad():
        assert torch.equal(graph.gm(*(live[f] for f in graph.state_fqns), *graph.constants, h, t)[0], model(h, t))
    carried = partition(graph.gm, find_chain(graph.gm, model, weights), 1, 1, weights).carried_inputs
    assert [tuple(c.meta["val"].shape) for c in carried] == [(2, 3, 4)]  # h only, not t


@pytest.mark.parametrize("glue_after, region", [(0, "Fn"), (1, "middle"), (2, "Bn"), (3, "epilogue")])
def test_code_after_the_middles_last_block_runs_with_bn(glue_after, region):
    """The middle ends with its last block: code after it runs on cached steps too, on the carried
    values plus the residual (as the uncached model would), not inside the skipped region."""
    model = _Stack(glue_after).eval()
    graph, weights = _captured_toy(model)
    part = partition(graph.gm, find_chain(graph.gm, model, weights), 1, 1, weights)
    glue = [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.tanh.default]
    assert [part.region[n] for n in glue] == [region]


def test_optimize_keeps_state_dict_and_parameters():
    z = zoo.get("pixart")
    model = z.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = {k: p.data_ptr() for k, p in model.named_parameters()}
    dittofx.optimize(model, {"residual_diff_threshold": 0.1})
    with torch.no_grad():
        model(**z.inputs(0, 1.0))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert {k: p.data_ptr() for k, p in model.named_parameters()} == pointers


@pytest.mark.parametrize("fn, bn", [(1, 0), (1, 1), (2, 1)])
def test_partition_regions_are_ordered_and_pairs_keep_shape(fn, bn):
    z, model, graph, weights = captured("flux")
    chain = find_chain(graph.gm, model, weights)
    part = partition(graph.gm, chain, fn, bn, weights)
    order = [REGIONS.index(n.meta["dittofx_region"]) for n in graph.gm.graph.nodes if n not in part.hoisted]
    assert order == sorted(order)
    assert part.middle_outputs and all(o.meta["val"].shape == b.meta["val"].shape for o, b in part.base.items())
    # the diff is measured on the image stream (16 tokens), not the text stream (7)
    assert part.h_fn.meta["val"].shape[1] == part.h0.meta["val"].shape[1] == 16
    with pytest.raises(ValueError, match="<= the number of blocks in the chain"):
        partition(graph.gm, chain, 3, 2, weights)


def test_rewrite_puts_the_middle_inside_one_cond():
    z, model, graph, weights = captured("pixart")
    chain = find_chain(graph.gm, model, weights)
    part = partition(graph.gm, chain, 1, 1, weights)
    opts = RewriteOptions(0.1, float("inf"), 0, 1, -1, -1, "timestep")
    cached = rewrite(graph.gm, part, opts)
    conds = cached.graph.find_nodes(op="call_function", target=torch.ops.higher_order.cond)
    assert len(conds) == 1
    compute = cached.get_submodule(conds[0].args[2].target)
    middle = [n for n in graph.gm.graph.nodes if n.meta["dittofx_region"] == "middle"]
    # the middle's nodes, plus one view per output that hands it out of the cond as 1-D
    assert all(n.target is torch.ops.aten.view.default for n in compute.graph.output_node().args[0])
    assert len([n for n in compute.graph.nodes if n.op == "call_function"]) == len(middle) + len(part.middle_outputs)
    assert not any(n.meta.get("dittofx_region") == "middle" for n in cached.graph.nodes if n.op == "call_function")


def test_rewrite_passes_leave_their_input_module_as_it_was():
    """Graph in, graph out: the cond branches live on the output module, not added to the input
    (rewrite runs three times, once per decision form, on one captured module)."""
    from dittofx.passes.prune import PruneRewritePass, prunable_blocks
    from dittofx.passes.rewrite import CacheRewritePass

    z, model, graph, weights = captured("pixart")
    chain = find_chain(graph.gm, model, weights)
    part = partition(graph.gm, chain, 1, 0, weights)
    before = (graph.gm.code, dict(graph.gm.named_modules()), dict(graph.gm.named_buffers()))
    opts = RewriteOptions(0.1, float("inf"), 0, 1, -1, -1, "timestep")
    passes = [CacheRewritePass(part, opts, d) for d in ("device", "compute", "cache")]
    passes.append(PruneRewritePass(part, prunable_blocks(graph.gm, part, ()), threshold=0.1, max_warmup_steps=1,
                                   warmup_interval=1, timestep_input="timestep"))  # fmt: skip
    for p in passes:
        out = p(graph.gm).graph_module
        assert (graph.gm.code, dict(graph.gm.named_modules()), dict(graph.gm.named_buffers())) == before
        conds = out.graph.find_nodes(op="call_function", target=torch.ops.higher_order.cond)
        assert all(isinstance(out.get_submodule(c.args[k].target), torch.fx.GraphModule) for c in conds for k in (1, 2))
    assert len(conds) == len(chain) - 1  # DBPrune's: a cond per prunable block


def test_input_structure_changes_recapture_and_resolution_changes_do_not():
    z = zoo.get("flux")
    model = dittofx.optimize(z.build(), {"residual_diff_threshold": 0.0})
    reference = z.build()
    engine = model._dittofx

    def check(kwargs):
        with torch.no_grad():
            assert torch.equal(model(**kwargs)[0], reference(**kwargs)[0])

    kwargs = z.inputs(0, 1.0)
    check(kwargs)
    n_tokens = kwargs["hidden_states"].shape[1]
    bigger = dict(kwargs, hidden_states=torch.randn(1, 4 * n_tokens, kwargs["hidden_states"].shape[2]),
                  img_ids=torch.zeros(4 * n_tokens, 3))  # fmt: skip
    check(bigger)
    assert len(engine.entries) == 1  # new resolution, same graph
    check(dict(kwargs, joint_attention_kwargs={}))
    assert len(engine.entries) == 2  # a new keyword argument: captured again
    check(kwargs)
    assert len(engine.entries) == 2  # the first structure again: its graph is reused
    model.double()  # .to() after optimize keeps working: the graph reads the live parameters
    reference.double()
    check({k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()})
    assert len(engine.entries) == 3  # new dtype: captured again


@pytest.mark.parametrize("name", ["flux", "qwenimage", "wan", "pixart"])
def test_flatten_inputs_is_tree_flatten(name):
    """The pre-hook's flattening keeps a spec per keywords and value types for calls of plain values:
    the same leaves (the same objects) and an equal spec as pytree's, call after call; a call with
    containers in it (Qwen-Image's img_shapes, a dict of attention kwargs) is flattened afresh."""
    from dittofx.passes.capture import flatten_inputs

    z, specs = zoo.get(name), {}
    for step, extra in ((0, {}), (1, {}), (2, {"attention_kwargs": {"scale": 1.0}}), (3, {"attention_kwargs": None})):
        kwargs = dict(z.inputs(step, 1 - step / 4), return_dict=False, **extra)
        leaves, spec = flatten_inputs((), kwargs, specs)
        want_leaves, want_spec = torch.utils._pytree.tree_flatten(((), kwargs))
        assert spec == want_spec and len(leaves) == len(want_leaves)
        assert all(a is b for a, b in zip(leaves, want_leaves))
    plain = all(not isinstance(v, (list, tuple, dict)) for v in z.inputs(0, 1.0).values())
    assert len(specs) == (2 if plain else 0)  # the plain calls' two shapes (no attention_kwargs, and None)


def test_split_at_decision_cuts_the_device_graph_at_its_cond():
    """Graph in, graph out: the head returns its predicate first and the cache branch's outputs last
    (it runs the cache branch before the host reads the decision), so the cache tail only copies
    them; head then tail, on copies of one state, do what the device graph does (outputs and state)."""
    from dittofx.passes.split import SplitAtDecisionPass, boundary
    from dittofx.runtime.state import CacheState

    z, model, graph, weights = captured("pixart")
    chain = find_chain(graph.gm, model, weights)
    part = partition(graph.gm, chain, 1, 0, weights)
    device = rewrite(graph.gm, part, RewriteOptions(0.1, float("inf"), 0, 1, -1, -1, "timestep"))
    head, compute, cache = (SplitAtDecisionPass(side)(device).graph_module for side in ("head", "compute", "cache"))
    (cond,) = device.graph.find_nodes(op="call_function", target=torch.ops.higher_order.cond)
    assert boundary(device)[0] is cond.args[0]
    for gm in (head, compute, cache):
        assert not gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.cond)
        assert not [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert {n.target for n in cache.graph.nodes if n.op == "call_function"} == {torch.ops.aten.clone.default}
    from dittofx.runtime import gates

    assert {gates.forecast, gates.finish_step} <= {n.target for n in head.graph.nodes if n.op == "call_function"}

    def fresh_state():
        p, h = part.h_fn.meta["val"], part.middle_outputs[0].meta["val"]
        return CacheState(torch.zeros(p.shape), [torch.zeros(h.shape)], 1, 4, None)

    live = [model.get_parameter(f) if f in dict(model.named_parameters()) else model.get_buffer(f) for f in graph.state_fqns]
    decisions = []
    with torch.no_grad():
        whole, split = fresh_state(), fresh_state()
        for s in range(4):
            inputs = [*live, *graph.constants, *torch.utils._pytree.tree_leaves(z.inputs(s, 1 - s / 4))]
            want = device(*whole.tensors(), *inputs)
            out = head(*split.tensors(), *inputs)
            decisions.append(bool(out[0]))
            got = (cache if out[0] else compute)(*split.tensors(), *inputs, *out)
            for a, b in zip(got, want):
                assert torch.equal(a, b)
            for a, b in zip(split.tensors(), whole.tensors()):
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert decisions[0] is False and True in decisions  # step 0 computes; a later step caches


def test_imports_where_torch_names_the_hint_size_hint():
    """torch 2.11 (the GPU image; pyproject allows it) has `size_hint` where 2.13 has
    `optimization_hint`: the first H100 call of 2026-11-23 failed at `import dittofx` until the
    passes took either. 2.11's layout is rebuilt here (the one name, under the old spelling)."""
    import subprocess
    import sys

    code = (
        "import torch.fx.experimental.symbolic_shapes as s; s.size_hint = s.optimization_hint; del s.optimization_hint; "
        "import dittofx; "
        "from dittofx.patterns.chain import int_hint; assert int_hint is s.size_hint and int_hint(5, fallback=1) == 5"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_prune_rewrite_runs_every_block_at_threshold_zero_and_prunes_all_past_any_threshold():
    """DBPrune's pass on its own (graph in, graph out): at threshold 0 the rewritten graph is the
    captured one; past any threshold, a step whose inputs repeat the last computed step's prunes
    every prunable block and serves each as its input plus its stored residual."""
    from dittofx.passes.prune import PruneRewritePass, prunable_blocks
    from dittofx.runtime.state import CacheState

    z, model, graph, weights = captured("pixart")
    chain = find_chain(graph.gm, model, weights)
    part = partition(graph.gm, chain, 1, 0, weights)
    blocks = prunable_blocks(graph.gm, part, ())
    assert [b.index for b in blocks] == list(range(1, len(chain)))
    live = [model.get_parameter(f) if f in dict(model.named_parameters()) else model.get_buffer(f) for f in graph.state_fqns]
    inputs = [*live, *graph.constants, *torch.utils._pytree.tree_leaves(z.inputs(0, 1.0))]
    with torch.no_grad():
        want = graph.gm(*inputs)
        for threshold, pruned in ((0.0, 0), (1e9, len(blocks))):
            gm = PruneRewritePass(part, blocks, threshold=threshold, max_warmup_steps=1, warmup_interval=1,
                                  timestep_input="timestep")(graph.gm).graph_module  # fmt: skip
            carried = [torch.zeros(o.meta["val"].shape) for b in blocks for o in b.outputs]
            state = CacheState(torch.zeros(part.h_fn.meta["val"].shape), carried, 1, 4, None, p_slots=len(blocks), norms=True)
            first, second = gm(*state.tensors(), *inputs), gm(*state.tensors(), *inputs)
            assert state.hist_cached[:2].tolist() == [0, pruned]
            assert torch.equal(first[0], want[0])
            if pruned:
                torch.testing.assert_close(second[0], want[0])
            else:
                assert torch.equal(second[0], want[0])
    with pytest.raises(ValueError, match=r"non_prune_block_ids=\[%d\]: \[%d\] past the chain" % (len(chain), len(chain))):
        prunable_blocks(graph.gm, part, (len(chain),))
    with pytest.raises(ValueError, match="no block of the .* in the chain is left to prune"):
        prunable_blocks(graph.gm, part, tuple(range(len(chain))))


def test_cond_operands_remake_size_arithmetic_from_tensors_and_refuse_other_floats():
    """torch.cond takes no float operand, and a SymInt operand can fail in inductor (duck sizing):
    sizes and arithmetic on them are made again inside the branch from the tensors they start from;
    a float from anything else cannot be, and is refused."""
    import operator

    from dittofx.passes.sizes import cond_operands

    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.zeros(2, 3)
    n = g.call_function(torch.ops.aten.sym_size.int, (x, 1))
    n.meta["val"] = 3
    area = g.call_function(operator.mul, (n, n))
    area.meta["val"] = 9
    inv = g.call_function(operator.pow, (area, -0.5))
    inv.meta["val"] = 9**-0.5
    scale = g.call_function(operator.mul, (0.25, inv))
    scale.meta["val"] = 0.25 * 9**-0.5
    recipe, operands = cond_operands([scale, x])
    assert recipe == [n, area, inv, scale] and operands == [x]
    item = g.call_function(torch.ops.aten.item.default, (x,))
    item.meta["val"] = 0.5
    with pytest.raises(ValueError, match="a float made by an op that is no size arithmetic"):
        cond_operands([item])


def test_a_controlnet_residual_added_after_the_blocks_keeps_the_chain_whole():
    """FLUX ControlNet adds a model input to the stream after each block, the last double block's
    too: an injected residual, not a fresh stream joining, so the single blocks stay in the chain
    (and in the middle); at threshold 0 the optimized model equals the plain one."""
    z = zoo.get("flux")
    model = z.build()
    g = torch.Generator().manual_seed(3)
    kwargs = z.inputs(0, 1.0)
    shape = (*kwargs["hidden_states"].shape[:2], model.config.num_attention_heads * model.config.attention_head_dim)
    kwargs["controlnet_block_samples"] = [0.1 * torch.randn(shape, generator=g) for _ in model.transformer_blocks]
    kwargs["controlnet_single_block_samples"] = [0.1 * torch.randn(shape, generator=g) for _ in model.single_transformer_blocks]
    graph = capture(model, (), kwargs, dynamic=False)
    chain = find_chain(graph.gm, model, set(graph.weight_placeholders()))
    assert tuple(chain.lists) == ("transformer_blocks", "single_transformer_blocks")
    optimized = dittofx.optimize(z.build(), {"residual_diff_threshold": 0.0})
    with torch.no_grad():
        assert torch.equal(optimized(**kwargs)[0], model(**kwargs)[0])
    assert "single_transformer_blocks" in dittofx.explain(optimized).split("middle = ")[1].splitlines()[0]


def _flux_controlnet_call(model, tokens: int, seed: int) -> dict:
    """A FLUX transformer call as FluxControlNetPipeline makes it: its keyword arguments in another
    order than the forward's signature, the ControlNet's residual lists among them."""
    g = torch.Generator().manual_seed(seed)
    text, inner = 7, model.config.num_attention_heads * model.config.attention_head_dim
    return dict(
        hidden_states=torch.randn(1, tokens, model.config.in_channels, generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=g),
        encoder_hidden_states=torch.randn(1, text, model.config.joint_attention_dim, generator=g),
        controlnet_block_samples=[0.1 * torch.randn(1, tokens, inner, generator=g) for _ in model.transformer_blocks],
        controlnet_single_block_samples=[0.1 * torch.randn(1, tokens, inner, generator=g) for _ in model.single_transformer_blocks],
        txt_ids=torch.zeros(text, 3),
        img_ids=torch.randn(tokens, 3, generator=g),
        joint_attention_kwargs=None,
        return_dict=False,
    )


def test_keyword_arguments_out_of_the_signatures_order_keep_dims_symbolic():
    """torch.export matches a tuple of dim specs to the forward's parameters in the signature's
    order in one place and in the call's order in another: such a call (FLUX ControlNet's pipeline)
    failed the symbolic export and got a static capture, a capture per resolution. The specs go by
    parameter name: one symbolic graph, right at another number of tokens."""
    model = zoo.get("flux").build()
    first, other = _flux_controlnet_call(model, 16, seed=1), _flux_controlnet_call(model, 36, seed=2)
    graph = capture(model, (), first)
    names = [n.name for n in graph.user_placeholders()]
    assert graph.dynamic_dims[names.index("hidden_states")] == (1,)  # tokens, as for in-order calls
    live = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        got = graph.gm(*(live[f] for f in graph.state_fqns), *graph.constants, *torch.utils._pytree.tree_leaves(other))[0]
        torch.testing.assert_close(got, model(**other)[0], rtol=1e-5, atol=1e-5)


def test_the_same_keywords_in_another_order_share_one_graph():
    """Two pipelines sharing a transformer may pass its keywords in other orders: the pre-hook puts
    them in the forward's order, so one graph serves both (it was a capture per order)."""
    z = zoo.get("flux")
    plain = z.build()
    model = dittofx.optimize(z.build(), {"residual_diff_threshold": 0.0, "max_warmup_steps": 0, "num_inference_steps": 2})
    with torch.no_grad():
        for reverse in (False, True, False):
            for s in range(2):
                kwargs = z.inputs(s, 1 - s / 2)
                if reverse:
                    kwargs = dict(reversed(list(kwargs.items())))
                assert torch.equal(model(**kwargs, return_dict=False)[0], plain(**kwargs, return_dict=False)[0])
    assert len(model._dittofx.entries) == 1
    # captured at optimize from keywords in another order: the same graph serves the calls
    reversed_example = ((), dict(reversed([*z.inputs(0, 1.0).items(), ("return_dict", False)])))
    model = dittofx.optimize(z.build(), {"residual_diff_threshold": 0.0, "num_inference_steps": 2}, example_inputs=reversed_example)
    with torch.no_grad():
        model(**z.inputs(0, 1.0), return_dict=False)
    assert len(model._dittofx.entries) == 1


def test_a_failed_export_passes_on_what_it_printed_but_its_partial_graph(monkeypatch, capsys):
    """What the forward prints while export traces it (a deprecation notice) reaches stderr; the
    partial graph torch prints for a failed export does not."""
    import sys

    from dittofx.passes.capture import _export

    def failing_export(*args, **kwargs):
        print("the forward's own notice", file=sys.stderr)
        err = RuntimeError("data-dependent")
        err.partial_fx_graph = "def forward(self, x):\n    return x"
        print(err.partial_fx_graph, file=sys.stderr)
        raise err

    monkeypatch.setattr(torch.export, "export", failing_export)
    with pytest.raises(RuntimeError, match="data-dependent"):
        _export(torch.nn.Linear(2, 2), (torch.randn(1, 2),), {}, shapes=None)
    err = capsys.readouterr().err
    assert "the forward's own notice" in err and "def forward" not in err


class HintAddedToEmbedding(torch.nn.Module):
    """A hint list whose output is added, at the stream's shape, to the freshly embedded image: a
    stream joining (the image is new there), not a residual injected into the hint's stream."""

    class Block(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.proj, self.t = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

        def forward(self, h, temb):
            return h + torch.tanh(self.proj(h) + self.t(temb)[:, None])

    def __init__(self, d=16):
        super().__init__()
        self.x_in, self.c_in, self.t_in, self.out = (torch.nn.Linear(4, d), torch.nn.Linear(4, d), torch.nn.Linear(1, d),
                                                     torch.nn.Linear(d, 4))  # fmt: skip
        self.hint_blocks = torch.nn.ModuleList(self.Block(d) for _ in range(2))
        self.blocks = torch.nn.ModuleList(self.Block(d) for _ in range(4))

    def forward(self, x, hint, timestep):
        temb = self.t_in(timestep.reshape(-1, 1))
        c = self.c_in(hint)
        for block in self.hint_blocks:
            c = block(c, temb)
        h = self.x_in(x) + c
        for block in self.blocks:
            h = block(h, temb)
        return self.out(h)


def test_an_embedded_input_added_to_a_lists_output_keeps_that_list_out_of_the_chain():
    model = HintAddedToEmbedding()
    graph = capture(model, (), dict(x=torch.randn(1, 8, 4), hint=torch.ones(1, 8, 4), timestep=torch.ones(1)), dynamic=False)
    assert find_chain(graph.gm, model, set(graph.weight_placeholders())).lists == ["blocks"]
