"""DBCache around the blocks, in eager Python: for a forward torch.export cannot capture.

Some models branch in Python on tensor values (`mask.sum(1).tolist()`, `if tensor.all():`), so
their forward is no graph. Their blocks still hand the carried streams straight from one to the
next, so SPEC §3 applies around the blocks instead: each block's `forward` is wrapped, the first
middle block makes the decision with the same gate functions the rewritten graph calls, and on a
cached step the middle blocks hand their streams through while the last one returns the carried
value plus the stored residual (or the Taylor forecast). Which argument each block output updates
is learned from one recorded call, by identity: block j+1 receives block j's output as that argument.
Costs against the graph path: every decided step syncs the host, and torch.compile gets the same
graph breaks the model has on its own.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from . import gates

__all__ = ["BlockChain", "Blockwise", "BlockwiseError", "bind_arguments", "learn_chain"]


class BlockwiseError(ValueError):
    pass


_REPLAY = "dittofx-replay-check"  # the state branch of `Blockwise.replay_check`


def bind_arguments(fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """`fn`'s arguments by name (a `**kwargs` parameter's items at top level)."""
    sig = inspect.signature(fn)
    named = {}
    for name, value in sig.bind(*args, **kwargs).arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def _outputs(out: Any) -> tuple:
    return out if isinstance(out, tuple) else (out,)


@dataclass
class BlockChain:
    """The blocks in run order and, per block, the argument each of its outputs updates."""

    lists: list[str]
    candidates: list[str]
    paths: list[str]
    modules: list[torch.nn.Module]
    streams: list[tuple[str | None, ...]]  # per block, per output: the argument it updates (None: returns None)
    returns_tuple: list[bool]
    hidden: str  # the stream the residual diff measures: the largest one entering the chain

    def __len__(self) -> int:
        return len(self.modules)


def _block_lists(model: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """ModuleLists of one block class with weights, outermost only (not a block's own lists)."""
    found: dict[str, torch.nn.ModuleList] = {}
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(f"{outer}.") for outer in found):
            continue
        if len({type(b) for b in module}) == 1 and any(True for _ in module[0].parameters()):
            found[path] = module
    return found


@dataclass
class _Call:
    list_path: str
    index: int
    module: torch.nn.Module
    inputs: dict[str, Any]
    outputs: tuple
    tuple_out: bool


def _record(model: torch.nn.Module, lists: dict[str, torch.nn.ModuleList], run: Callable[[], Any]) -> list[_Call]:
    calls: list[_Call] = []

    def hook(path: str, i: int):
        def record(module, args, kwargs, out):
            named = bind_arguments(module.forward, args, kwargs)
            calls.append(_Call(path, i, module, named, _outputs(out), isinstance(out, tuple)))

        return record

    handles = [b.register_forward_hook(hook(path, i), with_kwargs=True) for path, lst in lists.items() for i, b in enumerate(lst)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return calls


def _hands_on(prev: _Call, nxt: _Call) -> tuple[str | None, ...] | str:
    """The argument of `nxt` each output of `prev` is passed as, or why they do not chain."""
    names: list[str | None] = []
    for k, out in enumerate(prev.outputs):
        if out is None:
            names.append(None)
            continue
        name = next((n for n, v in nxt.inputs.items() if v is out), None)
        if name is None:
            return f"output {k} of {prev.list_path}.{prev.index} does not reach {nxt.list_path}.{nxt.index} unchanged"
        mine = prev.inputs.get(name)
        if not isinstance(mine, torch.Tensor) or mine.shape != out.shape or mine.dtype != out.dtype:
            return f"output {k} of {prev.list_path}.{prev.index} is no new value of its own argument {name!r}"
        names.append(name)
    return tuple(names)


def learn_chain(model: torch.nn.Module, run: Callable[[], Any], block_lists: tuple[str, ...] | None) -> BlockChain:
    """The block chain of `model` and its streams, from one call (`run`). The main list is the one
    with the most weights among those whose blocks each ran once; neighbouring lists join when the
    streams pass between them unchanged. `block_lists` (the config's `blocks`) names them instead."""
    lists = _block_lists(model)
    model_name = type(model).__name__
    if block_lists is not None:
        missing = [name for name in block_lists if name not in lists]
        if missing:
            raise BlockwiseError(
                f"blocks={list(block_lists)!r}: {missing} not found as block lists of {model_name}; found: {sorted(lists)}"
            )
    calls = _record(model, lists, run)
    ran_once = [p for p, lst in lists.items() if sorted(c.index for c in calls if c.list_path == p) == list(range(len(lst)))]
    if block_lists is not None:
        not_run = [name for name in block_lists if name not in ran_once]
        if not_run:
            raise BlockwiseError(f"blocks={list(block_lists)!r}: {not_run} did not run each block once per call of {model_name}")
        chosen = list(block_lists)
    elif ran_once:
        chosen = [max(ran_once, key=lambda p: sum(w.numel() for w in lists[p].parameters()))]
    else:
        raise BlockwiseError(
            f"no transformer block chain found in {model_name}: no ModuleList of blocks ran each block once per call (lists: {sorted(lists)})"
        )
    seq = [c for c in calls if c.list_path in ran_once]
    first = min(i for i, c in enumerate(seq) if c.list_path in chosen)
    last = max(i for i, c in enumerate(seq) if c.list_path in chosen)
    if block_lists is None:  # grow over whole neighbouring lists while the streams chain
        first, last = _grow(seq, first, last, lists)
    chain = seq[first : last + 1]
    chain_lists = list(dict.fromkeys(c.list_path for c in chain))
    if (block_lists is not None and chain_lists != list(block_lists)) or len(chain) != sum(len(lists[p]) for p in chain_lists):
        raise BlockwiseError(f"blocks={chosen!r}: they do not run one after another, each block once, in {model_name} (ran: {chain_lists})")
    streams = []
    for prev, nxt in zip(chain, chain[1:]):
        names = _hands_on(prev, nxt)
        if isinstance(names, str):
            raise BlockwiseError(f"{names}: each block must hand its streams straight to the next (code between blocks changes them)")
        streams.append(names)
    streams.append(_last_streams(chain, streams))
    hidden = max((s for s in streams[0] if s), key=lambda s: chain[0].inputs[s].numel())
    return BlockChain(
        lists=chain_lists,
        candidates=sorted(lists),
        paths=[f"{c.list_path}.{c.index}" for c in chain],
        modules=[c.module for c in chain],
        streams=streams,
        returns_tuple=[c.tuple_out for c in chain],
        hidden=hidden,
    )


def _grow(seq: list[_Call], first: int, last: int, lists: dict) -> tuple[int, int]:
    while first > 0 and not isinstance(_hands_on(seq[first - 1], seq[first]), str):
        size = len(lists[seq[first - 1].list_path])
        if first - size < 0 or any(c.list_path != seq[first - 1].list_path for c in seq[first - size : first]):
            break
        first -= size
    while last + 1 < len(seq) and not isinstance(_hands_on(seq[last], seq[last + 1]), str):
        size = len(lists[seq[last + 1].list_path])
        if any(c.list_path != seq[last + 1].list_path for c in seq[last + 1 : last + 1 + size]) or last + size >= len(seq):
            break
        last += size
    return first, last


def _last_streams(chain: list[_Call], streams: list[tuple]) -> tuple[str | None, ...]:
    """The last block hands its outputs to no block: as the block before it of the same class, or
    the one input of each output's shape."""
    last = chain[-1]
    if len(chain) > 1 and type(last.module) is type(chain[-2].module) and len(streams[-1]) == len(last.outputs):
        return tuple(name if out is not None else None for name, out in zip(streams[-1], last.outputs))
    names: list[str | None] = []
    for k, out in enumerate(last.outputs):
        if out is None:
            names.append(None)
            continue
        same = [n for n, v in last.inputs.items() if isinstance(v, torch.Tensor) and v.shape == out.shape and v.dtype == out.dtype]
        if len(same) != 1:
            raise BlockwiseError(f"{last.list_path}.{last.index}: cannot tell which argument its output {k} updates ({same})")
        names.append(same[0])
    return tuple(names)


@dataclass
class _Step:
    """One call's progress through the chain."""

    branch: str
    decision: str  # the host's: "compute", "cache" or "device" (measure the diff)
    timestep: torch.Tensor | None
    h0: torch.Tensor | None = None
    skip: bool = False
    bases: list[torch.Tensor] = field(default_factory=list)  # the carried streams entering the middle
    forecasts: list[torch.Tensor] = field(default_factory=list)  # a cached step's middle outputs
    finish: Callable[[list[torch.Tensor]], None] | None = None


class Blockwise:
    """The step logic of the rewritten graph (`passes/rewrite.py`), run from wrapped block forwards."""

    def __init__(self, engine: Any, chain: BlockChain, fn_blocks: int, bn_blocks: int):
        n = len(chain)
        if fn_blocks + bn_blocks > n:
            raise BlockwiseError(
                f"Fn_compute_blocks + Bn_compute_blocks = {fn_blocks} + {bn_blocks} = {fn_blocks + bn_blocks}: "
                f"must be <= the number of blocks in the chain ({n}: {chain.lists})"
            )
        self.engine, self.chain = engine, chain
        self.lo, self.hi = fn_blocks, n - bn_blocks - 1  # the middle, inclusive
        self.carried = [s for s in chain.streams[self.hi] if s] if self.lo <= self.hi else []
        self.step: _Step | None = None
        self._saved: list[Any] = []

    def install(self) -> None:
        for j, block in enumerate(self.chain.modules):
            self._saved.append(block.__dict__.get("forward"))
            block.forward = self._wrap(j, block.forward)

    def remove(self) -> None:
        for block, saved in zip(self.chain.modules, self._saved):
            block.__dict__.pop("forward", None)
            if saved is not None:
                block.forward = saved
        self._saved = []

    def start(self, branch: str, decision: str, timestep: torch.Tensor | None) -> None:
        self.step = _Step(branch, decision, timestep)

    def replay_check(self, run: Callable[[], Any]) -> None:
        """Raise if cached steps would be wrong for this model. A computed step, then the same
        inputs replayed as a cached step, must agree: a forward that reads a middle block's output
        outside the chain (features collected for the end) gets the middle's input there on a
        cached step, which the block hooks cannot see, and the replay can."""
        if self.lo > self.hi:
            return
        outs = []
        try:
            for decision in ("compute", "cache"):  # the first is computed anyway: a fresh state
                self.start(_REPLAY, decision, None)
                outs.append(pytree.tree_leaves(run()))
        finally:
            self.step = None
            del self.engine.states[_REPLAY]
            self.engine.host.pop(_REPLAY, None)
        for k, (a, b) in enumerate(zip(*outs)):
            if not isinstance(a, torch.Tensor):
                continue
            tol = 1e-3 if a.dtype in (torch.float32, torch.float64) else 3e-2
            if not torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * (a.float().abs().max().item() + 1e-6)):
                raise BlockwiseError(
                    f"a cached step replaying a computed one changes output {k} (by up to {(a.float() - b.float()).abs().max().item():.3g}): "
                    f"the forward reads a middle block's output outside the block chain"
                )

    def _wrap(self, j: int, original: Callable) -> Callable:
        chain, lo, hi = self.chain, self.lo, self.hi

        def forward(*args: Any, **kwargs: Any) -> Any:
            st = self.step
            if st is None or not (j == 0 or lo <= j <= hi):
                return original(*args, **kwargs)
            named = bind_arguments(original, args, kwargs)
            if j == 0:
                st.h0 = named[chain.hidden]
            if j == lo:
                self._decide(st, named)
            if st.skip:  # the block hands its streams through; the middle's last adds the residual
                outs = [named[s] if s else None for s in chain.streams[j]]
                if j == hi:
                    forecasts = iter(st.forecasts)
                    outs = [next(forecasts) if s else None for s in chain.streams[j]]
            else:
                out = original(*args, **kwargs)
                if j != hi:
                    return out
                outs = list(_outputs(out))
            if j == hi:
                st.finish([o for o, s in zip(outs, chain.streams[j]) if s])
                self.step = None
            return tuple(outs) if chain.returns_tuple[j] else outs[0]

        return forward

    @torch._dynamo.disable  # under torch.compile: the decision runs eagerly, the blocks compiled
    @torch.no_grad()
    def _decide(self, st: _Step, named: dict[str, Any]) -> None:
        """At the middle's first block: begin_step, the gates and the diff, as the graph does."""
        engine, opt = self.engine, self.engine.options
        h_fn, st.bases = named[self.chain.hidden], [named[s] for s in self.carried]
        s, fresh = engine.blockwise_state(st.branch, h_fn, st.bases)  # s: the branch's CacheState
        if fresh:  # new sizes: nothing stored for them
            st.decision = "compute"
        gates.begin_step(
            s.step, s.num_steps, s.last_ts, s.valid, s.cached_count, s.cont_count, s.acc, s.hist_diff, s.hist_cached, st.timestep
        )
        now = gates.position(s.step, s.last_ts, in_timesteps=opt.gap_in_timesteps)
        elapsed = gates.since_last_compute(now, s.taylor_times)
        at = (s.valid, elapsed, s.taylor_times, now) if opt.newton else (s.valid, elapsed)
        if st.decision == "device":
            gate = gates.step_gate(s.step, s.valid, s.cached_count, s.cont_count, s.mask, s.num_steps, **opt.gate_options())
            diff, cache = gates.decide(h_fn, st.h0, s.p, gate, s.acc, threshold=opt.threshold, acc_limit=opt.acc_limit, group=opt.group)
            st.skip = bool(cache)  # the host sync: Python picks the blocks to run
        else:  # known on the host (warmup, a mask): no sync
            diff, cache = gates.fixed_decision(s.step, cache=st.decision == "cache")
            st.skip = st.decision == "cache"
        residuals = [getattr(s, name) for name in s.residual_names]
        if st.skip:
            st.forecasts = [gates.forecast(r, b, *at) for r, b in zip(residuals, st.bases)]

        @torch._dynamo.disable
        @torch.no_grad()
        def finish(outs: list[torch.Tensor]) -> None:
            gates.finish_step(
                cache, diff, s.step, elapsed, s.valid, s.cached_count, s.cont_count, s.acc, s.hist_diff, s.hist_cached,
                s.p, h_fn, st.h0, residuals, outs, st.bases, s.taylor_times, now, newton=opt.newton,
            )  # fmt: skip

        st.finish = finish
