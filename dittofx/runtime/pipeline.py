"""Diffusers pipelines: optimize every transformer in them, refresh on every pipeline call.

The request length is known where the pipeline is called (`num_inference_steps`), so the
pipeline *instance* gets a per-instance subclass whose `__call__` refreshes each transformer
first (its class, and every other pipeline of that class, stay untouched). A pipeline with two
experts split by `boundary_ratio` (Wan 2.2) gives each the number of steps it will run.
"""

from __future__ import annotations

import copy
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


def steps_per_transformer(pipe: Any, names: list[str], steps: int | None) -> dict[str, int | None]:
    """How many denoising steps each transformer runs in a call of `steps` steps.

    With a `boundary_ratio` in the pipeline's config (Wan 2.2's high- and low-noise experts),
    diffusers runs `transformer` on the timesteps >= boundary_ratio * num_train_timesteps and
    `transformer_2` on the rest: the split is counted on a copy of the pipeline's scheduler set to
    the same number of steps. Otherwise every transformer runs every step.
    """
    counts = dict.fromkeys(names, steps)
    ratio = pipe.config.get("boundary_ratio")
    if ratio is None or steps is None or not {"transformer", "transformer_2"} <= set(names):
        return counts
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    high = int((scheduler.timesteps >= ratio * scheduler.config.num_train_timesteps).sum())
    counts["transformer"], counts["transformer_2"] = high, len(scheduler.timesteps) - high
    return counts


def attach_refresh(pipe: Any, names: list[str], refresh: Callable[[torch.nn.Module, int | None], None]) -> None:
    """Make every call of this pipeline instance first `refresh` each transformer with its steps."""
    base = type(pipe)
    signature = inspect.signature(base.__call__)
    param = signature.parameters.get("num_inference_steps")
    default = param.default if param is not None and isinstance(param.default, int) else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            steps = signature.bind_partial(self, *args, **kwargs).arguments.get("num_inference_steps", default)
        except TypeError:  # arguments the pipeline itself rejects: let it say so
            return base.__call__(self, *args, **kwargs)
        for name, count in steps_per_transformer(self, names, steps).items():
            refresh(getattr(self, name), count)
        return base.__call__(self, *args, **kwargs)

    pipe.__class__ = type(base.__name__, (base,), {"__call__": __call__, "_dittofx_base": base, "_dittofx_names": names})


def detach_refresh(pipe: Any) -> None:
    pipe.__class__ = type(pipe)._dittofx_base
