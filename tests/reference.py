"""A naive, independent implementation of SPEC §3 (DBCache) that runs the ORIGINAL model's blocks
by hand: it wraps each block's `forward` in Python, measures the Fn residual in float64, applies
the gates in plain Python, and on a cached step replaces the middle blocks by pass-throughs and
adds the stored residual at the end of the middle. No code is shared with dittofx.

Block I/O conventions are learned from one clean run: output position k of block j is the tensor
block j+1 receives as argument `name` (identity), so streams are known by their argument names
("hidden_states", "encoder_hidden_states", ...) without any per-model code.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch


@dataclass
class NaiveConfig:
    Fn: int = 1
    Bn: int = 0
    threshold: float = 0.1
    max_warmup_steps: int = 0
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    max_accumulated: float | None = None


@dataclass
class _Step:
    hidden: str = ""
    h0: torch.Tensor | None = None
    outs: dict = field(default_factory=dict)
    skip: bool = False
    diff: float = math.nan


class UnsupportedByReference(Exception):
    pass


def _bind(fn, args, kwargs) -> dict:
    bound = inspect.signature(fn).bind(*args, **kwargs)
    named = {}
    for name, value in bound.arguments.items():
        if isinstance(value, dict) and inspect.signature(fn).parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


class NaiveDBCache:
    def __init__(self, model: torch.nn.Module, block_lists: tuple[str, ...], cfg: NaiveConfig):
        self.model, self.cfg = model, cfg
        self.blocks = [b for name in block_lists for b in model.get_submodule(name)]
        self.n = len(self.blocks)
        self.formats: list[list[str]] | None = None
        self.step = 0
        self.p = None
        self.R: dict[str, torch.Tensor] | None = None
        self.cached_count = 0
        self.cont = 0
        self.acc = 0.0
        self.cached_steps: list[int] = []
        self.diffs: list[float] = []

    # --- learning the stream names ---------------------------------------------------------
    def _learn(self, kwargs: dict) -> None:
        ins, outs = {}, {}

        def record(j, module, args, kwargs, out):
            ins[j], outs[j] = _bind(module.forward, args, kwargs), out

        hooks = [
            b.register_forward_hook(lambda m, a, kw, o, j=j: record(j, m, a, kw, o), with_kwargs=True)
            for j, b in enumerate(self.blocks)
        ]
        with torch.no_grad():
            self.model(**kwargs)
        for h in hooks:
            h.remove()
        formats = []
        for j in range(self.n - 1):
            names = []
            for o in _as_tuple(outs[j]):
                match = [k for k, v in ins[j + 1].items() if v is o]
                names.append(match[0] if match else None)
            if None in names:
                raise UnsupportedByReference(f"block {j}'s outputs do not flow unchanged into block {j + 1}")
            formats.append(names)
        formats.append(formats[-1])
        self.formats = formats

    # --- the gates of SPEC §3 --------------------------------------------------------------
    def _decide(self, r: torch.Tensor) -> tuple[bool, float]:
        c, s = self.cfg, self.step
        if s < c.max_warmup_steps and s % c.warmup_interval == 0:
            return False, math.nan
        if self.p is None:
            return False, math.nan
        if c.max_cached_steps >= 0 and self.cached_count == c.max_cached_steps:
            return False, math.nan
        if c.max_continuous_cached_steps >= 0 and self.cont == c.max_continuous_cached_steps:
            return False, math.nan
        per_sample = [
            ((ri - pi).abs().sum() / (pi.abs().sum() + 1e-12)).item()
            for ri, pi in zip(r.double(), self.p.double())
        ]
        diff = max(per_sample)
        if not all(math.isfinite(d) for d in per_sample):
            return False, math.nan
        if c.max_accumulated is not None and any(self.acc + d > c.max_accumulated for d in per_sample):
            return False, diff
        return all(d < c.threshold for d in per_sample), diff

    def __call__(self, **kwargs):
        if self.formats is None:
            self._learn(kwargs)
        cfg, n = self.cfg, self.n
        mid_lo, mid_hi = cfg.Fn, n - cfg.Bn - 1  # inclusive middle range
        st = _Step()
        originals = [b.forward for b in self.blocks]

        def wrap(j, orig):
            def forward(*args, **kw):
                named = _bind(orig, args, kw)
                if j == 0:  # the hidden stream: the largest carried argument (image tokens > text tokens)
                    st.hidden = max(self.formats[0], key=lambda k: named[k].numel())
                    st.h0 = named[st.hidden]
                if st.skip and mid_lo <= j <= mid_hi:
                    streams = {name: named[name] for name in self.formats[j]}
                    if j == mid_hi:
                        streams = {k: v + self.R[k] for k, v in streams.items()}
                    out = tuple(streams[name] for name in self.formats[j])
                    return out if len(out) > 1 else out[0]
                out = orig(*args, **kw)
                st.outs[j] = dict(zip(self.formats[j], _as_tuple(out)))
                if j == cfg.Fn - 1:
                    r = st.outs[j][st.hidden] - st.h0
                    st.skip, st.diff = self._decide(r)
                    st.r = r
                return out

            return forward

        for j, b in enumerate(self.blocks):
            b.forward = wrap(j, originals[j])
        try:
            with torch.no_grad():
                out = self.model(**kwargs)
        finally:
            for b in self.blocks:
                del b.forward
        if st.skip:
            self.cached_count += 1
            self.cont += 1
            self.acc += st.diff
            self.cached_steps.append(self.step)
        else:
            self.cont, self.acc = 0, 0.0
            self.p = st.r
            if mid_lo <= mid_hi:
                before, after = st.outs[cfg.Fn - 1], st.outs[mid_hi]
                self.R = {k: after[k] - before[k] for k in after if k in before}
        self.diffs.append(st.diff)
        self.step += 1
        return out
