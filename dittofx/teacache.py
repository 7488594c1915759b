"""TeaCache's rescaling polynomials: the published table, and a fit for models without one.

TeaCache maps the relative L1 change of the modulated input (cheap to measure) to an estimate of
the change of the model's output (what matters) with a per-model polynomial. The table holds the
published coefficients (numpy `poly1d` order, highest degree first) under the name of the model
(variant) they were fitted on; `DEFAULTS` picks the entry used for a diffusers class when the
config names none. Note: the published Wan2.1 and CogVideoX polynomials were fitted on the
timestep embedding, not on the modulated input that dittofx measures; estimate your own for those.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

__all__ = ["COEFFICIENTS", "DEFAULTS", "CoefficientFit", "coefficients_for", "estimate_coefficients"]

COEFFICIENTS: dict[str, tuple[float, ...]] = {
    # TeaCache (ali-vilab/TeaCache) TeaCache4FLUX, TeaCache4HunyuanVideo, TeaCache4LTX-Video, TeaCache4Mochi
    "flux": (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01),
    "hunyuan_video": (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02),
    "ltx_video": (2.14700694e01, -1.28016453e01, 2.31279151e00, 7.92487521e-01, 9.69274326e-03),
    "mochi": (-3.51241319e03, 8.11675948e02, -6.09400215e01, 2.42429681e00, 3.05291719e-03),
    # TeaCache4Wan2.1 (use_ret_steps=False)
    "wan2.1_t2v_1.3B": (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01),
    "wan2.1_t2v_14B": (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    "wan2.1_i2v_480p_14B": (-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01),
    "wan2.1_i2v_720p_14B": (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
    # TeaCache4CogVideoX1.5
    "cogvideox_2b": (-3.10658903e01, 2.54732368e01, -5.92380459e00, 1.75769064e00, -3.61568434e-03),
    "cogvideox_5b": (-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02),
    "cogvideox1.5_5b": (2.50210439e02, -1.65061612e02, 3.57804877e01, -7.81551492e-01, 3.58559703e-02),
    # TeaCache4Lumina2, TeaCache4Cosmos, TeaCache4HiDream-I1
    "lumina2": (393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344),
    "cosmos": (2.71156237e02, -9.19775607e01, 2.24437250e00, 2.08355751e00, 1.41776330e-01),
    "hidream_i1": (-3.13605009e04, -7.12425503e02, 4.91363285e01, 8.26515490e00, 1.08053901e-01),
    # ComfyUI-TeaCache, as used by vLLM-omni for the Qwen-Image family
    "qwen_image": (-4.50000000e02, 2.80000000e02, -4.50000000e01, 3.20000000e00, -2.00000000e-02),
}

# diffusers transformer class -> default table entry
DEFAULTS: dict[str, str] = {
    "FluxTransformer2DModel": "flux",
    "HunyuanVideoTransformer3DModel": "hunyuan_video",
    "LTXVideoTransformer3DModel": "ltx_video",
    "MochiTransformer3DModel": "mochi",
    "WanTransformer3DModel": "wan2.1_t2v_1.3B",
    "CogVideoXTransformer3DModel": "cogvideox_2b",
    "Lumina2Transformer2DModel": "lumina2",
    "CosmosTransformer3DModel": "cosmos",
    "HiDreamImageTransformer2DModel": "hidream_i1",
    "QwenImageTransformer2DModel": "qwen_image",
}


def coefficients_for(model: torch.nn.Module, coefficients: Sequence[float] | str | None) -> tuple[float, ...]:
    """The polynomial for this model: given, named, or the default of its class."""
    if coefficients is not None and not isinstance(coefficients, str):
        return tuple(float(c) for c in coefficients)
    cls = type(model).__name__
    name = coefficients if coefficients is not None else DEFAULTS.get(cls)
    if name is None:
        raise ValueError(
            f"coefficients=None: TeaCache has no published coefficients for {cls}. Pass "
            f"TeaCacheConfig(coefficients=[c4, c3, c2, c1, c0]) (numpy poly1d order), a name from "
            f"{sorted(COEFFICIENTS)}, or fit them on your model with "
            f"dittofx.teacache.estimate_coefficients(model, requests)"
        )
    if name not in COEFFICIENTS:
        raise ValueError(f"coefficients={name!r}: not a table entry; allowed: {sorted(COEFFICIENTS)} or a list of numbers")
    return COEFFICIENTS[name]


@dataclass
class CoefficientFit:
    coefficients: tuple[float, ...]  # numpy poly1d order, ready for TeaCacheConfig(coefficients=...)
    r2: float  # coefficient of determination of the fit on the collected pairs
    input_distances: list[float]  # relative L1 change of the modulated input, per step pair
    output_distances: list[float]  # relative L1 change of the model output, same pairs


def _rel_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    return ((new.double() - old.double()).abs().sum() / old.double().abs().sum()).item()


def estimate_coefficients(
    model: torch.nn.Module,
    requests: Iterable[Sequence[dict[str, Any] | tuple[tuple, dict[str, Any]]]],
    degree: int = 4,
) -> CoefficientFit:
    """Fit TeaCache's polynomial on `model` (un-optimized) from sampling runs.

    `requests`: each item is one request of one CFG branch, the model inputs of its steps in order
    (kwargs dicts, or `(args, kwargs)`). For every pair of consecutive steps the relative L1 change
    of block 0's modulated input (found as TeaCache finds it: in the graph, or for a forward with
    no graph among block 0's torch calls) and of the model's output are collected;
    `numpy.polyfit` of output on input gives the coefficients."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree={degree!r}: must be an int >= 1")
    from .api import _find_engine  # (api imports this module)

    if _find_engine(model) is not None:  # also through the module torch.compile returned
        raise ValueError(
            f"model: {type(model).__name__} is optimized (its steps would advance its cache state and be cached); "
            f"fit on the plain model: dittofx.disable(model) first"
        )
    xs: list[float] = []
    ys: list[float] = []
    probes: dict[Any, Callable[[tuple, dict], tuple[torch.Tensor, Any]]] = {}
    for request in requests:
        prev = None
        for step in request:
            args, kwargs = step if isinstance(step, tuple) else ((), step)
            leaves = pytree.tree_leaves((args, kwargs))
            key = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x for x in leaves)
            if key not in probes:
                probes[key] = _graph_probe(model, args, kwargs) or _eager_probe(model, args, kwargs)
            with torch.no_grad():
                m, outs = probes[key](args, kwargs)
            out = next(o for o in pytree.tree_leaves(outs) if isinstance(o, torch.Tensor))
            if prev is not None:
                xs.append(_rel_l1(m, prev[0]))
                ys.append(_rel_l1(out, prev[1]))
            prev = (m, out)
    if len(xs) <= degree:
        raise ValueError(f"requests: {len(xs)} step pairs collected; a degree-{degree} fit needs more than {degree}")
    x, y = np.asarray(xs), np.asarray(ys)
    coefficients = np.polyfit(x, y, degree)
    residual = y - np.polyval(coefficients, x)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - float((residual**2).sum() / total) if total > 0 else math.nan
    return CoefficientFit(tuple(float(c) for c in coefficients), r2, xs, ys)


def _graph_probe(model: torch.nn.Module, args: tuple, kwargs: dict) -> Callable[[tuple, dict], tuple[torch.Tensor, Any]] | None:
    """Block 0's modulated input and the outputs, from the captured graph (as `optimize` finds the
    signal); None where the forward cannot be captured."""
    from .passes.capture import capture, resolve_state
    from .patterns.chain import find_chain
    from .patterns.modulation import find_modulated_input
    from .runtime.engine import timestep_input

    try:
        captured = capture(model, args, kwargs, dynamic=False)
    except Exception:  # no graph: the block-by-block path's rule (`_eager_probe`)
        return None
    gm = captured.gm
    params = set(captured.weight_placeholders())
    timestep = timestep_input(inspect.signature(model.forward).parameters)
    probe = _probe(gm, find_modulated_input(list(gm.graph.nodes), find_chain(gm, model, params, None), params, timestep))

    def run(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
        live = [getattr(owner, name) for owner, name, _ in (resolve_state(model, f) for f in captured.state_fqns)]
        *outs, m = probe(*live, *captured.constants, *pytree.tree_leaves((args, kwargs)))
        return m, outs

    return run


def _eager_probe(model: torch.nn.Module, args: tuple, kwargs: dict) -> Callable[[tuple, dict], tuple[torch.Tensor, Any]]:
    """Block 0's modulated input and the outputs, from an eager call with block 0 run under
    `ModulationFinder` (as the block-by-block path finds the signal, for forwards with no graph)."""
    from .patterns.modulation import run_finding_modulation
    from .runtime.blockwise import bind_arguments, learn_chain

    chain = learn_chain(model, lambda: model(*args, **kwargs), None)
    block, streams = chain.modules[0], [s for s in chain.streams[0] if s]
    original = block.forward
    signature = inspect.signature(original)

    def run(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
        seen = {}

        def forward(*a: Any, **k: Any) -> Any:
            named = bind_arguments(signature, a, k)
            hidden = max((named[s] for s in streams), key=lambda t: t.numel())
            out, found = run_finding_modulation(lambda: original(*a, **k), hidden, named)
            seen["m"] = found.value
            return out

        saved = block.__dict__.get("forward")
        block.forward = forward
        try:
            outs = model(*args, **kwargs)
        finally:
            del block.forward
            if saved is not None:
                block.forward = saved
        return seen["m"], outs

    return run


def _probe(gm: fx.GraphModule, signal: fx.Node) -> fx.GraphModule:
    """A copy of the captured graph that also returns the modulated input (as its last output)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            outs = pytree.tree_leaves(fx.map_arg(node.args[0], lambda n: env[n]))
            graph.output((*outs, env[signal]))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(gm, graph)
