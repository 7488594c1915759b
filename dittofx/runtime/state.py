"""Per-branch cache state, held as (non-persistent) module buffers.

Everything that changes from step to step is a tensor updated in place inside the graph, so
dynamo never sees a per-step Python value (which would recompile every step) and CUDA graphs see
fixed addresses. Buffers are non-persistent: `state_dict()` is unchanged by `optimize`.
"""

from __future__ import annotations

import contextlib
import math

import torch

__all__ = ["CacheState", "CacheStates", "HISTORY", "SCALARS", "mark_static", "normal_tensors", "state_names"]

HISTORY = 1024  # steps of per-request history kept for `summary()`

# name -> dtype of the 0-d counters, in the order the rewritten graph takes them
SCALARS = {
    "step": torch.int64,  # index of the step about to run, in this branch's current request
    "num_steps": torch.int64,  # request length; 0 = unknown (new request detected from the timestep)
    "last_ts": torch.float32,  # timestep of the previous call (request detection)
    "valid": torch.int64,  # residual levels stored (0 = nothing stored yet; Taylor order k: up to k+1)
    "cached_count": torch.int64,  # cached steps in this request
    "cont_count": torch.int64,  # current run of consecutive cached steps
    "acc": torch.float32,  # sum of the diffs of the cached steps since the last compute
}


def mark_static(t: torch.Tensor) -> None:
    """A fixed address for CUDA graphs. Guarded as dynamo guards what it marks itself: with
    inductor's freezing on, an unguarded static tensor is baked into the graph as a constant."""
    torch._dynamo.mark_static_address(t, guard=torch._dynamo.utils.is_parameter_freezing())


@contextlib.contextmanager
def normal_tensors():
    """Tensors made here are normal ones whatever mode the call is in (a context or a decorator):
    kept across calls, they must take updates outside inference mode too. Grad off as well, which
    inference_mode(False) turns on."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def state_names(num_residuals: int, norms: bool = False) -> list[str]:
    """The state tensors in the order the rewritten graph takes them (its leading placeholders).
    `norms`: DBPrune's per-block input norms."""
    residuals = [f"residual_{j}" for j in range(num_residuals)]
    return [*SCALARS, "hist_diff", "hist_cached", "mask", "taylor_times", "p", *residuals, *(["norms"] if norms else [])]


class CacheState(torch.nn.Module):
    """State of one cached region for one CFG branch.

    `p` is the Fn residual stored at the last computed step; `residuals[j]` holds the middle
    residual of carried value j as `[levels, *shape]` (levels = 1, or k+1 Taylor derivatives).
    """

    @normal_tensors()  # made on the first call, whatever mode it runs in
    def __init__(
        self,
        p_like: torch.Tensor,
        carried_like: list[torch.Tensor],
        levels: int,
        num_steps: int | None,
        mask: list[int] | None,
        residual_dtype: torch.dtype | None = None,
        p_slots: int = 1,
        norms: bool = False,
    ):
        super().__init__()
        device = p_like.device
        for name, dtype in SCALARS.items():
            self.register_buffer(name, torch.zeros((), dtype=dtype, device=device), persistent=False)
        self.num_steps.fill_(num_steps or 0)
        self.last_ts.fill_(-math.inf)
        self.register_buffer("hist_diff", torch.full((HISTORY,), math.nan, device=device), persistent=False)
        self.register_buffer("hist_cached", torch.full((HISTORY,), -1, dtype=torch.int8, device=device), persistent=False)
        self.register_buffer("mask", torch.zeros(HISTORY, dtype=torch.int8, device=device), persistent=False)
        self.set_mask(mask)
        # positions of the last `levels` computed steps, newest first: the step index, or minus the
        # timestep (so positions grow); the gap since the last compute and Newton's nodes come from it
        self.register_buffer("taylor_times", torch.zeros(levels, device=device), persistent=False)
        # the stored signal (p_slots = 1); DBPrune: one slot per prunable block, its input at its last run
        self.register_buffer("p", p_like.new_zeros((p_slots, *p_like.shape)), persistent=False)
        self.has_norms = norms
        if norms:  # DBPrune: per prunable block, per sample, sum|block input| at its last run
            self.register_buffer("norms", torch.zeros((p_slots, p_like.shape[0]), device=device), persistent=False)
        self.residual_names = []
        for j, like in enumerate(carried_like):
            name = f"residual_{j}"
            shape = (levels, *like.shape)
            self.register_buffer(name, like.new_zeros(shape, dtype=residual_dtype or like.dtype), persistent=False)
            self.residual_names.append(name)
        self.shapes = (tuple(p_like.shape), tuple(tuple(c.shape) for c in carried_like), p_like.dtype, device)
        self._names = state_names(len(self.residual_names), norms)  # the graph's order, read at every step
        for t in self.buffers():  # fixed addresses for CUDA graphs, however a graph is handed them
            mark_static(t)

    def _apply(self, fn, recurse=True):
        """model.to / .cuda move the buffers: as normal tensors, as at their making. A cast leaves
        their dtypes as made (fp32 sums and history, fp32 residuals under TaylorSeer): a model whose
        graph's dtype changed gets a new state anyway (Engine._state_for), and a `.to(torch.bfloat16)`
        of a model already in bf16, which keeps its state, cast it to bf16 for good."""
        before = dict(self._buffers)
        with normal_tensors():
            out = super()._apply(fn, recurse)
            for name, old in before.items():
                new = self._buffers[name]
                if new.dtype != old.dtype:
                    self._buffers[name] = old.to(device=new.device)  # (from the original: no round trip through the cast)
        return out

    def tensors(self) -> list[torch.Tensor]:
        """The flat list the rewritten graph takes, in its placeholder order."""
        buffers = self._buffers  # live: model.to() remakes them
        return [buffers[n] for n in self._names]

    @torch.no_grad()
    def reset(self, num_steps: int | None = None) -> None:
        """Forget the request: the next call computes. `num_steps` None keeps the request length."""
        for name in SCALARS:
            if name != "num_steps":
                getattr(self, name).zero_()
        self.last_ts.fill_(-math.inf)
        if num_steps is not None:
            self.num_steps.fill_(num_steps)
        self.hist_diff.fill_(math.nan)
        self.hist_cached.fill_(-1)

    @torch.no_grad()
    def set_mask(self, mask: list[int] | None) -> None:
        """Steps past the end of the mask count as 0 (SPEC §5)."""
        self.mask.zero_()
        if mask:
            values = torch.tensor(mask[:HISTORY], dtype=torch.int8)
            self.mask[: values.numel()].copy_(values)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class CacheStates(torch.nn.ModuleDict):
    """The engine's states by CFG branch. Moved out of "meta" (`model.to_empty`) they would hold
    whatever the memory held: they are dropped instead, and each branch's next call makes a new one."""

    def _apply(self, fn, recurse=True):
        was_meta = any(t.is_meta for t in self.buffers())
        out = super()._apply(fn, recurse)
        if was_meta and not any(t.is_meta for t in self.buffers()):
            self.clear()
        return out
