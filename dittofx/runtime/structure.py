"""What a captured graph took from the model besides its weights, and the changes that stale it.

The rewritten graph reads the weights live (`Entry.live_state`: a weight replaced or moved is
picked up), but the module tree and the Python state the forward branches on are baked in at
capture. A graph captured before one of these changes would go on running the old model:
- submodules registered anew anywhere in the tree: a LoRA injected or unloaded (peft swaps its
  layers in), a block or a layer swapped. torch's global module-registration hook tells the engine,
  at no cost per call; the block-by-block path, which wraps the blocks it found, needs it for its
  block lists (it runs every other module as it is).
- blocks deleted from or inserted into a block list (`del`, `insert`, `pop` register nothing): the
  identities of the chain's blocks, compared at each request's start.
- the switches peft's layers and diffusers' attention modules read in Python: active, disabled and
  merged adapters (`set_adapters`, `disable_lora`, `fuse_lora`, `delete_adapters`) and their
  scaling; the attention processor, its backend and fused projections. Read as a fingerprint of
  the modules that hold them, at each request's start (the engine's call).
The engine then drops its graphs and captures again. (Train mode, the weights' dtype and device,
and autocast get a graph each, by the engine's key: `Engine._capture_context`.) Other Python
attributes a forward may read are not watched: after such a change, `dittofx.disable` the model
and optimize it again.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Protocol

import torch

__all__ = ["watch", "unwatch", "block_ids", "stateful_modules", "python_state"]

OWN = "_dittofx_states"  # the engine's own submodule (its states come and go): not watched


class Listener(Protocol):
    def structure_changed(self, module: torch.nn.Module, submodule: Any, why: str) -> None: ...


# module -> the engine of the model it belongs to (weakly both ways: the engine holds the model)
_listeners: weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref] = weakref.WeakKeyDictionary()
_hook: Any = None


def _registered(module: torch.nn.Module, name: str, submodule: Any) -> None:
    listener = _listeners.get(module)
    if listener is not None and name != OWN and module._modules.get(name) is not submodule and listener() is not None:
        kind = type(submodule)
        listener().structure_changed(module, submodule, f"{type(module).__name__}.{name} set to a {kind.__module__}.{kind.__qualname__}")


def watch(model: torch.nn.Module, listener: Listener) -> None:
    """Tell `listener` when a submodule is registered anew on any module of `model` as it is now."""
    global _hook
    if _hook is None:
        _hook = torch.nn.modules.module.register_module_module_registration_hook(_registered)
    ref = weakref.ref(listener)
    for name, module in model.named_modules():
        if name != OWN and not name.startswith(OWN + "."):
            _listeners[module] = ref


def unwatch(model: torch.nn.Module) -> None:
    for module in model.modules():
        _listeners.pop(module, None)


def block_ids(model: torch.nn.Module, lists: list[str]) -> tuple | None:
    """The identities of the blocks in the chain's lists, in order (None: a list is gone)."""
    try:
        return tuple(tuple(map(id, model.get_submodule(name))) for name in lists)
    except (AttributeError, TypeError):
        return None


def _tuner_layer_class() -> type | None:
    """peft's BaseTunerLayer, where peft is in use (never imported here)."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    return getattr(tuners, "BaseTunerLayer", None)


def stateful_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose Python switches `python_state` reads: peft's adapter layers and modules
    with an attention `processor` (diffusers' attention)."""
    tuner = _tuner_layer_class()
    return [m for m in model.modules() if (tuner is not None and isinstance(m, tuner)) or "processor" in m.__dict__ or "processor" in m._modules]


def python_state(modules: list[torch.nn.Module]) -> tuple:
    """A fingerprint of the switches the forward reads in Python (see the module docstring)."""
    tuner = _tuner_layer_class()
    state = []
    for m in modules:
        if tuner is not None and isinstance(m, tuner):
            scaling = getattr(m, "scaling", {})
            state.append((tuple(m.active_adapters), m.disable_adapters, tuple(m.merged_adapters), tuple(sorted(scaling.items()))))
        else:
            processor = getattr(m, "processor", None)
            state.append((id(processor), type(processor), getattr(processor, "_attention_backend", None), getattr(m, "fused_projections", None)))
    return tuple(state)
