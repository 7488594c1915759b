"""Changes a captured graph cannot see (dittofx/runtime/structure.py): a LoRA loaded, switched,
fused or removed after the first call, a block or a layer swapped, an attention processor set.
Each is checked at threshold 0 (every step computes) against a plain model given the same
changes: SPEC §1 makes the outputs bitwise equal, so a stale graph shows as any difference."""

import logging

import pytest
import torch
from peft import LoraConfig

import dittofx
import zoo

CFG = {"residual_diff_threshold": 0.0, "max_warmup_steps": 0, "num_inference_steps": 2}
LORA = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out"], init_lora_weights=False)


def request(model, z, steps: int = 2) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**z.inputs(s, 1 - s / steps), return_dict=False)[0] for s in range(steps)]


def add_lora(model, name: str, seed: int) -> None:
    """An adapter with the same random (non-zero) weights in every model it is added to."""
    model.add_adapter(LORA, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if ".lora_" in n and f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


class HalfOutput:
    """A user's attention processor: the default one, its output halved."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return tuple(o * 0.5 for o in out) if isinstance(out, tuple) else out * 0.5


def half_output(model) -> None:
    model.set_attn_processor({name: HalfOutput(p) for name, p in model.attn_processors.items()})


def other_block(model, name: str, blocks: str, i: int) -> None:
    """Block i of `blocks` replaced by a new one, with other weights (from zoo model `name`)."""
    block = getattr(zoo.get(name).build(), blocks)[i]
    with torch.no_grad():
        for p in block.parameters():
            p.mul_(0.9)
    getattr(model, blocks)[i] = block


CHANGES = {  # each runs on both models, in order; a request after each
    "lora": [
        ("add an adapter", lambda m: add_lora(m, "a", 1)),
        ("set_adapters weight 0.5", lambda m: m.set_adapters(["a"], weights=[0.5])),
        ("a second adapter, both on", lambda m: (add_lora(m, "b", 2), m.set_adapters(["a", "b"], weights=[1.0, 0.7]))),
        ("disable_adapters", lambda m: m.disable_adapters()),
        ("enable_adapters", lambda m: m.enable_adapters()),
        ("fuse_lora", lambda m: m.fuse_lora()),
        ("unfuse_lora", lambda m: m.unfuse_lora()),
        ("delete_adapters", lambda m: m.delete_adapters(["a", "b"])),
    ],
    "processor": [("set_attn_processor", half_output)],
    "swap": [
        ("a block", lambda m: other_block(m, "flux", "transformer_blocks", 1)),
        ("a linear layer", lambda m: setattr(m.single_transformer_blocks[0], "proj_out", torch.nn.Linear(*m.single_transformer_blocks[0].proj_out.weight.shape[::-1]))),
    ],
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(CHANGES))
def test_a_change_after_the_first_call_is_run_as_the_plain_model_runs_it(kind, caplog):
    z = zoo.get("flux")
    plain, optimized = z.build(), dittofx.optimize(z.build(), CFG)
    steps = [("nothing", None), *CHANGES[kind]]
    for what, change in steps:
        for model in (plain, optimized) if change else ():
            torch.manual_seed(0)  # the layers a change makes
            change(model)
        with caplog.at_level(logging.WARNING, logger="dittofx"):
            got, want = request(optimized, z), request(plain, z)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), (what, max((g - w).abs().max().item() for g, w in zip(got, want)))
    assert "changed since its graph was captured" in caplog.text


def test_a_block_swapped_on_the_block_by_block_path_is_wrapped_again():
    """Lumina2 runs block by block, with wrappers on the blocks it found: a new block needs its own."""
    z = zoo.get("lumina2")
    cfg = {"residual_diff_threshold": 0.5, "max_warmup_steps": 1, "num_inference_steps": 8}
    reference, optimized = dittofx.optimize(z.build(), cfg), dittofx.optimize(z.build(), cfg)
    request(optimized, z, 8)
    for model in (reference, optimized):
        other_block(model, "lumina2", "layers", 2)
    want, got = request(reference, z, 8), request(optimized, z, 8)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert dittofx.summary(optimized)[0].cached_steps == dittofx.summary(reference)[0].cached_steps != []


@pytest.mark.parametrize("capture", ["at the first call", "at optimize"])
def test_nothing_changed_keeps_the_graph(capture, caplog):
    """Nor does dittofx's own submodule (its states), added after a capture at optimize."""
    z = zoo.get("flux")
    model = z.build()
    add_lora(model, "a", 1)  # before the capture: in it
    example = ((), {**z.inputs(0, 1.0), "return_dict": False}) if capture == "at optimize" else None  # as request() calls it
    dittofx.optimize(model, CFG, example_inputs=example)
    request(model, z)
    graph = model._dittofx.entries[0]
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        for _ in range(3):
            request(model, z)
    assert model._dittofx.entries == [graph] and "changed since" not in caplog.text


@pytest.mark.parametrize("how", ["del", "insert"])
def test_a_block_deleted_or_inserted_is_run_as_the_plain_model_runs_it(how, caplog):
    """ModuleList's del and insert register nothing: the chain's blocks are compared at a request's start."""
    z = zoo.get("pixart")
    plain, optimized = z.build(), dittofx.optimize(z.build(), CFG)
    request(optimized, z)
    for model in (plain, optimized):
        blocks = model.transformer_blocks
        if how == "del":
            del blocks[2]
        else:
            blocks.insert(0, blocks[1])
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        got, want = request(optimized, z), request(plain, z)
    assert all(torch.equal(g, w) for g, w in zip(got, want)) and "blocks added to or removed" in caplog.text


def test_a_deep_copy_on_the_block_by_block_path_sees_a_block_swapped(caplog):
    """The copy keeps its wrapped blocks (no second fallback) and watches them from its first call."""
    import copy

    z = zoo.get("lumina2")
    cfg = {"residual_diff_threshold": 0.5, "max_warmup_steps": 1, "num_inference_steps": 8}
    reference, original = dittofx.optimize(z.build(), cfg), dittofx.optimize(z.build(), cfg)
    request(original, z, 8)
    duplicate = copy.deepcopy(original)
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        request(duplicate, z, 8)
    assert "changed since" not in caplog.text
    for model in (reference, duplicate):
        other_block(model, "lumina2", "layers", 2)
    want, got = request(reference, z, 8), request(duplicate, z, 8)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_an_export_between_a_switch_and_the_next_call_leaves_the_switch_seen():
    """dittofx.export captures the model as it is now, apart from the engine's graphs: the engine
    still sees that its own graphs predate the switch."""
    z = zoo.get("flux")
    plain, optimized = z.build(), dittofx.optimize(z.build(), CFG)
    request(optimized, z)
    for model in (plain, optimized):
        half_output(model)
    dittofx.export(optimized, ((), z.inputs(0, 1.0)))
    got, want = request(optimized, z), request(plain, z)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


class CastingDiT(torch.nn.Module):
    """A user's DiT that casts its inputs to its weights' dtype (as SANA-WM does), with dropout
    (a user's module starts in train mode), taking its timestep as a tensor or a Python number."""

    def __init__(self, d: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.proj_in, self.t_embed, self.proj_out = torch.nn.Linear(4, d), torch.nn.Linear(1, d), torch.nn.Linear(d, 4)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Tanh(), torch.nn.Dropout(0.5)) for _ in range(4))

    def forward(self, x, timestep):
        dtype = self.proj_in.weight.dtype
        h = self.proj_in(x.to(dtype))
        h = h + self.t_embed(torch.as_tensor(timestep, dtype=dtype).reshape(-1, 1))[:, None]
        for block in self.blocks:
            h = h + block(h)
        return self.proj_out(h)


def casting_inputs(step: int, as_number: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    base, drift = torch.randn(1, 8, 4, generator=g), torch.randn(1, 8, 4, generator=g)
    t = 1000.0 * (1 - step / 4)
    return {"x": base + 0.02 * step * drift, "timestep": t if as_number else torch.full((1,), t)}


@pytest.mark.parametrize("change", ["weights' dtype", "weights assigned in another dtype", "autocast", "train to eval"])
def test_what_a_capture_bakes_in_besides_the_inputs_gets_a_graph_of_its_own(change):
    """The weights' dtype (with the inputs' unchanged: the forward casts them; cast in place or
    new tensors assigned: load_state_dict(assign=True)), autocast and train mode (dropout) are
    baked into a capture: after one changes, the model runs as the plain one."""
    model, plain = dittofx.optimize(CastingDiT(), CFG), CastingDiT().eval()
    if change != "train to eval":  # a user's module starts in train mode: its first call may come before .eval()
        model.eval()
    with torch.no_grad():
        model(**casting_inputs(0))
        if change == "weights' dtype":
            model.to(torch.bfloat16), plain.to(torch.bfloat16)
        if change == "weights assigned in another dtype":
            plain.to(torch.bfloat16)
            model.load_state_dict(plain.state_dict(), assign=True)
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=change == "autocast"):
            for s in range(1, 3):
                assert torch.equal(model(**casting_inputs(s)), plain(**casting_inputs(s)))
    assert len(model._dittofx.entries) == 2


def test_a_cast_after_the_first_module_was_replaced_gets_a_graph_of_its_own():
    """The weights' dtype is read from the model as it is now: after the module holding the first
    weight was replaced (same weights), a cast still captures again (helper-54: a cached owner dict
    kept the replaced module's float32 weight, and the graph raised a dtype mismatch)."""
    model, plain = dittofx.optimize(CastingDiT(), CFG).eval(), CastingDiT().eval()
    with torch.no_grad():
        model(**casting_inputs(0))
        replaced = torch.nn.Linear(4, 16)
        replaced.load_state_dict(model.proj_in.state_dict())
        model.proj_in = replaced
        assert torch.equal(model(**casting_inputs(1)), plain(**casting_inputs(1)))
        model.to(torch.bfloat16), plain.to(torch.bfloat16)
        assert torch.equal(model(**casting_inputs(2)), plain(**casting_inputs(2)))


def test_a_timestep_given_as_a_python_number_is_no_timestep_to_watch(caplog):
    """A Python number is baked into the graph (one capture per value, said once), not read as the
    timestep: no crash in the gates; outputs as the plain model's at threshold 0."""
    model, plain = dittofx.optimize(CastingDiT().eval(), CFG), CastingDiT().eval()
    with caplog.at_level(logging.WARNING, logger="dittofx"), torch.no_grad():
        for s in range(3):
            assert torch.equal(model(**casting_inputs(s, as_number=True)), plain(**casting_inputs(s, as_number=True)))
    assert caplog.text.count("a Python-number input of CastingDiT changed value (1000.0 -> 750.0)") == 1


class IntScaled(torch.nn.Module):
    """Takes an int that scales its input (a step index, say): export keeps it symbolic."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x, step: int):
        h = x * (1 + step / 100)
        for block in self.blocks:
            h = h + block(h)
        return h


def test_an_int_changing_every_call_stays_symbolic_and_its_check_is_said(caplog):
    """An int changing at every call is one symbolic graph, but each new value is checked against
    the model's own forward (a run of it per call): said once."""
    torch.manual_seed(0)
    plain = IntScaled()
    model = dittofx.optimize(IntScaled(), CFG)
    model.load_state_dict(plain.state_dict())
    x = torch.randn(1, 8, 4)
    with caplog.at_level(logging.WARNING, logger="dittofx"), torch.no_grad():
        for s in range(3):
            assert torch.equal(model(x, s + 5), plain(x, s + 5))
    assert len(model._dittofx.entries) == 1 and model._dittofx.entries[0].captured.dynamic_dims[1] == ()
    assert caplog.text.count("a Python-number input of IntScaled changed value (5 -> 6) with no tensor size changing: the graph keeps it symbolic") == 1


def test_blocks_compiled_on_their_own_are_said_to_compile_nothing(caplog):
    """diffusers' regional compile (compile_repeated_blocks) compiles the block modules, which the
    rewritten graph never calls: said once, naming torch.compile(model)."""
    z = zoo.get("flux")
    model = dittofx.optimize(z.build(), CFG)
    model.compile_repeated_blocks(fullgraph=True)
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        request(model, z)
    said = [r.getMessage() for r in caplog.records if "compiled on their own" in r.getMessage()]
    assert len(said) == 1 and "transformer_blocks, single_transformer_blocks" in said[0] and "torch.compile(model" in said[0]


def test_inputs_with_no_graph_after_others_had_one_run_uncached(caplog, monkeypatch):
    """PixArt under autocast after calls without: the capture under autocast cannot pair its middle
    (mixed dtypes), so those calls run as the model's own forward, said once and tried once; the
    calls without autocast keep their graph."""
    z = zoo.get("pixart")
    model, plain = dittofx.optimize(z.build(), CFG), z.build()
    engine = model._dittofx
    builds = []
    real_build = type(engine)._build
    monkeypatch.setattr(type(engine), "_build", lambda self, *a, **k: builds.append(1) or real_build(self, *a, **k))
    request(model, z)
    with caplog.at_level(logging.WARNING, logger="dittofx"), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            assert all(torch.equal(a, b) for a, b in zip(request(model, z), request(plain, z)))
    assert caplog.text.count("inputs with no graph to rewrite, while earlier ones had: they run uncached") == 1
    assert len(builds) == 2 and len(engine.entries) == 1
    assert all(torch.equal(a, b) for a, b in zip(request(model, z), request(plain, z)))
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # the uncached forward traces too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(torch.equal(a, b) for a, b in zip(request(compiled, z), request(plain, z)))
    half_output(model)  # a structure change forgets which inputs could not be captured
    request(model, z)
    assert not engine.uncapturable


def test_an_uncached_call_ends_its_branchs_request():
    """Uncached calls run no state: the branch's request ends there, so the next cached call starts
    a fresh one (never goes on from the earlier steps' residuals), and CFG parity still counts them.
    Expected: the request after as on a model that never saw the first."""
    z = zoo.get("pixart")
    cfg = {"residual_diff_threshold": 1e9, "max_warmup_steps": 1, "num_inference_steps": 4}
    model, fresh = dittofx.optimize(z.build(), cfg), dittofx.optimize(z.build(), cfg)
    with torch.no_grad():
        for s in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s >= 2):
                model(**z.inputs(s, 1 - s / 4))
    got, want = request(model, z, 4), request(fresh, z, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert dittofx.summary(model)[0].cached_steps == dittofx.summary(fresh)[0].cached_steps == [1, 2, 3]
    parity = dittofx.optimize(z.build(), dict(cfg, enable_separate_cfg=True))
    with torch.no_grad():
        for s in range(2):
            for branch in ("cond", "uncond"):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s == 1 and branch == "cond"):
                    parity(**z.inputs(s, 1 - s / 4))
    assert parity._dittofx.calls == 4 and parity._dittofx.host == {"uncond": (2, True)}


def test_a_processor_in_a_kept_graphs_fingerprint_stays_alive():
    """Processors are fingerprinted by identity: one freed while a (kept) graph's fingerprint names
    it could have its address reused by a new processor, which would then take back a stale graph.
    The graphs hold them, so that cannot happen."""
    import gc
    import weakref

    z = zoo.get("flux")
    model = dittofx.optimize(z.build(), CFG)
    half_output(model)
    request(model, z)
    first = weakref.ref(next(m.processor for m in model.modules() if hasattr(m, "processor")))
    model.set_attn_processor({name: p.inner for name, p in model.attn_processors.items()})
    request(model, z)  # the half-output graphs are kept for a switch back
    gc.collect()
    assert first() is not None


def test_switching_adapters_back_takes_the_graphs_of_that_switch_back(monkeypatch):
    """set_adapters A -> B -> A -> B ...: each switch's graphs are captured once and kept, so under
    torch.compile(fullgraph=True) nothing recompiles after the first round (every switch compiled
    anew ran into dynamo's recompile limit after ~30 switches); outputs as the plain model's. A
    module registered anew (another adapter added) drops them all."""
    z = zoo.get("flux")
    plain, model = z.build(), dittofx.optimize(z.build(), CFG)
    for m in (plain, model):
        add_lora(m, "a", 1), add_lora(m, "b", 2)
    engine = model._dittofx
    builds, compiles = [], []
    real_build = type(engine)._build
    monkeypatch.setattr(type(engine), "_build", lambda self, *a, **k: builds.append(1) or real_build(self, *a, **k))
    compiled = torch.compile(model, fullgraph=True, backend=lambda gm, _: compiles.append(1) or gm.forward)
    after_round = None
    for r, adapter in enumerate("ababab"):
        for m in (plain, model):
            m.set_adapters(adapter)
        assert all(torch.equal(g, w) for g, w in zip(request(compiled, z), request(plain, z))), r
        if r == 1:
            after_round = (len(builds), len(compiles))
    assert after_round == (len(builds), len(compiles)) and len(builds) == 2
    for m in (plain, model):
        add_lora(m, "c", 3)
        m.set_adapters("a")
    assert all(torch.equal(g, w) for g, w in zip(request(compiled, z), request(plain, z)))
    assert len(builds) == 3 and not engine._shelf


def test_sizes_given_as_numbers_are_said_to_make_a_graph_per_resolution(caplog):
    """NucleusMoE-Image takes its image grid as Python ints (`img_shapes`) and keys an lru_cache on
    them, so they cannot stay symbolic (Qwen-Image's do: test_recompiles): each resolution is a
    capture of its own (and under torch.compile a compile: dynamo's limit runs out after ~30),
    said once."""
    z = zoo.get("nucleusmoe_image")
    model, plain = dittofx.optimize(z.build(), CFG), z.build()
    with caplog.at_level(logging.WARNING, logger="dittofx"), torch.no_grad():
        for side in (4, 6, 8):
            kwargs = dict(z.inputs(0, 1.0), img_shapes=[(1, side, side)])
            kwargs["hidden_states"] = torch.randn(1, side * side, kwargs["hidden_states"].shape[-1])
            assert torch.equal(model(**kwargs, return_dict=False)[0], plain(**kwargs, return_dict=False)[0])
    assert len(model._dittofx.entries) == 3
    assert caplog.text.count("a Python-number input of NucleusMoEImageTransformer2DModel changed value (4 -> 6, 4 -> 6)") == 1
    assert caplog.text.count("a Python-number input") == 1


def scaled_output(forward):
    """A user's wrapper of a model's forward: its output halved."""

    def wrapped(*args, **kwargs):
        out = forward(*args, **kwargs)
        return (out[0] * 0.5, *out[1:])

    return wrapped


def test_a_forward_wrapped_after_optimize_is_served_and_left_in_place_by_disable(caplog):
    z = zoo.get("pixart")
    plain, optimized = z.build(), dittofx.optimize(z.build(), CFG)
    plain.forward, optimized.forward = scaled_output(plain.forward), scaled_output(optimized.forward)
    want = request(plain, z)
    assert all(torch.equal(g, w) for g, w in zip(request(optimized, z), want))
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        dittofx.disable(optimized)
    assert "forward was replaced after dittofx.optimize" in caplog.text
    assert all(torch.equal(g, w) for g, w in zip(request(optimized, z), want))  # the wrapper kept, the model's own inside
    dittofx.optimize(optimized, CFG)  # the kept wrapper, around the first dittofx forward, is saved by this one
    assert all(torch.equal(g, w) for g, w in zip(request(optimized, z), want))  # (was: RecursionError)
    assert dittofx.summary(optimized)[0].computed_steps == [0, 1]


def test_a_forward_called_directly_runs_uncached_and_counts_no_step(caplog):
    """model.forward(...) skips the module's call and so dittofx's pre-hook: it runs as the model's
    own forward (said once), and the module calls' step count goes on as if it had not happened
    (it ran the latest module call's graph on a count it did not advance)."""
    z = zoo.get("pixart")
    cfg = {"residual_diff_threshold": 0.2, "max_warmup_steps": 1, "num_inference_steps": 6}
    model, reference, plain = dittofx.optimize(z.build(), cfg), dittofx.optimize(z.build(), cfg), z.build()
    with torch.no_grad():
        for s in range(6):
            x = z.inputs(s, 1 - s / 6)
            assert torch.equal(model(**x)[0], reference(**x)[0])
            if s in (2, 3):
                assert torch.equal(model.forward(**x)[0], plain(**x)[0])
    assert dittofx.summary(model)[0].cached_steps == dittofx.summary(reference)[0].cached_steps != []
    assert caplog.text.count("was called directly") == 1
    with pytest.raises(Exception, match="compile the module itself"), torch.no_grad():  # fullgraph cannot hold it
        torch.compile(model.forward, fullgraph=True, backend="eager")(**z.inputs(0, 1.0))


def test_offload_hooks_added_after_optimize_are_refused_and_undo_it(caplog):
    """accelerate's offload wraps forward and loads the weights inside the wrapper, after the
    pre-hook gathered them (they are on "meta" till then): refused with what to do."""
    from accelerate import cpu_offload

    z = zoo.get("pixart")
    plain, optimized = z.build(), dittofx.optimize(z.build(), CFG)
    cpu_offload(plain, execution_device=torch.device("cpu"))
    cpu_offload(optimized, execution_device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="wrapped after dittofx.optimize by hooks that move its weights"):
        with caplog.at_level(logging.WARNING, logger="dittofx"):
            request(optimized, z)
    assert "failed in dittofx (RuntimeError: dittofx: PixArtTransformer2DModel.forward was wrapped" in caplog.text
    assert "so dittofx.optimize was undone" in caplog.text
    assert not hasattr(optimized, "_dittofx")
    assert all(torch.equal(g, w) for g, w in zip(request(optimized, z), request(plain, z)))


def test_a_cast_to_the_dtype_the_model_has_keeps_the_states_bookkeeping():
    """`pipe.to(device, dtype)` before every request, the model already in that dtype, keeps its
    state (the residuals' dtype did not change): the counters, diff sums and history stay fp32 and
    ints, so the diffs are those of a model never cast again (they were stored in bf16; helper-58)."""
    z = zoo.get("flux")
    cfg = {"residual_diff_threshold": 0.3, "max_warmup_steps": 1, "num_inference_steps": 4, "enable_taylorseer": True}
    recast, plain = (dittofx.optimize(z.build().to(torch.bfloat16), cfg) for _ in range(2))
    inputs = [{k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
               for k, v in z.inputs(s, 1 - s / 4).items()} for s in range(4)]  # fmt: skip
    with torch.no_grad():
        for kw in inputs:
            recast.to(torch.bfloat16)
            got, want = recast(**kw)[0], plain(**kw)[0]
            assert torch.equal(got, want)
    dtypes = {n: t.dtype for n, t in recast._dittofx_states.named_buffers()}
    assert dtypes == {n: t.dtype for n, t in plain._dittofx_states.named_buffers()}
    assert dtypes["default.acc"] == dtypes["default.last_ts"] == dtypes["default.hist_diff"] == torch.float32
    diffs = [torch.tensor(dittofx.summary(m, log_table=False)[0].diffs) for m in (recast, plain)]
    torch.testing.assert_close(*diffs, rtol=0, atol=0, equal_nan=True)


def test_a_model_moved_to_meta_and_back_starts_its_state_over():
    """`to("meta")` then `to_empty` (weights loaded again): the cache state would hold whatever the
    memory held (7s here, as if so); it is dropped, and the next request runs as on a new model."""
    z = zoo.get("flux")
    cfg = {"residual_diff_threshold": 0.3, "max_warmup_steps": 1, "num_inference_steps": 4}
    weights = z.build().state_dict()
    fresh, moved = dittofx.optimize(z.build(), cfg), dittofx.optimize(z.build(), cfg)
    request(moved, z, 4)
    moved.to("meta")
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in z.inputs(0, 1.0).items()}
    with torch.no_grad():
        assert moved(**meta, return_dict=False)[0].is_meta  # (no autocast on "meta" to ask about)
    moved.to_empty(device="cpu")
    for buffer in moved._dittofx_states.buffers():
        buffer.fill_(7)
    moved.load_state_dict(weights)
    for _ in range(2):  # (a 7 as the request length would run the second request on as steps 4-7)
        got, want = request(moved, z, 4), request(fresh, z, 4)
        assert dittofx.summary(moved, log_table=False)[0].cached_steps == dittofx.summary(fresh, log_table=False)[0].cached_steps
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_pickling_an_optimized_model_says_what_to_save_instead():
    import io
    import pickle

    z = zoo.get("pixart")
    model = dittofx.optimize(z.build(), CFG)
    for captured in (False, True):  # before the first call, and with graphs captured
        if captured:
            request(model, z)
        for save in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):
            with pytest.raises(TypeError, match="cannot be pickled .* save_pretrained are unchanged by optimize"):
                save(model)
    dittofx.disable(model)
    pickle.loads(pickle.dumps(model))


def test_a_step_is_given_the_weights_its_graph_reads_as_they_are_now():
    """The pre-hook gathers only the leading inputs (state, weights, constants) the step's graph
    reads, None in the other places: a cache step reads few of the middle's weights, and gathering
    them all cost ~60 us a cached step (wan-cpu). A weight replaced by a new Parameter between
    requests (load_state_dict(assign=True) does it) is read as it is now, with no capture again."""
    z = zoo.get("flux")
    mask = {"steps_computation_mask": [1, 1, 0, 1, 0, 0], "steps_computation_policy": "static", "max_warmup_steps": 0}
    model, seen = dittofx.optimize(z.build(), {**CFG, **mask, "num_inference_steps": 6}), {}

    def given(*_):
        if model._dittofx.capturing:
            return
        graph, entry, leading = model._dittofx.current
        name = next(k for k, g in entry.graphs.items() if g is graph)
        everything = [*model._dittofx.states["default"].tensors(), *entry.live_state(), *entry.captured.constants]
        reads = [bool(p.users) for p in graph.graph.find_nodes(op="placeholder")[: len(everything)]]
        seen[name] = ([x is not None for x in leading] == reads, all(x is y for x, y in zip(leading, everything) if x is not None), reads.count(False))

    model.register_forward_hook(given)
    request(model, z, steps=6)
    assert seen.keys() == {"compute", "cache"} and all(ok and same for ok, same, _ in seen.values()), seen
    assert seen["cache"][2] > seen["compute"][2], seen  # the cache graph leaves the middle's weights out

    model, plain = dittofx.optimize(z.build(), CFG), z.build()
    request(model, z)
    for m in (model, plain):
        to_q = m.transformer_blocks[1].attn.to_q
        to_q.weight = torch.nn.Parameter(to_q.weight.detach() * 1.5)
    for got, want in zip(request(model, z), request(plain, z)):
        assert torch.equal(got, want)
    assert len(model._dittofx.entries) == 1


def test_first_parameter_is_the_first_of_parameters():
    """The pre-hook reads the weights' dtype and device from `first_parameter`, a walk standing in
    for `next(model.parameters(), None)`: the same tensor on every zoo model, and where the root
    holds parameters, a parameter is registered as None, a module is shared, or there are none."""
    from dittofx.runtime.engine import first_parameter

    for name in zoo.names():
        model = zoo.get(name).build()
        assert first_parameter(model) is next(model.parameters()), name
    shared = torch.nn.Linear(2, 2)
    odd = torch.nn.Module()
    odd.register_parameter("unset", None)
    odd.empty = torch.nn.Sequential(torch.nn.ReLU())
    odd.a, odd.b = shared, shared
    assert first_parameter(odd) is next(odd.parameters()) is shared.weight
    odd.register_parameter("own", torch.nn.Parameter(torch.ones(1)))
    assert first_parameter(odd) is next(odd.parameters()) is odd.own
    assert first_parameter(torch.nn.Sequential(torch.nn.ReLU())) is None
