"""DBCache and TeaCache around the blocks, in eager Python: for a forward with no graph to rewrite.

Some models branch in Python on tensor values (`mask.sum(1).tolist()`, `if tensor.all():`), so
their forward is no graph; in others the graph's middle outputs pair with no input (lengths that
depend on data). SPEC §3 applies around the blocks instead: each block's `forward` is wrapped, the
first middle block makes the decision with the same gate functions the rewritten graph calls, and
on a cached step the middle blocks hand their streams through while the last one returns what
reaches it plus the stored residual (or the Taylor forecast). Which argument each block output is
a new value of is learned from one recorded call, with no per-model code. Costs against the graph
path: every step decided on the device syncs the host, and torch.compile gets the same graph
breaks the model has on its own.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..passes.partition import fn_bn_too_large
from ..patterns.modulation import call_name, run_finding_modulation
from . import gates
from .state import normal_tensors

__all__ = ["BlockChain", "Blockwise", "BlockwiseError", "bind_arguments", "close_at_scale", "learn_chain"]


class BlockwiseError(ValueError):
    pass


class BlockwiseConfigError(BlockwiseError):
    """The config does not fit the model's chain (reported as is, as the graph path does)."""


_REPLAY = "dittofx-replay-check"  # the state branch of `Blockwise.replay_check`


def bind_arguments(sig: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call to a function of signature `sig`, by name (a `**kwargs`
    parameter's items at top level). The signature is worked out once by the caller."""
    named = {}
    for name, value in sig.bind(*args, **kwargs).arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def close_at_scale(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    """`got` equals `want` within `tol`, relative and of `want`'s largest magnitude (a check that
    two runs of the model agree, not a rounding-exact one)."""
    return torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * (want.float().abs().max().item() + 1e-6))


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
    glue: list[bool]  # per pair of neighbouring blocks: code between them changes the streams
    fn_max: int  # the largest Fn whose last block returns the hidden stream at its entering shape

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
class _BlockCall:
    list_path: str
    index: int
    module: torch.nn.Module
    inputs: dict[str, Any]
    outputs: tuple
    tuple_out: bool
    sources: dict[str, frozenset]  # per tensor input: the block calls (their numbers) and model inputs (-k-1) it comes from
    versions: dict[str, int | None]  # per tensor input: its in-place version counter on entry (None: an inference tensor)
    out_versions: tuple  # per output: its version counter on return
    number: int  # its place in the recorded calls (the tag of its outputs)


class _Provenance(TorchFunctionMode):
    """Tags each tensor made outside the blocks with the block calls (and model inputs) it comes
    from, through the code between blocks: which list continues which."""

    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0: inside a block
        self.tags: dict[int, frozenset] = {}
        self.alive: list[torch.Tensor] = []  # keeps ids unique while tags refer to them

    def tag(self, value: Any, tags: frozenset) -> None:
        for t in pytree.tree_leaves(value):
            if isinstance(t, torch.Tensor):
                self.tags[id(t)] = tags
                self.alive.append(t)

    def of(self, value: Any) -> frozenset:
        return frozenset().union(*(self.tags.get(id(t), frozenset()) for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if self.depth == 0 and name not in _SHAPE_ONLY:
            tags = self.of((args, kwargs))
            if tags:
                self.tag(out, tags)
                if name == "__setitem__" or (name.endswith("_") and not name.startswith("_")):  # in place: the destination too
                    self.tag(args[0], tags | self.of(args[0]))
        return out


# read only their argument's size, dtype and device: a buffer they make carries no stream
_SHAPE_ONLY = {"new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like", "empty_like", "full_like"}


def _record(model: torch.nn.Module, lists: dict[str, torch.nn.ModuleList], run: Callable[[], Any]) -> list[_BlockCall]:
    calls: list[_BlockCall] = []
    prov = _Provenance()

    entered: list[dict[str, int]] = []

    def enter(module, args, kwargs):
        prov.depth += 1
        named = bind_arguments(inspect.signature(module.forward), args, kwargs)
        entered.append({n: _version(v) for n, v in named.items() if isinstance(v, torch.Tensor)})

    def leave(path: str, i: int):
        def record(module, args, kwargs, out):
            prov.depth -= 1
            named = bind_arguments(inspect.signature(module.forward), args, kwargs)
            sources = {n: prov.of(v) for n, v in named.items() if isinstance(v, torch.Tensor)}
            versions = tuple(_version(o) if isinstance(o, torch.Tensor) else None for o in _outputs(out))
            number = len(calls)
            calls.append(_BlockCall(path, i, module, named, _outputs(out), isinstance(out, tuple), sources, entered.pop(), versions, number))
            prov.tag(out, frozenset([number]))

        return record

    blocks = [(path, i, b) for path, lst in lists.items() for i, b in enumerate(lst)]
    def inputs(module, args, kwargs):  # model input k is tagged -(k+1)
        for k, leaf in enumerate(pytree.tree_leaves((args, kwargs))):
            prov.tag(leaf, frozenset([-(k + 1)]))

    handles = [model.register_forward_pre_hook(inputs, with_kwargs=True)]
    handles += [b.register_forward_pre_hook(enter, with_kwargs=True) for _, _, b in blocks]
    handles += [b.register_forward_hook(leave(path, i), with_kwargs=True) for path, i, b in blocks]
    try:
        # tensors made here count their in-place changes (a forward that changed an inference-mode
        # input in place would raise here: none in the zoo does)
        with normal_tensors(), prov:
            run()
    finally:
        for h in handles:
            h.remove()
    return calls


def _version(t: torch.Tensor) -> int | None:
    """Its in-place version counter; None for an inference tensor (a model input made under
    torch.inference_mode), which keeps none and is never a block's output."""
    return None if t.is_inference() else t._version


def _passes_on(prev: _BlockCall, nxt: _BlockCall) -> bool:
    """Whether `nxt` receives every output of `prev` unchanged: the same tensor objects, not
    changed in place in between."""
    return all(
        any(v is out and nxt.versions[n] == version for n, v in nxt.inputs.items())
        for out, version in zip(prev.outputs, prev.out_versions)
        if out is not None
    )


def _continues(prev: _BlockCall, nxt: _BlockCall, calls: list[_BlockCall], before: bool) -> bool:
    """Whether `nxt`'s list continues `prev`'s: the streams `nxt` updates come from `prev`'s outputs
    (through whatever code sits between them). A list before the chain must be all they come from,
    besides model inputs `prev`'s own list reads (text refiners: the image stream is a fresh input)."""
    try:
        sources = frozenset().union(*(nxt.sources[n] for n in _updates(nxt, None, None) if n))
    except BlockwiseError:
        return False
    if not before:
        return prev.number in sources
    read = frozenset().union(*(c.sources[n] for c in calls if c.list_path == prev.list_path for n in c.sources))
    return prev.number in sources and sources <= {prev.number} | {k for k in read if k < 0}


def _updates(call: _BlockCall, nxt: _BlockCall | None, before: tuple[str | None, ...] | None) -> tuple[str | None, ...]:
    """The argument of `call`'s block each of its outputs is a new value of: its one input of that
    shape and dtype; ties go to the name the next block receives the output under, then to the
    choice of the block before (same class), then to the one no other output takes (HiDream with
    as many text tokens as image tokens: the text is cut and joined again between blocks)."""
    candidates: list[list[str | None]] = []
    for k, out in enumerate(call.outputs):
        if out is None:  # e.g. SD3's last block returns no text stream
            candidates.append([None])
            continue
        same = [n for n, v in call.inputs.items() if isinstance(v, torch.Tensor) and v.shape == out.shape and v.dtype == out.dtype]
        if len(same) > 1 and nxt is not None:
            same = [n for n in same if nxt.inputs.get(n) is out] or same
        if len(same) > 1 and before is not None and k < len(before):
            same = [n for n in same if n == before[k]] or same
        candidates.append(same)
    taken = {same[0] for same in candidates if len(same) == 1}
    names: list[str | None] = []
    for k, same in enumerate(candidates):
        if len(same) > 1:
            same = [n for n in same if n not in taken] or same
        if len(same) != 1:
            raise BlockwiseError(
                f"{call.list_path}.{call.index}: cannot tell which argument its output {k} is a new value of "
                f"(inputs of its shape and dtype: {same})"
            )
        names.append(same[0])
    return tuple(names)


def learn_chain(model: torch.nn.Module, run: Callable[[], Any], block_lists: tuple[str, ...] | None) -> BlockChain:
    """The block chain of `model` and its streams, from one call (`run`). The main list is the one
    with the most weights among those whose blocks each ran once; a list right after the chain
    joins when the streams its first block updates come from the chain's last block (double then
    single blocks); a list right before, when they come from its last block alone, besides model
    inputs it reads too (not text refiners). `block_lists` (the config's `blocks`) names the lists."""
    lists = _block_lists(model)
    model_name = type(model).__name__
    if block_lists is not None:
        missing = [name for name in block_lists if name not in lists]
        if missing:
            raise BlockwiseConfigError(
                f"blocks={list(block_lists)!r}: {missing} not found as block lists of {model_name}; found: {sorted(lists)}"
            )
    calls = _record(model, lists, run)
    ran_once = [p for p, lst in lists.items() if sorted(c.index for c in calls if c.list_path == p) == list(range(len(lst)))]
    if block_lists is not None:
        not_run = [name for name in block_lists if name not in ran_once]
        if not_run:
            raise BlockwiseConfigError(f"blocks={list(block_lists)!r}: {not_run} did not run each block once per call of {model_name}")
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
    if block_lists is None:  # grow over whole neighbouring lists that continue the streams
        first, last = _grow(seq, first, last, lists, calls)
    chain = seq[first : last + 1]
    chain_lists = list(dict.fromkeys(c.list_path for c in chain))
    if (block_lists is not None and chain_lists != list(block_lists)) or len(chain) != sum(len(lists[p]) for p in chain_lists):
        error = BlockwiseConfigError if block_lists is not None else BlockwiseError
        raise error(f"blocks={chosen!r}: they do not run one after another, each block once, in {model_name} (ran: {chain_lists})")
    streams: list[tuple[str | None, ...]] = []
    for j, call in enumerate(chain):
        same_class = j > 0 and type(call.module) is type(chain[j - 1].module)
        streams.append(_updates(call, chain[j + 1] if j + 1 < len(chain) else None, streams[-1] if same_class else None))
    hidden = max((s for s in streams[0] if s), key=lambda s: chain[0].inputs[s].numel())
    fn_max = 0  # blocks from the start that return the hidden stream at the shape it enters with
    while fn_max < len(chain) and _returns(chain[fn_max], streams[fn_max], hidden, chain[0].inputs[hidden].shape):
        fn_max += 1
    return BlockChain(
        lists=chain_lists,
        candidates=sorted(lists),
        paths=[f"{c.list_path}.{c.index}" for c in chain],
        modules=[c.module for c in chain],
        streams=streams,
        returns_tuple=[c.tuple_out for c in chain],
        hidden=hidden,
        fn_max=fn_max,
        glue=[not _passes_on(prev, nxt) for prev, nxt in zip(chain, chain[1:])],
    )


def _returns(call: _BlockCall, names: tuple[str | None, ...], stream: str, shape: torch.Size) -> bool:
    return stream in names and call.outputs[names.index(stream)].shape == shape


def _grow(seq: list[_BlockCall], first: int, last: int, lists: dict, calls: list[_BlockCall]) -> tuple[int, int]:
    """Join whole neighbouring lists while each continues the streams of the one before it."""
    while first > 0 and _continues(seq[first - 1], seq[first], calls, before=True):
        size = len(lists[seq[first - 1].list_path])
        if first - size < 0 or any(c.list_path != seq[first - 1].list_path for c in seq[first - size : first]):
            break
        first -= size
    while last + 1 < len(seq) and _continues(seq[last], seq[last + 1], calls, before=False):
        size = len(lists[seq[last + 1].list_path])
        if any(c.list_path != seq[last + 1].list_path for c in seq[last + 1 : last + 1 + size]) or last + size >= len(seq):
            break
        last += size
    return first, last


def _kept(t: torch.Tensor, may_change: bool) -> torch.Tensor:
    """`t` as it is now, where code may change it in place before it is read."""
    return t.clone() if may_change and isinstance(t, torch.Tensor) else t


def _pack(j: int, outs: list, chain: BlockChain) -> Any:
    """Block j's outputs in the form the block returns them."""
    return tuple(outs) if chain.returns_tuple[j] else outs[0]


@dataclass
class _Step:
    """One call's progress through the chain."""

    branch: str
    decision: str  # the host's: "compute", "cache" or "device" (measure the diff)
    timestep: torch.Tensor | None
    counted: tuple[int, bool] | None = None  # the host's count once this step has run (None: not counted)
    hidden: str = ""  # the hidden stream this call: the largest one entering the chain
    h0: torch.Tensor | None = None  # the hidden stream entering the chain
    h_fn: torch.Tensor | None = None  # ... and leaving Fn (code between blocks may change it before the middle)
    entering: list[torch.Tensor] = field(default_factory=list)  # all streams entering the middle
    state: Any = None  # the branch's CacheState; None: new sizes (this step computes, the stores allocate)
    decided: tuple = ()  # (diff, cache flag, elapsed, position) from the gates
    skip: bool = False
    fn_outputs: list[Any] = field(default_factory=list)  # blocks 0..Fn-1 as they returned (for the skeleton)
    bases: list[torch.Tensor] | None = None  # the carried streams reaching the middle's last block, middle skipped
    outs: list[torch.Tensor] | None = None  # the carried streams leaving the middle


class _SkeletonDone(BaseException):
    """Stops the skeleton pass at the middle's last block."""


class _Cached(BaseException):
    """Stops block 0 at its modulated input: TeaCache caches this step."""


_NOT_RUN = object()  # a block the step has not run (yet)


class _SignalProbe(TorchFunctionMode):
    """Counts block 0's torch calls up to the one that makes its modulated input (TeaCache's
    signal), whose output goes to `at` (which stops the block where the step is cached)."""

    def __init__(self, index: int, name: str, shape: torch.Size, at: Callable[[torch.Tensor], None]):
        super().__init__()
        self.index, self.name, self.shape, self.at = index, name, shape, at
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.count == self.index:
            if call_name(func) != self.name or not isinstance(out, torch.Tensor) or out.shape != self.shape:
                raise self.mismatch(f"{call_name(func)!r} of shape {tuple(out.shape) if isinstance(out, torch.Tensor) else None}")
            self.at(out)
        self.count += 1
        return out

    def mismatch(self, now: str) -> RuntimeError:
        return RuntimeError(
            f"dittofx: torch call {self.index} of block 0 was {self.name!r} of shape {tuple(self.shape)} when TeaCache's signal was found there, now "
            f"{now} with the same input sizes: block 0 runs data-dependent code before its adaptive norm"
        )


class _BlockForward:
    """A chain block's `forward` while the model is optimized. An object, not a closure: a deep copy
    of the model gets one bound to its own block and its own step logic."""

    def __init__(self, blockwise: "Blockwise", j: int, original: Callable):
        self.blockwise, self.j, self.original = blockwise, j, original
        self.signature = inspect.signature(original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.blockwise.run_block(self.j, self.original, self.signature, args, kwargs)


class Blockwise:
    """The step logic of the rewritten graph (`passes/rewrite.py`), run from wrapped block forwards.

    The residual is taken against the middle run as identities with the code between blocks kept
    (the graph's skeleton: SPEC §3's carried values after Fn): on a cached step that is what reaches
    the middle's last block; on a computed step it is the middle's input where no code sits between
    middle blocks, else a second, short pass of the forward that replays Fn's outputs, hands the
    streams through the middle and stops at its last block."""

    def __init__(self, engine: Any, chain: BlockChain, fn_blocks: int, bn_blocks: int):
        n = len(chain)
        if fn_blocks + bn_blocks > n:
            raise BlockwiseConfigError(fn_bn_too_large(fn_blocks, bn_blocks, n, chain.lists))
        self.engine, self.chain = engine, chain
        self.lo, self.hi = fn_blocks, n - bn_blocks - 1  # the middle, inclusive
        self.carried = [s for s in chain.streams[self.hi] if s] if self.lo <= self.hi else []
        # code between middle blocks changes the streams, or the lists name them differently: the
        # bases come from the skeleton pass (the middle's input is no base by name)
        self.glue = any(chain.glue[self.lo : self.hi]) or (self.lo <= self.hi and chain.streams[self.lo] != chain.streams[self.hi])
        # a block's outputs the code after it may change in place are copied where kept (the last
        # block's by the model's own code after the chain, which no hook sees)
        self.changed_after = [*chain.glue, True]
        if fn_blocks > chain.fn_max:
            raise self._fn_too_large(chain.hidden)
        self.step: _Step | None = None
        self.skeleton = False
        self._saved: list[Any] = []
        # TeaCache: per structure of block 0's inputs, the torch call (index, name) that makes its modulated input
        self.signal_calls: dict[tuple, tuple[int, str]] = {}

    def install(self) -> None:
        for j, block in enumerate(self.chain.modules):
            self._saved.append(block.__dict__.get("forward"))
            block.forward = _BlockForward(self, j, block.forward)

    def remove(self) -> None:
        for block, saved in zip(self.chain.modules, self._saved):
            block.__dict__.pop("forward", None)
            if saved is not None:
                block.forward = saved
        self._saved = []

    def start(self, branch: str, decision: str, timestep: torch.Tensor | None, counted: tuple[int, bool] | None = None) -> None:
        self.step = _Step(branch, decision, timestep, counted)

    def call(self, forward: Callable[[], Any]) -> Any:
        """One step: the forward, the skeleton pass where the stores need it, the stores."""
        out = forward()
        st, self.step = self.step, None
        if st is None:
            return out
        if self.lo > self.hi and st.h_fn is not None:  # an empty middle: every step computes, nothing carried
            st.decision, st.outs, st.bases = "compute", [], []
            st.state = self.engine.blockwise_state(st.branch, st.hidden, st.h_fn, [])
        if st.outs is not None:
            if st.bases is None:
                self._skeleton(st, forward)
            self._store(st)
        if st.counted is not None:  # the step ran: the host counts it
            self.engine.host[st.branch] = st.counted
        return out

    @torch._dynamo.disable
    def _skeleton(self, st: _Step, forward: Callable[[], Any]) -> None:
        self.step, self.skeleton = st, True
        try:
            forward()
        except _SkeletonDone:
            pass
        finally:
            self.step, self.skeleton = None, False
        if st.bases is None:
            raise RuntimeError(
                f"dittofx: the skeleton pass of {type(self.engine.model).__name__} did not reach {self.chain.paths[self.hi]}"
            )

    def replay_check(self, forward: Callable[[], Any]) -> None:
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
                outs.append(pytree.tree_leaves(self.call(forward)))
                self.engine.states[_REPLAY].num_steps.zero_()  # a request of length 1 would end here
        finally:
            self.step = None
            if _REPLAY in self.engine.states:
                del self.engine.states[_REPLAY]
            self.engine.host.pop(_REPLAY, None)
        for k, (a, b) in enumerate(zip(*outs)):
            if not isinstance(a, torch.Tensor):
                continue
            if not close_at_scale(b, a, 1e-3 if a.dtype in (torch.float32, torch.float64) else 3e-2):
                raise BlockwiseError(
                    f"a cached step replaying a computed one changes output {k} (by up to {(a.float() - b.float()).abs().max().item():.3g}): "
                    f"the forward reads a middle block's output outside the block chain"
                )

    def run_block(self, j: int, original: Callable, sig: inspect.Signature, args: tuple, kwargs: dict) -> Any:
        """Block `j` of the chain within the current step: run, handed through, or replayed."""
        chain, lo, hi = self.chain, self.lo, self.hi
        st = self.step
        if st is None or j > hi:
            return original(*args, **kwargs)
        if self.skeleton:  # Fn as it ran, the middle as identities, stop at its last block
            if j < lo:
                return st.fn_outputs[j]
            named = bind_arguments(sig, args, kwargs)
            if j == hi:
                st.bases = [named[s] for s in self.carried]
                raise _SkeletonDone
            return _pack(j, [named[s] if s else None for s in chain.streams[j]], chain)
        if j < lo:
            if j == 0:
                self._enter(st, bind_arguments(sig, args, kwargs))
            out = original(*args, **kwargs)
            if self.glue:  # kept for the skeleton pass, before code between blocks may change it in place
                st.fn_outputs.append(pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out))
            if j == lo - 1:  # the hidden stream as Fn's last block returns it
                st.h_fn = self._hidden_after_fn(st, out)
            return out
        named = bind_arguments(sig, args, kwargs) if j == lo or st.skip else {}
        out = _NOT_RUN
        if j == lo and self.engine.teacache:  # decided inside block 0, at its modulated input
            out = self._teacache_block0(st, named, original, args, kwargs)
        elif j == lo:
            self._decide(st, named)
        if st.skip:  # the block hands its streams through; the middle's last adds the residual
            if j < hi:
                return _pack(j, [named[s] if s else None for s in chain.streams[j]], chain)
            st.bases = [named[s] for s in self.carried]
            st.outs = self._forecast(st)
            forecasts = iter(st.outs)
            return _pack(j, [next(forecasts) if s else None for s in chain.streams[j]], chain)
        if out is _NOT_RUN:
            out = original(*args, **kwargs)
        if j == hi:
            st.outs = [_kept(o, self.changed_after[j]) for o, s in zip(_outputs(out), chain.streams[j]) if s]
        return out

    def _enter(self, st: _Step, named: dict[str, Any]) -> None:
        """At block 0: the hidden stream, the largest entering the chain (image tokens > text tokens)."""
        st.hidden = max((s for s in self.chain.streams[0] if s), key=lambda s: named[s].numel())
        st.h0 = named[st.hidden]

    @torch._dynamo.disable
    def _teacache_block0(self, st: _Step, named: dict[str, Any], original: Callable, args: tuple, kwargs: dict) -> Any:
        """Block 0 run up to its modulated input (SPEC §6's signal), where the step is decided: on
        through the block, or stopped there when cached (returns _NOT_RUN). Inputs of a new
        structure run the whole block under `ModulationFinder`, to find the signal: the decision
        comes after it (a cached step then drops what the block computed)."""
        self._enter(st, named)
        key = tuple((n, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (n, type(v)) for n, v in named.items())

        def at(m: torch.Tensor) -> None:
            st.h_fn = m.clone()  # the block may change it in place further on
            self._decide(st, named)
            if st.skip:
                raise _Cached

        try:
            if key in self.signal_calls:
                probe = _SignalProbe(*self.signal_calls[key], st.h0.shape, at=at)
                with probe:
                    out = original(*args, **kwargs)
                if probe.count <= probe.index:
                    raise probe.mismatch("no call")
                return out
            out, found = run_finding_modulation(lambda: original(*args, **kwargs), st.h0, named)
            self.signal_calls[key] = (found.index, found.name)
            at(found.value)
            return out
        except _Cached:
            return _NOT_RUN

    @torch._dynamo.disable  # under torch.compile: the decision runs eagerly, the blocks compiled
    @torch.no_grad()
    def _decide(self, st: _Step, named: dict[str, Any]) -> None:
        """At the middle's first block: begin_step, the gates and the diff, as the graph does."""
        st.entering = [named[n] for n in self.chain.streams[self.lo] if n]
        if not self.glue:  # what a skipped middle hands its last block
            st.bases = [named[s] for s in self.carried]
        st.state = self.engine.blockwise_state(st.branch, st.hidden, st.h_fn, st.entering)
        if st.state is None:
            st.decision = "compute"
            return
        st.decided = self._gates(st.state, st)
        if st.decision == "device":
            st.skip = bool(st.decided[1])  # the host sync: Python picks the blocks to run
        else:  # known on the host (warmup, a mask): no sync
            st.skip = st.decision == "cache"

    @torch._dynamo.disable
    @torch.no_grad()
    def _forecast(self, st: _Step) -> list[torch.Tensor]:
        """The carried streams after a skipped middle: what reaches its last block + the residual."""
        s, (_diff, _cache, elapsed, now) = st.state, st.decided
        at = self.engine.options.forecast_at(s.valid, elapsed, s.taylor_times, now)
        residuals = [getattr(s, name) for name in s.residual_names]
        for name, r, b in zip(self.carried, residuals, st.bases):
            if r.shape[1:] != b.shape:
                raise RuntimeError(
                    f"dittofx: the {name!r} stream reaching {self.chain.paths[self.hi]} has shape {tuple(b.shape)}, its "
                    f"stored residual {tuple(r.shape[1:])}, while the streams entering {self.chain.paths[self.lo]} kept "
                    f"their sizes; call dittofx.reset(model) between such requests"
                )
        return [gates.forecast(r, b, *at) for r, b in zip(residuals, st.bases)]

    @torch._dynamo.disable
    @torch.no_grad()
    def _store(self, st: _Step) -> None:
        """After the step: store what a computed middle produced, advance the counters."""
        s = st.state
        if s is None:  # new sizes: a fresh state (this step computes)
            st.decision = "compute"
            s = self.engine.new_blockwise_state(st.branch, st.hidden, st.h_fn, st.entering, st.outs)
        if not st.decided:  # a fresh state, or an empty middle: the gates run now
            st.decided = self._gates(s, st)
        diff, cache, elapsed, now = st.decided
        gates.finish_step(
            cache, diff, s.step, elapsed, s.valid, s.cached_count, s.cont_count, s.acc, s.hist_diff, s.hist_cached,
            s.p, st.h_fn, st.h0, [getattr(s, name) for name in s.residual_names], st.outs, st.bases, s.taylor_times, now,
            signal_every_step=self.engine.options.teacache_coefficients is not None, newton=self.engine.options.newton,
        )  # fmt: skip

    def _hidden_after_fn(self, st: _Step, out: Any) -> torch.Tensor:
        """The hidden stream leaving Fn, checked against the one entering the chain: the decision
        compares the two (HiDream's single blocks return the image and text streams joined)."""
        names = self.chain.streams[self.lo - 1]
        h_fn = _kept(_outputs(out)[names.index(st.hidden)], self.changed_after[self.lo - 1]) if st.hidden in names else None
        if h_fn is None or h_fn.shape != st.h0.shape:
            raise self._fn_too_large(st.hidden, st.h0.shape)
        return h_fn

    def _fn_too_large(self, hidden: str, shape: torch.Size | None = None) -> BlockwiseConfigError:
        at = f" ({tuple(shape)})" if shape is not None else ""
        return BlockwiseConfigError(
            f"Fn_compute_blocks={self.lo}: {self.chain.paths[self.lo - 1]} returns no {hidden!r} stream of the shape entering "
            f"the chain{at} for the residual diff to compare; allowed here: Fn_compute_blocks <= {self.chain.fn_max}"
        )

    def _gates(self, s: Any, st: _Step) -> tuple:
        """begin_step, then the step's position and decision on state `s`: (diff, cache, elapsed, position)."""
        gates.begin_step(
            s.step, s.num_steps, s.last_ts, s.valid, s.cached_count, s.cont_count, s.acc, s.hist_diff, s.hist_cached, st.timestep
        )
        return gates.decide_step(
            s.step, s.num_steps, s.last_ts, s.valid, s.cached_count, s.cont_count, s.acc, s.mask, s.p, s.taylor_times,
            st.h_fn, st.h0, **self.engine.options.decision_options(st.decision),
        )  # fmt: skip
