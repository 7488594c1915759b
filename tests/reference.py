"""A naive, independent implementation of SPEC §3 (DBCache) that runs the ORIGINAL model's blocks
by hand: it wraps each block's `forward` in Python, measures the Fn residual in float64, applies
the gates in plain Python, and on a cached step replaces the middle blocks by pass-throughs and
adds the stored residual at the end of the middle. No code is shared with dittofx.

Block I/O conventions are learned from one clean run: output k of block j is the new value of the
block's argument of the same shape (ties broken by the name under which block j+1 receives it),
so a skipped block is the identity on its streams, with no per-model code. The residual is taken
against a second pass with the middle blocks as identities, so code between blocks (FLUX.2's cat
of the text and image streams) is kept, as SPEC's "carried values after Fn + R" requires.
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
    mask: list[int] | None = None  # steps computation mask (SPEC §5)
    static_mask: bool = False
    taylor_order: int = 0  # 0: reuse the residual; k >= 1: TaylorSeer of order k (SPEC §4)
    taylor_gap: str = "steps"  # or "timestep": gaps measured in the timestep input's units


@dataclass
class _Step:
    skeleton: bool = False  # run the middle blocks as identities, to get the base of the residual
    base: tuple = ()
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
    def __init__(self, model: torch.nn.Module, block_lists: tuple[str, ...], cfg: NaiveConfig, formats: list[list[str]] | None = None):
        self.model, self.cfg = model, cfg
        self.blocks = [b for name in block_lists for b in model.get_submodule(name)]
        self.n = len(self.blocks)
        self.formats: list[list[str]] | None = None
        self.given_formats = formats  # per block in run order, read from the model's source: no learning
        self.step = 0
        self.p = None
        self.D: list[list[torch.Tensor]] | None = None  # per stream: the residual, or its Taylor derivatives
        self.last_compute = 0
        self.ts = self.last_compute_ts = 0.0
        self.cached_count = 0
        self.cont = 0
        self.acc = 0.0
        self.cached_steps: list[int] = []
        self.diffs: list[float] = []

    # --- learning the stream names ---------------------------------------------------------
    def _learn(self, kwargs: dict) -> None:
        """formats[j][k]: the argument of block j that its output k is the new value of (same
        shape; ties broken by the name under which block j+1 receives that output)."""
        ins, outs, calls = {}, {}, []

        def record(j, module, args, kwargs, out):
            ins[j], outs[j] = _bind(module.forward, args, kwargs), out
            calls.append(j)

        hooks = [
            b.register_forward_hook(lambda m, a, kw, o, j=j: record(j, m, a, kw, o), with_kwargs=True)
            for j, b in enumerate(self.blocks)
        ]
        with torch.no_grad():
            self.model(**kwargs)
        for h in hooks:
            h.remove()
        order = list(dict.fromkeys(calls))  # run order: lists may interleave (Latte)
        self.blocks = [self.blocks[j] for j in order]
        ins, outs = {i: ins[j] for i, j in enumerate(order)}, {i: outs[j] for i, j in enumerate(order)}
        self.formats = []
        if self.given_formats is not None:
            self.formats = [list(f) for f in self.given_formats]
            return
        for j in range(self.n):
            names = []
            for pos, o in enumerate(_as_tuple(outs[j])):
                if o is None:  # e.g. SD3's last block returns no text stream
                    names.append(None)
                    continue
                same = [k for k, v in ins[j].items() if isinstance(v, torch.Tensor) and v.shape == o.shape and v.dtype == o.dtype]
                if len(same) > 1 and j + 1 < self.n:
                    same = [k for k in same if ins[j + 1].get(k) is o] or same
                if len(same) > 1 and j > 0:  # the last block: as the block before it
                    same = [k for k in same if k == self.formats[j - 1][pos]] or same
                if len(same) != 1:
                    raise UnsupportedByReference(f"block {j}: cannot tell which argument output {len(names)} updates: {same}")
                names.append(same[0])
            self.formats.append(names)

    # --- the gates of SPEC §3 --------------------------------------------------------------
    def _decide(self, r: torch.Tensor) -> tuple[bool, float]:
        c, s = self.cfg, self.step
        if s < c.max_warmup_steps and s % c.warmup_interval == 0:
            return False, math.nan
        if self.p is None:
            return False, math.nan
        if c.mask is not None:
            if s < len(c.mask) and c.mask[s] == 1:
                return False, math.nan
            if c.static_mask:
                return True, math.nan
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

    def _signal(self, named: dict, st: "_Step") -> torch.Tensor:
        """What the decision measures: the Fn residual (TeaCache overrides)."""
        return st.r

    def _run(self, kwargs: dict, st: "_Step"):
        cfg, n = self.cfg, self.n
        mid_lo, mid_hi = cfg.Fn, n - cfg.Bn - 1  # inclusive middle range
        originals = [b.forward for b in self.blocks]

        def wrap(j, orig):
            def forward(*args, **kw):
                named = _bind(orig, args, kw)
                if j == 0:  # the hidden stream: the largest carried argument (image tokens > text tokens)
                    st.hidden = max((k for k in self.formats[0] if k), key=lambda k: named[k].numel())
                    st.h0 = named[st.hidden]
                if j == cfg.Fn and not st.skeleton:  # the carried hidden after Fn, as block Fn-1 returns it
                    last = self.formats[cfg.Fn - 1] if cfg.Fn else []  # (Latte reshapes it before block Fn reads it)
                    h_fn = st.outs[cfg.Fn - 1][last.index(st.hidden)] if st.hidden in last else named[st.hidden]
                    st.r = h_fn - st.h0
                    st.skip, st.diff = self._decide(self._signal(named, st))
                if (st.skip or st.skeleton) and mid_lo <= j <= mid_hi:  # the block as identity
                    out = tuple(named[name] if name else None for name in self.formats[j])
                    if j == mid_hi and st.skeleton:
                        st.base = out
                    elif j == mid_hi:
                        out = tuple(o + r if o is not None else None for o, r in zip(out, self._forecast()))
                    return out if len(out) > 1 else out[0]
                out = orig(*args, **kw)
                st.outs[j] = _as_tuple(out)
                return out

            return forward

        for j, b in enumerate(self.blocks):
            b.forward = wrap(j, originals[j])
        try:
            with torch.no_grad():
                return self.model(**kwargs)
        finally:
            for b in self.blocks:
                del b.forward

    def _store(self, residuals: list) -> None:
        """SPEC §4: D0 = R_new, D(i+1) = (D(i)_new - D(i)_old) / w where D(i)_old exists."""
        k, w = self.cfg.taylor_order, self._gap()
        new = []
        for j, r in enumerate(residuals):
            if r is None:
                new.append(None)
                continue
            old = self.D[j] if self.D else []
            levels = [r.float()]
            for i in range(min(len(old), k)):
                levels.append((levels[i] - old[i]) / w)
            new.append(levels)
        self.D = new

    def _gap(self) -> float:
        if self.cfg.taylor_gap == "timestep":
            return self.last_compute_ts - self.ts
        return float(self.step - self.last_compute)

    def _forecast(self) -> list:
        e = self._gap()
        return [
            None if levels is None else sum(d * e**i / math.factorial(i) for i, d in enumerate(levels))
            for levels in self.D
        ]

    def __call__(self, **kwargs):
        if self.formats is None:
            self._learn(kwargs)
        cfg = self.cfg
        mid_lo, mid_hi = cfg.Fn, self.n - cfg.Bn - 1
        if "timestep" in kwargs:
            self.ts = float(kwargs["timestep"].reshape(-1)[0])
        st = _Step()
        out = self._run(kwargs, st)
        if st.skip:
            self.cached_count += 1
            self.cont += 1
            self.acc += 0.0 if math.isnan(st.diff) else st.diff
            self.cached_steps.append(self.step)
        else:
            self.cont, self.acc = 0, 0.0
            self.p = st.r
            if mid_lo <= mid_hi:  # the residual against the middle run as identity (a second pass)
                skeleton = _Step(skeleton=True)
                self._run(kwargs, skeleton)
                residuals = [o - b if o is not None else None for o, b in zip(st.outs[mid_hi], skeleton.base)]
                self._store(residuals)
            self.last_compute, self.last_compute_ts = self.step, self.ts
        self.diffs.append(st.diff)
        self.step += 1
        return out


class NaiveTeaCache(NaiveDBCache):
    """SPEC §6 by hand: `modulate(block0, its bound arguments)` (a hand-written function per model
    class, given by the test) is the modulated input; the rescaled relative L1 against the previous
    step's accumulates; the whole chain is skipped (Fn = Bn = 0) while the sum stays under the
    threshold; step 0 and the last step compute. Batch > 1: the largest per-sample distance."""

    def __init__(self, model, block_lists, modulate, coefficients, threshold: float, num_steps: int):
        super().__init__(model, block_lists, NaiveConfig(Fn=0, Bn=0, threshold=threshold))
        self.modulate, self.coefficients, self.num_steps = modulate, list(coefficients), num_steps
        self.prev_m = None

    def _signal(self, named: dict, st: "_Step") -> torch.Tensor:
        self.m = self.modulate(self.blocks[0], named)
        return self.m

    def _decide(self, m: torch.Tensor) -> tuple[bool, float]:
        if self.step in (0, self.num_steps - 1) or self.prev_m is None or self.D is None:
            return False, math.nan
        rel = [((a - b).abs().sum() / b.abs().sum()).item() for a, b in zip(m.double(), self.prev_m.double())]
        degree = len(self.coefficients) - 1
        distance = max(sum(c * r ** (degree - i) for i, c in enumerate(self.coefficients)) for r in rel)
        if not math.isfinite(distance):
            return False, math.nan
        return self.acc + distance < self.cfg.threshold, distance

    def __call__(self, **kwargs):
        out = super().__call__(**kwargs)
        self.prev_m = self.m  # every step, cached or not
        return out


class NaiveDBPrune(NaiveDBCache):
    """SPEC §7 by hand, in the one-reduction form dittofx documents: at the first middle block, for
    every prunable block j, d_j = max over samples of sum|x - x_j| / sum|input_j|, with x the middle's
    input now and x_j, input_j the middle's input and block j's own input when block j last ran;
    d_j < threshold (and not a warmup step, and not the request's first step) -> block j returns
    its inputs plus its stored residuals instead of running."""

    def __init__(self, model, block_lists, *, Fn: int, Bn: int, threshold: float, max_warmup_steps: int = 0,
                 warmup_interval: int = 1, non_prune: tuple[int, ...] = ()):  # fmt: skip
        super().__init__(model, block_lists, NaiveConfig(Fn=Fn, Bn=Bn, threshold=threshold,
                                                         max_warmup_steps=max_warmup_steps, warmup_interval=warmup_interval))  # fmt: skip
        self.prunable = [j for j in range(Fn, self.n - Bn) if j not in non_prune]
        self.stored: dict[int, tuple] = {}  # j -> (x_j, norms_j per sample, residuals per output)
        self.pruned_per_step: list[int] = []

    def _prune_run(self, kwargs: dict) -> tuple:
        cfg, c = self.cfg, self.cfg
        originals = [b.forward for b in self.blocks]
        warm = self.step < c.max_warmup_steps and self.step % c.warmup_interval == 0
        decided: dict[int, bool] = {}
        diffs: list[float] = []

        def wrap(j, orig):
            def forward(*args, **kw):
                named = _bind(orig, args, kw)
                names = self.formats[j]
                hidden = max((k for k in names if k), key=lambda k: named[k].numel())
                if j == cfg.Fn:  # all decisions, here
                    x = named[hidden].double()
                    for i in self.prunable:
                        if warm or i not in self.stored:
                            decided[i] = False
                            continue
                        xj, nj, _ = self.stored[i]
                        per_sample = [((a - b).abs().sum() / (n + 1e-12)).item() for a, b, n in zip(x, xj, nj)]
                        diffs.append(max(per_sample))
                        decided[i] = all(math.isfinite(d) and d < cfg.threshold for d in per_sample)
                    self._x = x
                if decided.get(j):
                    out = tuple(named[k] + r if k else None for k, r in zip(names, self.stored[j][2]))
                    return out if len(out) > 1 else out[0]
                out = orig(*args, **kw)
                if j in self.prunable:
                    res = tuple(o - named[k] if k else None for o, k in zip(_as_tuple(out), names))
                    norms = [v.abs().sum().item() for v in named[hidden].double()]
                    self.stored[j] = (self._x, norms, res)
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
        return out, sum(decided.values()), max(diffs) if diffs else math.nan

    def __call__(self, **kwargs):
        if self.formats is None:
            self._learn(kwargs)
        out, pruned, diff = self._prune_run(kwargs)
        self.pruned_per_step.append(pruned)
        if pruned:
            self.cached_steps.append(self.step)
        self.diffs.append(diff)
        self.step += 1
        return out
