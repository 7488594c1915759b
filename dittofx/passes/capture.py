"""Capture a transformer's forward as one flat torch.fx graph.

`torch.fx.symbolic_trace` cannot trace diffusers transformers (Python control flow on inputs,
`len()` of attention outputs); `torch.export` (non-strict) can, keeps `nn_module_stack` on every
node (the handle for finding blocks), and lifts parameters to placeholders. We keep the lifted
form: the graph is a pure function of (parameters, buffers, constants, user inputs), and at run
time we feed it the model's *live* parameters, so `.to()`, dtype casts and `state_dict()` keep
working with no weight copies.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils import _pytree as pytree
from torch.utils._sympy.value_ranges import ValueRanges

__all__ = ["CapturedGraph", "InputKey", "capture", "input_key", "resolve_state"]


@dataclass
class CapturedGraph:
    """The flat graph plus what is needed to call it with a model's live state."""

    gm: fx.GraphModule
    # placeholder order: state tensors of the model (FQNs), then lifted constants, then user inputs
    state_fqns: list[str]
    constants: list[torch.Tensor]
    num_user_inputs: int
    out_spec: pytree.TreeSpec
    dynamic_dims: dict[int, tuple[int, ...]]  # user-input index -> dims kept symbolic (an int input: ())
    # symbol -> the values it may take: export records a branch on a size (`if num_frames > 1`) as
    # a range, not as an assert in the graph; a graph serves inputs outside its ranges wrongly
    ranges: dict[Any, ValueRanges]
    # why export kept no size symbolic where it was asked to (None: it kept what the model allows)
    static_because: str | None = None

    def weight_placeholders(self) -> list[fx.Node]:
        """The placeholders fed from the model (parameters, buffers, lifted constants)."""
        return self.gm.graph.find_nodes(op="placeholder")[: len(self.state_fqns) + len(self.constants)]

    def user_placeholders(self) -> list[fx.Node]:
        """The placeholders fed from the call's inputs (its flattened args and kwargs)."""
        placeholders = self.gm.graph.find_nodes(op="placeholder")
        return placeholders[len(placeholders) - self.num_user_inputs :]


def resolve_state(model: torch.nn.Module, fqn: str) -> tuple[torch.nn.Module, str, bool]:
    """Where a state placeholder's tensor lives now: (owner module, attribute, is_parameter)."""
    owner_path, _, name = fqn.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    return owner, name, name in owner._parameters


# One key per graph: what the capture specialized on (structure, dtypes, devices, the values of
# non-tensor inputs and the sizes of dims that could not stay symbolic).
InputKey = tuple


def _leaf_key(leaf: Any, symbolic: tuple[int, ...] | None) -> Any:
    """`symbolic`: the dims of a tensor that a capture kept symbolic (`()` for an int input kept
    symbolic: its value), None where it kept none."""
    if isinstance(leaf, torch.Tensor):
        dims = tuple(-1 if symbolic and d in symbolic else s for d, s in enumerate(leaf.shape))
        return ("T", leaf.dtype, leaf.device.type, dims)
    return ("V", type(leaf).__name__, leaf if symbolic is None else -1)


# values that pytree flattens to themselves (one leaf each): a call made of them alone has the spec of
# the last call with the same keywords and types
_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter, bool, int, float, str, type(None)})


def flatten_inputs(args: tuple, kwargs: dict, specs: dict[tuple, pytree.TreeSpec]) -> tuple[list, pytree.TreeSpec]:
    """`pytree.tree_flatten((args, kwargs))`. A call of plain values only (a diffusers transformer's
    step: tensors, numbers, None) takes the spec kept in `specs` for its keywords and value types:
    flattening afresh cost ~7 us a step warm, ~25 cold, in the pre-hook."""
    values = (*args, *kwargs.values())
    key = (len(args), tuple(kwargs), tuple(map(type, values)))
    spec = specs.get(key)
    if spec is not None:
        return list(values), spec
    leaves, spec = pytree.tree_flatten((args, kwargs))
    if len(leaves) == len(values) and all(type(v) in _PLAIN for v in values):  # (a pytree taking None for no leaf: not kept)
        specs[key] = spec
    return leaves, spec


def input_key(
    args: tuple, kwargs: dict, dynamic_dims: dict[int, tuple[int, ...]], flat: tuple[list, pytree.TreeSpec] | None = None
) -> InputKey:
    """The key of these inputs for a capture that kept `dynamic_dims` symbolic (`{}`: every size
    and number concrete), so a graph is reused only where it is valid. `flat`: the inputs'
    (leaves, spec) where the caller has them (flattening again cost ~10 us a step)."""
    leaves, spec = pytree.tree_flatten((args, kwargs)) if flat is None else flat
    return (spec, tuple(_leaf_key(x, dynamic_dims.get(i)) for i, x in enumerate(leaves)))


def _dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict, ints: bool) -> dict[str, Any]:
    """Every tensor dim, and with `ints` every int input (sizes passed as numbers: Qwen-Image's
    `img_shapes`, LTX's `height`), symbolic where the forward allows it (export specializes the rest)."""

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {d: Dim.AUTO for d in range(x.dim())}
        return Dim.AUTO if ints and type(x) is int else None

    # one spec per parameter of the forward, by name: export (torch 2.13) matches a tuple of specs
    # to the parameters in the signature's order in one place and in the call's in another, so a
    # call passing its keyword arguments out of the signature's order (FLUX ControlNet's pipeline)
    # failed there and was captured with static shapes
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    return {name: pytree.tree_map(spec, value) for name, value in bound.items()}


# export warns for every dim it specializes (batch 1, fixed channels); a failed export dumps its
# graph ("Unable to find user code") and logs the traceback of the op that failed on fake tensors
# (an error that the export raises anyway): expected, not news (a failure is said once, by the
# engine, with its reason)
QUIET_LOGGERS = {"torch._export": logging.ERROR, "torch.fx.experimental.symbolic_shapes": logging.ERROR,
                 "torch._subclasses.fake_tensor": logging.CRITICAL}  # fmt: skip


@contextlib.contextmanager
def _quiet():
    loggers = {logging.getLogger(name): level for name, level in QUIET_LOGGERS.items()}
    saved = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, level in saved.items():
            logger.setLevel(level)


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, shapes: dict | None) -> torch.export.ExportedProgram:
    # a failed export prints its partial graph to stderr (hundreds of lines; the engine says once
    # why the forward cannot be captured): what else an export prints (the forward's own warnings)
    # is passed on
    printed = io.StringIO()
    try:
        with torch.no_grad(), _quiet(), contextlib.redirect_stderr(printed):
            return torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as err:
        partial = getattr(err, "partial_fx_graph", None)
        if partial is not None:
            printed = io.StringIO(printed.getvalue().replace(f"{partial}\n", ""))
        raise
    finally:
        sys.stderr.write(printed.getvalue())


def _export_most_symbolic(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.export.ExportedProgram, str | None]:
    """Export with tensor dims and int inputs symbolic, else dims only, else static: an int input
    may meet Python that takes no SymInt (an lru_cache keyed on it: NucleusMoE's rope), a dim a
    size-dependent branch export cannot hold (Cosmos's `np.sqrt` of a size ratio). Returns the
    program and, where it is static, why the last symbolic try failed."""
    has_ints = any(type(x) is int for x in pytree.tree_leaves((args, kwargs)))
    for ints in (True, False) if has_ints else (False,):
        try:
            return _export(model, args, kwargs, _dynamic_shapes(model, args, kwargs, ints)), None
        except Exception as err:
            why = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
            # a failed dynamic export leaves its dim markings on the input tensors: retry on aliases
            args, kwargs = pytree.tree_map(_alias, args), pytree.tree_map(_alias, kwargs)
    return _export(model, args, kwargs, None), why


def _symbolic(size: Any) -> bool:
    """A size the graph holds for any value: a SymInt export specialized (`int(n)` in the forward:
    Qwen-Image's text length; a 1 it saw) is one value, kept in the graph as a constant."""
    return isinstance(size, torch.SymInt) and bool(size.node.expr.free_symbols)


def _alias(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool = True) -> CapturedGraph:
    """Export `model(*args, **kwargs)`; sizes (tensor dims, int inputs) are kept symbolic where the
    model allows it."""
    ep, static_because = _export_most_symbolic(model, args, kwargs) if dynamic else (_export(model, args, kwargs, None), None)
    sig = ep.graph_signature
    if sig.buffers_to_mutate or getattr(sig, "user_inputs_to_mutate", None):
        raise NotImplementedError("the forward mutates buffers or inputs; dittofx cannot cache it")
    gm = ep.graph_module
    state_fqns, constants, user_index = [], [], []
    for spec in sig.input_specs:
        kind = spec.kind.name
        if kind in ("PARAMETER", "BUFFER"):
            state_fqns.append(spec.target)
        elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            constants.append(ep.constants[spec.target])
        elif kind == "USER_INPUT":
            user_index.append(spec)
        else:  # pragma: no cover - token inputs only appear with effectful ops
            raise NotImplementedError(f"unsupported exported input kind {kind}")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    n_state = len(state_fqns) + len(constants)
    dynamic_dims = {}
    for i, node in enumerate(placeholders[n_state:]):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims = tuple(d for d, s in enumerate(val.shape) if _symbolic(s))
            if dims:
                dynamic_dims[i] = dims
        elif _symbolic(val):
            dynamic_dims[i] = ()
    _strip_asserts(gm)
    _drop_noop_conversions(gm)
    gm.graph.lint()
    gm.recompile()
    return CapturedGraph(
        gm=gm,
        state_fqns=state_fqns,
        constants=constants,
        num_user_inputs=len(placeholders) - n_state,
        out_spec=ep.call_spec.out_spec,
        dynamic_dims=dynamic_dims,
        ranges=dict(ep.range_constraints),
        static_because=static_because,
    )


def _strip_asserts(gm: fx.GraphModule) -> None:
    """Drop the dtype asserts export adds for `.to()` calls: our input key already guards dtypes.
    Shape-range asserts (`_assert_scalar`) stay: they guard the symbolic dims."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)


_CONVERSIONS = {
    torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten.to.device, torch.ops.aten.to.other,
    torch.ops.aten.type_as.default,
}  # fmt: skip


def _drop_noop_conversions(gm: fx.GraphModule) -> None:
    """Replace each conversion that changes nothing (`x.float()` on a float tensor) by its input.

    Eager `x.float()` returns `x` itself, yet export records a `to` node and binds `x` to it, so the
    next block's `x.float()` reads the previous block's node: a loop-invariant input (a timestep
    projection, a rope table) would look carried from block to block."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _CONVERSIONS:
            continue
        names = [a.name for a in node.target._schema.arguments]
        if dict(zip(names, node.args), **node.kwargs).get("copy"):
            continue
        src, out = node.args[0].meta.get("val"), node.meta.get("val")
        if _same_tensor_layout(src, out):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _same_tensor_layout(a: Any, b: Any) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if (a.dtype, a.device, a.layout, a.dim()) != (b.dtype, b.device, b.layout, b.dim()):
        return False
    return all(statically_known_true(x == y) for x, y in zip((*a.shape, *a.stride()), (*b.shape, *b.stride())))
