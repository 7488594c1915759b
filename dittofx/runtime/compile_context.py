"""The torch.compile that a model's call runs under, as its forward pre-hook sees it.

dittofx's pre-hook runs outside dynamo (torch._dynamo.disable), inside the Python call of a module
that torch.compile wrapped (`torch.compile(model)`, `model.compile()`): a frame further out holds
that compile's context, the wrapper dynamo put around the module's call. Where that compile
records CUDA graphs, which inductor skips for a graph holding a torch.cond, a step decided on the
device runs split instead, its head compiled with that same context: the model's backend, mode
and options, without the user naming them twice.
"""

from __future__ import annotations

import sys
import weakref
from types import FrameType

import torch
from torch._dynamo import eval_frame

__all__ = ["enclosing_compile", "records_cuda_graphs"]

# inductor as a plain function: its registered backend, and compile_fx (named, not imported: a
# compile with another backend would import inductor for this)
INDUCTOR_FUNCTIONS = {("torch._dynamo.backends.inductor", "inductor"), ("torch._inductor.compile_fx", "compile_fx")}


def enclosing_compile(frame: FrameType | None = None) -> eval_frame._TorchDynamoContext | None:
    """The context of the torch.compile wrapping the call that runs `frame` (default: the caller's),
    past the caller's own disable (the pre-hook's); None where the nearest other dynamo context
    disables dynamo, or where there is none."""
    frame = sys._getframe(1) if frame is None else frame
    own_disable = True
    while frame is not None:
        if frame.f_code.co_filename == eval_frame.__file__:
            context = frame.f_locals.get("self")
            if isinstance(context, eval_frame.DisableContext):
                if not own_disable:
                    return None
                own_disable = False
            elif isinstance(context, eval_frame._TorchDynamoContext):
                return context
        frame = frame.f_back
    return None


def records_cuda_graphs(context: eval_frame._TorchDynamoContext) -> bool:
    """Whether the compile behind `context` records CUDA graphs: inductor with `triton.cudagraphs`
    (mode="reduce-overhead" or "max-autotune", or set in its options or globally; inductor also as
    its registered function or compile_fx), or dynamo's "cudagraphs" backend. Worked out once per
    compile (asked at every step the device decides)."""
    if context not in _RECORDS:
        _RECORDS[context] = _records(context)
    return _RECORDS[context]


_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _records(context: eval_frame._TorchDynamoContext) -> bool:
    backend = context.callback
    while hasattr(backend, "_torchdynamo_orig_backend"):  # dynamo's wrappers around the backend
        backend = backend._torchdynamo_orig_backend
    name = getattr(backend, "compiler_name", None)
    if name == "cudagraphs":
        return True
    if name == "inductor":  # torch.compile's wrapper, with the options the compile was given
        return bool(backend.config.get("triton.cudagraphs", torch._inductor.config.triton.cudagraphs))
    function = getattr(backend, "compiler_fn", backend)  # torch.compile's wrapper of a backend given as a function
    inductor = (getattr(function, "__module__", None), getattr(function, "__name__", None)) in INDUCTOR_FUNCTIONS
    return inductor and bool(torch._inductor.config.triton.cudagraphs)
