"""dittofx.export: the exported program, and its AOTInductor package loaded in a process that never
imports dittofx, run requests of 28 cached steps with the outputs and the schedule of the Python
path (the same optimized model called eagerly). One AOTInductor compile (~30 s on 2 cores).

On a GPU (issue 7: "also run on the GPU"): `TRITON_INTERPRET=0 DITTOFX_TEST_DEVICE=cuda pytest
tests/test_export.py` builds the models and inputs there, so the package is compiled for CUDA."""

import os
import subprocess
import sys

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from torch.utils._pytree import tree_map

import dittofx
import zoo

STEPS = 28
CFG = {"residual_diff_threshold": 0.06, "max_warmup_steps": 2, "max_continuous_cached_steps": 3, "num_inference_steps": STEPS}
TAYLOR_MASK = {  # Taylor derivatives (3 levels) and a dynamic mask: the other state the device graph updates
    "residual_diff_threshold": 0.08, "max_warmup_steps": 2, "num_inference_steps": STEPS,
    "enable_taylorseer": True, "taylorseer_order": 2, "scm_steps_mask_policy": "fast",
}  # fmt: skip

# Runs in a fresh interpreter: load the package, two requests of STEPS calls, save the outputs.
PACKAGE_RUN = """
import sys
import torch
torch.set_num_threads(1)
package, inputs, outputs = sys.argv[1:]
model = torch._inductor.aoti_load_package(package)
steps = torch.load(inputs)
outs = [[model(**kwargs)[0] for kwargs in steps] for _request in range(2)]
assert "dittofx" not in sys.modules, sorted(m for m in sys.modules if "dittofx" in m)
torch.save(outs, outputs)
"""


DEVICE = os.environ.get("DITTOFX_TEST_DEVICE", "cpu")


def build(z) -> torch.nn.Module:
    return z.build().to(DEVICE)


def inputs(z, step: int, t: float) -> dict:
    return tree_map(lambda x: x.to(DEVICE) if isinstance(x, torch.Tensor) else x, z.inputs(step, t))


def step_inputs(z):
    return [inputs(z, s, 1 - s / STEPS) for s in range(STEPS)]


def python_path(z, cfg):
    """One request of the optimized model called eagerly: outputs and cached steps."""
    model = dittofx.optimize(build(z), cfg)
    with torch.no_grad():
        outs = [model(**kwargs)[0] for kwargs in step_inputs(z)]
    return outs, dittofx.summary(model, log_table=False)[0].cached_steps


def close(got, want) -> bool:
    return torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def assert_matches(requests, want):
    for outs in requests:
        assert len(outs) == STEPS
        for s, (got, w) in enumerate(zip(outs, want)):
            assert close(got, w), (s, (got - w).abs().max().item())


def run_package(path, z, tmp_path) -> list[list[torch.Tensor]]:
    """Two requests of zoo model `z`'s steps through the package at `path`, in a process that
    never imports dittofx: each request's outputs."""
    torch.save(step_inputs(z), tmp_path / "inputs.pt")
    run = subprocess.run(
        [sys.executable, "-c", PACKAGE_RUN, str(path), str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp_path / "outputs.pt")


def cached_steps_seen(outs, uncached) -> list[int]:
    """Inputs do not depend on earlier outputs: a computed step gives the uncached model's output."""
    return [s for s, (got, want) in enumerate(zip(outs, uncached)) if not close(got, want)]


@pytest.fixture(scope="module")
def pixart():
    return zoo.get("pixart")


@pytest.fixture(scope="module")
def uncached(pixart):
    model = build(pixart)
    with torch.no_grad():
        return [model(**kwargs)[0] for kwargs in step_inputs(pixart)]


@pytest.fixture(scope="module")
def expected(pixart):
    return python_path(pixart, CFG)


@pytest.fixture(scope="module")
def packaged(pixart, tmp_path_factory):
    """The one AOTInductor compile of this file: (program, package path)."""
    path = tmp_path_factory.mktemp("export") / "pixart.pt2"
    model = dittofx.optimize(build(pixart), CFG)
    ep = dittofx.export(model, ((), inputs(pixart, 0, 1.0)), path)
    return ep, path


def all_targets(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes if n.op == "call_function"}


def test_package_runs_without_dittofx_and_matches_python_path(pixart, uncached, expected, packaged, tmp_path):
    _ep, path = packaged
    want, cached = expected
    assert 0 < len(cached) < STEPS - 2, cached  # a schedule worth checking
    requests = run_package(path, pixart, tmp_path)
    assert_matches(requests, want)
    # each request (the second one starts over by itself) caches exactly the Python path's steps
    assert [cached_steps_seen(outs, uncached) for outs in requests] == [cached, cached]


def test_a_dbprune_package_prunes_each_block_on_its_own_decision(tmp_path):
    """DBPrune's program holds a torch.cond per prunable block, each on its block's flag. A package
    (AOTInductor's C++ wrapper) ran every cond on the first block's flag while the flags were views
    of one buffer (helper-51): at a step that prunes some blocks and not others it diverged."""
    z = zoo.get("wan")
    cfg = {"method": "dbprune", "residual_diff_threshold": 0.12, "num_inference_steps": STEPS, "max_warmup_steps": 2,
           "Fn_compute_blocks": 1, "Bn_compute_blocks": 0}  # fmt: skip
    model = dittofx.optimize(build(z), cfg)
    with torch.no_grad():
        want = [model(**kwargs)[0] for kwargs in step_inputs(z)]
    pruned, prunable = dittofx.summary(model, log_table=False)[0].pruned_blocks, len(model._dittofx.entries[0].pruned_blocks)
    assert any(0 < n < prunable for n in pruned), (pruned, prunable)  # a step where the blocks' decisions part
    path = tmp_path / "wan_dbprune.pt2"
    dittofx.export(dittofx.optimize(build(z), cfg), ((), inputs(z, 0, 1.0)), path)
    assert_matches(run_package(path, z, tmp_path), want)


@pytest.mark.parametrize("cfg", [CFG, TAYLOR_MASK], ids=["dbcache", "taylorseer+mask"])
def test_exported_program_matches_python_path(pixart, uncached, expected, packaged, cfg):
    if cfg is CFG:
        (ep, _path), (want, cached) = packaged, expected
    else:
        ep = dittofx.export(dittofx.optimize(build(pixart), cfg), ((), inputs(pixart, 0, 1.0)))
        want, cached = python_path(pixart, cfg)
    targets = all_targets(ep.graph_module)
    assert "cond" in targets and not [t for t in targets if "dittofx" in t]
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    assert {"dittofx_state.step", "dittofx_state.p", "dittofx_state.residual_0"} <= mutated
    assert cached
    program = ep.module()
    with torch.no_grad():
        outs = [program(**kwargs)[0] for kwargs in step_inputs(pixart)]
    assert_matches([outs], want)
    assert cached_steps_seen(outs, uncached) == cached


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_exported_program_of_a_model_whose_regions_pass_sizes_matches_python_path(name):
    """A symbolic capture of FLUX or SD3 hands sizes across the cond as SymInt operands, which
    export at static shapes cannot name: the program comes from a capture at the example's shapes."""
    z, cfg = zoo.get(name), dict(CFG, residual_diff_threshold=0.3)  # caches about half the steps of these two
    want, cached = python_path(z, cfg)
    program = dittofx.export(dittofx.optimize(build(z), cfg), ((), inputs(z, 0, 1.0))).module()
    with torch.no_grad():
        outs = [program(**kwargs)[0] for kwargs in step_inputs(z)]
    assert_matches([outs], want)
    assert 0 < len(cached) < STEPS - 2, cached


def test_export_bad_input(pixart):
    example = ((), pixart.inputs(0, 1.0))
    with pytest.raises(ValueError, match="not optimized by dittofx"):
        dittofx.export(pixart.build(), example)
    no_length = dittofx.optimize(pixart.build(), {k: v for k, v in CFG.items() if k != "num_inference_steps"})
    with pytest.raises(ValueError, match="num_inference_steps=None"):
        dittofx.export(no_length, example)
    lumina2 = zoo.get("lumina2")  # its forward cannot be captured (dittofx caches it block by block)
    with pytest.raises(ValueError, match="Lumina2Transformer2DModel: no program to export: .*cannot be captured as one graph"):
        dittofx.export(dittofx.optimize(lumina2.build(), CFG), ((), lumina2.inputs(0, 1.0)))
    with pytest.raises(TypeError, match="example_inputs=dict"):
        dittofx.export(dittofx.optimize(pixart.build(), CFG), pixart.inputs(0, 1.0))
    with pytest.raises(TypeError, match=r"example_inputs=\(list, dict\): must be a tuple \(args: tuple, kwargs: dict\)"):
        dittofx.export(dittofx.optimize(pixart.build(), CFG), ([], pixart.inputs(0, 1.0)))
    optimized = dittofx.optimize(pixart.build(), CFG)  # the model's own error, not a capture's
    with pytest.raises(TypeError, match="got an unexpected keyword argument 'not_an_input'"):
        dittofx.export(optimized, ((), dict(example[1], not_an_input=1)))
    assert optimized._dittofx.forward_error is None  # not kept (its traceback holds tensors)
    long_masked = dittofx.optimize(pixart.build(), dict(CFG, num_inference_steps=1100, scm_steps_mask_policy="fast"))
    with pytest.raises(ValueError, match="num_inference_steps=1100 with a steps computation mask: .* at most 1024 steps"):
        dittofx.export(long_masked, example)  # its 1s past step 1024 would be read as 0s (helper-54)
    for separate_cfg in (True, None):  # None (the default): branches named by the pipeline's cache_context (helper-56)
        separate = dict(CFG, enable_separate_cfg=separate_cfg, cfg_diff_compute_separate=False)
        with pytest.raises(ValueError, match=r"cfg_diff_compute_separate=False \(enable_separate_cfg=.*export supports cfg_diff_compute_separate=True"):
            dittofx.export(dittofx.optimize(pixart.build(), separate), example)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=zoo.get("flux").build(),
    )  # fmt: skip
    with pytest.raises(ValueError, match="pipe.transformer"):
        dittofx.export(dittofx.optimize(pipe, CFG), example)


@pytest.mark.parametrize(
    "path, exc, words",
    [
        ("model.zip", ValueError, "path='model.zip': an AOTInductor package's path must end in .pt2"),
        (5, TypeError, "path=5: must be a file path ending in .pt2, a writable seekable binary buffer, or None"),
        ("no/such/folder/m.pt2", ValueError, "its folder"),
        ("kernels.pt2", ValueError, "path='kernels.pt2': is a folder"),  # made by the test
    ],
)
def test_a_bad_package_path_is_refused_before_the_export(pixart, monkeypatch, tmp_path, path, exc, words):
    """Told at once (not after the capture and export, or as torch's bare assertion), and the model
    goes on with its request as if export had not been called."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kernels.pt2").mkdir()
    model, twin = dittofx.optimize(build(pixart), CFG), dittofx.optimize(build(pixart), CFG)
    steps = step_inputs(pixart)
    with torch.no_grad():
        for m in (model, twin):
            m(**steps[0])
        with pytest.raises(exc) as info:
            dittofx.export(model, ((), steps[0]), path)
        assert words in str(info.value)
        assert len(model._dittofx.entries) == 1  # nothing captured for the export
        assert all(torch.equal(model(**kw)[0], twin(**kw)[0]) for kw in steps[1:6])


def test_package_settings_are_the_users_and_dittofx_aoti_configs(pixart, monkeypatch):
    """`inductor_configs` reach the package's compile with `dittofx.aoti_configs()` over them (a
    package without them restarts its counters: pytorch#165444); a buffer is a package path too."""
    import io

    seen = {}
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda ep, package_path, inductor_configs: seen.update(path=package_path, configs=inductor_configs))
    buffer = io.BytesIO()
    user = {"max_autotune": True, "joint_graph_constant_folding": True}
    dittofx.export(dittofx.optimize(build(pixart), CFG), ((), inputs(pixart, 0, 1.0)), buffer, inductor_configs=user)
    assert seen["path"] is buffer
    assert seen["configs"] == {**user, **dittofx.aoti_configs()} and seen["configs"]["joint_graph_constant_folding"] is False
    with pytest.raises(TypeError, match="inductor_configs=.*must be a dict"):
        dittofx.export(dittofx.optimize(build(pixart), CFG), ((), inputs(pixart, 0, 1.0)), inductor_configs=[("a", 1)])


class _CondMatmuls(torch.nn.Module):
    """Extern matmuls (buffers inductor may reuse) around a torch.cond, as in the device graph."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        a = (x @ self.w).relu()
        b = torch.cond(a.sum() > 0, lambda t: (t @ self.w).sin(), lambda t: (t @ self.w).cos(), (a,))
        return ((b @ self.w).relu() @ self.w).tanh()


@pytest.mark.parametrize("version, reuse_checked", [("2.11.0+cu130", False), ("2.13.0+cpu", True)])
def test_package_skips_the_reuse_estimate_before_torch_2_13(monkeypatch, tmp_path, version, reuse_checked):
    """Before torch 2.13 inductor's buffer reuse indexes a peak estimate of the outer graph from the
    cond's subgraphs, past its end (H100, torch 2.11: InductorError in memory_plan_reuse), so there
    the package is built without reuse: that estimate is never consulted. From 2.13 reuse stays on
    (and the check consults it, so this test sees the difference). Under a torch before 2.13 the
    2.13 settings would meet the bug itself: that case is skipped there."""
    from torch._inductor.codegen.wrapper import AllocateLine

    from dittofx.aot import aoti_configs

    if reuse_checked and torch.torch_version.TorchVersion(torch.__version__) < (2, 13):
        pytest.skip(f"torch {torch.__version__}: buffer reuse around a cond is the bug this works around")
    with monkeypatch.context() as patched:
        patched.setattr(torch, "__version__", version)
        configs = aoti_configs()
    consulted = []
    original = AllocateLine.should_reuse_buffer
    monkeypatch.setattr(AllocateLine, "should_reuse_buffer", lambda line, *a: consulted.append(1) or original(line, *a))
    assert configs["joint_graph_constant_folding"] is False
    model, x = _CondMatmuls(), torch.randn(4, 16)
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
        torch._inductor.aoti_compile_and_package(ep, package_path=os.fspath(tmp_path / "m.pt2"), inductor_configs=configs)
    assert bool(consulted) is reuse_checked
    with torch.no_grad():
        torch.testing.assert_close(torch._inductor.aoti_load_package(os.fspath(tmp_path / "m.pt2"))(x), model(x))
