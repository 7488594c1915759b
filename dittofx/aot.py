"""Ahead of time: an optimized model as one `torch.export` program and an AOTInductor package.

The program is the engine's "device" graph variant (gates, diff and torch.cond(cache | compute) all
in the graph) with the model's weights and one fresh cache state as buffers; the state is mutated
in place, so the program carries its cache from call to call and resets it itself after
`num_inference_steps` calls (SPEC §3). The host-side parts of the Python path are not in it:
warmup and mask steps are decided by the same gates on the device (same outcome), and there is one
state, so one program serves one CFG branch (export one per branch to run them separately).

The `torch.ops.dittofx.*` ops are registered from Python and do not exist where dittofx is not
imported, so each op node is pointed at the op's torch implementation before the program is
decomposed: the program and the package hold plain aten ops only. Swapping nodes in the exported
graph (rather than a switch inside the kernels) leaves the eager and compiled paths untouched.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from . import kernels
from .passes.partition import UnpairedOutputError
from .runtime.engine import CaptureError, Engine, Entry
from .runtime.state import CacheState

__all__ = ["aoti_configs", "export_program"]


def aoti_configs() -> dict[str, Any]:
    """Inductor settings a package of an exported program needs (`dittofx.export` compiles with
    them; pass them to `torch._inductor.aoti_compile_and_package(ep, inductor_configs=...)` to
    compile an exported program yourself).
    - Uniform-value constant folding turns a small buffer (a 0-d counter) into its value at compile
      time even when the program mutates it, so a package would restart every counter on every call
      (pytorch/pytorch#165444, fixed upstream by #185077, not in torch 2.13): off.
    - Before torch 2.13, buffer reuse sizes its peak-memory estimate over the outer graph only, and
      the cond's subgraphs index past it (H100, torch 2.11, 2026-11-23: "InductorError: ValueError:
      Start index 41 out of bounds [0, 38]" in memory_plan_reuse; 2.13 keeps one estimate per
      subgraph): there the package is built without buffer reuse, which skips that estimate (more
      memory, same results)."""
    configs = {"joint_graph_constant_folding": False}
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 13):
        configs["allow_buffer_reuse"] = False
    return configs


class _Program(torch.nn.Module):
    """What is exported: the device graph called on the model's own weights (registered under
    their names in the model, no copies), the graph's lifted constants and a fresh cache state."""

    def __init__(self, entry: Entry, state: CacheState):
        super().__init__()
        self.graph = entry.graphs["device"]
        self.dittofx_state = state
        self.weights = torch.nn.Module()
        self.fqns = entry.captured.state_fqns
        for (owner, name, is_param), fqn in zip(entry.slots, self.fqns):
            path, _, leaf = fqn.rpartition(".")
            module = self.weights
            for part in path.split(".") if path else ():
                if part not in module._modules:
                    module.add_module(part, torch.nn.Module())
                module = module._modules[part]
            if is_param:
                module.register_parameter(leaf, owner._parameters[name])
            else:
                module.register_buffer(leaf, owner._buffers[name], persistent=name not in owner._non_persistent_buffers_set)
        self.constants = torch.nn.Module()
        for i, constant in enumerate(entry.captured.constants):
            self.constants.register_buffer(str(i), constant, persistent=False)

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, ...]:
        weights = [_attr(self.weights, fqn) for fqn in self.fqns]
        leaves = pytree.tree_leaves((args, kwargs))
        return tuple(self.graph(*self.dittofx_state.tensors(), *weights, *self.constants.buffers(), *leaves))


def _attr(root: torch.nn.Module, fqn: str) -> torch.Tensor:
    path, _, leaf = fqn.rpartition(".")
    return getattr(root.get_submodule(path), leaf)


def _torch_kernels(ep: torch.export.ExportedProgram) -> None:
    """Point each `torch.ops.dittofx` node (cond branches included) at the op's torch
    implementation, in place; `run_decompositions` then traces it into aten ops. (A decomposition
    table cannot do it: export functionalizes a mutating custom op before decomposing it.)"""
    for module in ep.graph_module.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for op, impl in kernels.TORCH_IMPLEMENTATIONS.items():
            for node in module.graph.find_nodes(op="call_function", target=op):
                node.target = impl
        module.recompile()


def export_program(
    engine: Engine, example_inputs: tuple[tuple, dict], path: str | os.PathLike | io.IOBase | None = None,
    inductor_configs: dict[str, Any] | None = None,
) -> torch.export.ExportedProgram:
    """See `dittofx.export`."""
    cfg = engine.cfg
    if cfg.enable_separate_cfg is not False and not cfg.cfg_diff_compute_separate:  # None: branches named by cache_context
        raise ValueError(
            f"cfg_diff_compute_separate=False (enable_separate_cfg={cfg.enable_separate_cfg}): a program holds one CFG "
            "branch's state and decides its steps itself, so the second branch cannot reuse the first's decisions; export "
            "supports cfg_diff_compute_separate=True (each branch decides on its own diff, one program per branch)"
        )
    if engine.num_steps is None:
        raise ValueError(
            "num_inference_steps=None: an exported program detects a new request by counting steps; "
            "set num_inference_steps in the cache config (or call dittofx.refresh(model, num_inference_steps=T)) before export"
        )
    if engine.group is not None:
        raise ValueError(f"process_group={engine.group!r}: export supports one process only (optimize without process_group)")
    args, kwargs = example_inputs
    if engine.blockwise is not None:
        raise ValueError(
            f"model={type(engine.model).__name__}: its forward cannot be captured as one graph (dittofx caches it "
            f"block by block in eager Python), so there is no program to export"
        )
    try:
        entry, sizes, device = engine.static_entry(args, kwargs)
    except (CaptureError, UnpairedOutputError) as err:
        raise ValueError(f"model={type(engine.model).__name__}: no program to export: {err}") from err
    program = _Program(entry, engine.new_state(entry, sizes, device))
    with torch.no_grad():
        ep = torch.export.export(program, args, kwargs, strict=False)
    _torch_kernels(ep)
    ep = ep.run_decompositions()
    if path is not None:
        # compiled before anyone runs `ep.module()`, which shares (and advances) the state buffers
        package = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
        configs = {**(inductor_configs or {}), **aoti_configs()}
        torch._inductor.aoti_compile_and_package(ep, package_path=package, inductor_configs=configs)
    return ep
