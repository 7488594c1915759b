"""Diffusers pipelines: optimize every transformer in them, refresh on every pipeline call.

The request length is known where the pipeline is called (`num_inference_steps`), so the
pipeline *instance* gets a per-instance subclass whose `__call__` refreshes each transformer
first (its class, and every other pipeline of that class, stay untouched).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

__all__ = ["is_pipeline", "pipeline_transformers", "attach_refresh", "detach_refresh"]


def is_pipeline(obj: Any) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def pipeline_transformers(pipe: Any) -> list[str]:
    """Names of the pipeline components that are transformers (`transformer`, `transformer_2`, ...)."""
    names = [
        name for name, comp in pipe.components.items()
        if name.startswith("transformer") and isinstance(comp, torch.nn.Module)
    ]  # fmt: skip
    if not names:
        raise ValueError(
            f"pipeline {type(pipe).__name__} has no transformer to optimize: its components are "
            f"{sorted(pipe.components)}; pass the denoiser module itself instead"
        )
    return names


def _steps_default(cls: type) -> int | None:
    param = inspect.signature(cls.__call__).parameters.get("num_inference_steps")
    return param.default if param is not None and isinstance(param.default, int) else None


def attach_refresh(pipe: Any, names: list[str], refresh: Callable[[torch.nn.Module, int | None], None]) -> None:
    base = type(pipe)
    default = _steps_default(base)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        steps = kwargs.get("num_inference_steps", default)
        for name in names:
            refresh(getattr(self, name), steps)
        return base.__call__(self, *args, **kwargs)

    pipe.__class__ = type(base.__name__, (base,), {"__call__": __call__, "_dittofx_base": base, "_dittofx_names": names})


def detach_refresh(pipe: Any) -> None:
    pipe.__class__ = type(pipe)._dittofx_base
