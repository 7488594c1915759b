"""Diffusers pipelines: optimize every transformer in them, refresh on every pipeline call.

The pipeline *instance* gets a per-instance subclass whose `__call__` refreshes each transformer
(its class, and every other pipeline of that class, stay untouched): first with the call's
`num_inference_steps`, then each time the pipeline sets its scheduler up, with the number of
timesteps the denoising loop will really run. That count differs from `num_inference_steps` for
custom `sigmas`/`timesteps`, img2img `strength` (`set_begin_index`), order-2 schedulers (Heun: one
transformer call per entry of `scheduler.timesteps`, 2N-1 of them) and Wan 2.2's two experts.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Iterator

import torch

__all__ = ["is_pipeline", "pipeline_transformers", "attach_refresh", "detach_refresh"]

Refresh = Callable[[torch.nn.Module, int | None], None]
# a transformer: its pipeline's call starts (the class name; returns whether it is optimized) or ends (None)
InCall = Callable[[torch.nn.Module, str | None], bool]
Failed = Callable[[Any, list[str]], None]  # a call raised: the pipeline, its transformers optimized at the start


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


def steps_per_transformer(pipe: Any, names: list[str], timesteps: Any) -> dict[str, int]:
    """How many of the loop's `timesteps` each transformer runs.

    With a `boundary_ratio` in the pipeline's config (Wan 2.2's high- and low-noise experts),
    diffusers runs `transformer` on the timesteps >= boundary_ratio * num_train_timesteps and
    `transformer_2` on the rest. Otherwise every transformer runs every timestep.
    """
    counts = dict.fromkeys(names, len(timesteps))
    ratio = pipe.config.get("boundary_ratio")
    if ratio is None or not {"transformer", "transformer_2"} <= set(names):
        return counts
    high = int((torch.as_tensor(timesteps) >= ratio * pipe.scheduler.config.num_train_timesteps).sum())
    counts["transformer"], counts["transformer_2"] = high, len(timesteps) - high
    return counts


@contextlib.contextmanager
def counting_timesteps(pipe: Any, names: list[str], refresh: Refresh) -> Iterator[None]:
    """For one pipeline call, refresh the transformers after every `set_timesteps` /
    `set_begin_index` of the pipeline's scheduler with the timesteps from the begin index on.

    The scheduler instance gets a per-call subclass (its class exactly again afterwards, also on an
    exception; it may be shared with other pipelines). Copies taken meanwhile (LTX-2, SkyReels
    deep-copy it inside a call) are of the plain class, so their own timesteps count for nothing.
    """
    scheduler = getattr(pipe, "scheduler", None)
    base = type(scheduler)
    hooks = [name for name in ("set_timesteps", "set_begin_index") if callable(getattr(base, name, None))]
    if not hooks:
        yield
        return

    def recount() -> None:
        timesteps = scheduler.timesteps[getattr(scheduler, "begin_index", None) or 0 :]
        for name, count in steps_per_transformer(pipe, names, timesteps).items():
            refresh(getattr(pipe, name), count)

    def hooked(method: Callable) -> Callable:
        @functools.wraps(method)  # keeps the signature: `retrieve_timesteps` inspects it for sigmas/timesteps
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = method(self, *args, **kwargs)
            if self is scheduler:
                recount()
            return out

        return wrapper

    def __reduce_ex__(self: Any, protocol: Any) -> Any:
        func, args, *rest = base.__reduce_ex__(self, protocol)
        if args and args[0] is type(self):  # copyreg's reconstructors take the class first
            args = (base, *args[1:])
        return (func, args, *rest)

    namespace = {name: hooked(getattr(base, name)) for name in hooks}
    scheduler.__class__ = type(base.__name__, (base,), {**namespace, "__reduce_ex__": __reduce_ex__})
    try:
        yield
    finally:
        scheduler.__class__ = base


def attach_refresh(pipe: Any, names: list[str], refresh: Refresh, in_call: InCall, failed: Failed) -> None:
    """Make every call of this pipeline instance refresh each transformer with the steps it runs
    (and tell each when the call starts and ends, and the pipeline when a call raised)."""
    base = type(pipe)
    signature = inspect.signature(base.__call__)
    param = signature.parameters.get("num_inference_steps")
    default = param.default if param is not None and isinstance(param.default, int) else None

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            steps = signature.bind_partial(self, *args, **kwargs).arguments.get("num_inference_steps", default)
        except TypeError:  # arguments the pipeline itself rejects: let it say so
            return base.__call__(self, *args, **kwargs)
        for name in names:  # pipelines that never set their scheduler up before the loop
            try:
                refresh(getattr(self, name), steps)
            except ValueError:  # no count (the pipeline says so itself, or its scheduler's timesteps tell)
                refresh(getattr(self, name), None)
        optimized = [name for name in names if in_call(getattr(self, name), base.__name__)]
        try:
            with counting_timesteps(self, names, refresh):
                return base.__call__(self, *args, **kwargs)
        except BaseException:
            failed(self, optimized)
            raise
        finally:
            for name in names:
                in_call(getattr(self, name), None)

    pipe.__class__ = type(base.__name__, (base,), {"__call__": __call__, "_dittofx_base": base, "_dittofx_names": names})


def detach_refresh(pipe: Any) -> None:
    pipe.__class__ = type(pipe)._dittofx_base
