"""Microbenchmark of the dittofx kernels against torch eager, torch.compile and a plain device copy.

    python bench/kernels.py --out bench/results/kernels.json            # CUDA: N = 1M..64M, bf16 and fp32
    python bench/kernels.py --smoke --out /tmp/kernels_smoke.json       # CPU: Triton interpreter, tiny sizes

Each kernel is timed with ``triton.testing.do_bench`` (median, after warm-up) replaying a CUDA graph
that calls it on several input sets in turn (device time, as under the core's CUDA graphs). By default the
ops share a set count under which one round of taylor_update_ exceeds L2 four times over. With ``--rotate-l2 K``,
each case and the copy rotate enough sets that one round of its own tensors reads K x L2. The last column
times eager calls, Python launch overhead included. Bytes are the fewest each op must move:
  residual_diff  (with base)          reads x, ref, base
  taylor_update_ (order k, steady)    reads x, base, D0..D(k-1); writes D0..Dk
  taylor_forecast (order k, all valid) reads D0..Dk, base; writes out
GB/s are compared with ``dst.copy_(src)`` (read + write) measured in the same run at the same size.
Smoke mode only proves the script runs end to end: its timings are the interpreter's, not speed claims.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import itertools
import json
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402


def load_kernels() -> types.ModuleType:
    """Import ``dittofx.kernels`` without running ``dittofx/__init__.py`` (it imports diffusers, absent on GPU images)."""
    if "dittofx" not in sys.modules:
        pkg = types.ModuleType("dittofx")
        pkg.__path__ = [str(ROOT / "dittofx")]
        sys.modules["dittofx"] = pkg
    return importlib.import_module("dittofx.kernels")


K = load_kernels()
RD = importlib.import_module("dittofx.kernels.residual_diff")
TY = importlib.import_module("dittofx.kernels.taylor")
Config = importlib.import_module("dittofx.kernels._layout").Config

ORDER = 2  # TaylorSeer order k for the benchmark: k + 1 = 3 derivative buffers
THRESHOLD = 0.1
L2_BYTES = 50 * 2**20  # H100; the rotation takes 4x this
# --rotate-l2 K: every case and the copy rotate ceil(K x L2 / its own footprint per set) sets (>= 2). Unset (the
# default, and runs 1-3): the ops share a rotation sized by taylor_update_'s 7 tensors, the copy by its own 2, so
# at 8M-64M residual_diff rotates 2 sets against the copy's 4-7 and carries more of each replay's fixed cost per call.
ROTATE_L2: float | None = None
TENSORS_PER_SET = {"residual_diff": 3, "taylor_update_": ORDER + 3, "taylor_forecast": ORDER + 2, "copy": 2}


def rotation_sets(name: str, n: int, dtype: torch.dtype, legacy: int) -> int:
    """Input sets for one case: ``legacy`` (the rule runs 1-3 used) unless ``--rotate-l2`` is given."""
    if ROTATE_L2 is None:
        return legacy
    return max(2, math.ceil(ROTATE_L2 * L2_BYTES / (TENSORS_PER_SET[name] * n * elsize(dtype))))


def elsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Case:
    """One op at one (N, dtype): input sets, the fewest bytes moved, and the implementations to time."""

    def __init__(self, name: str, n: int, dtype: torch.dtype, device: str, sets: int, config: Config | None = None) -> None:
        self.name, self.n, self.dtype, self.device, self.config = name, n, dtype, device, config
        g = torch.Generator(device=device).manual_seed(0)
        s = elsize(dtype)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

        self.scalars = dict(
            gate=torch.zeros((), dtype=torch.int32, device=device),
            acc=torch.zeros((), device=device),
            valid=torch.full((), ORDER + 1, dtype=torch.int64, device=device),
            gap=torch.full((), 2.0, device=device),
            flag=torch.ones((), dtype=torch.bool, device=device),
            e=torch.full((), 1.0, device=device),
        )
        if name == "residual_diff":
            self.inputs = [(rand(n), rand(n), rand(n)) for _ in range(sets)]  # x, ref, base
            self.bytes = 3 * n * s
        elif name == "taylor_update_":
            self.inputs = [(rand(ORDER + 1, n), rand(n), rand(n)) for _ in range(sets)]  # derivs, x, base
            self.bytes = (2 + ORDER) * n * s + (ORDER + 1) * n * s
        else:  # taylor_forecast
            self.inputs = [(rand(ORDER + 1, n), rand(n)) for _ in range(sets)]  # derivs, base
            self.bytes = (ORDER + 2) * n * s + n * s

    def ours(self, config: Config | None = None) -> Callable[..., object]:
        """The Triton launcher (the op calls it with ``config=None``); ``self.config`` unless given."""
        c = self.scalars
        config = config or self.config
        if self.name == "residual_diff":
            return lambda x, ref, base: RD.residual_diff_triton(
                x, ref, base, c["gate"], c["acc"], THRESHOLD, math.inf, False, config=config
            )
        if self.name == "taylor_update_":
            return lambda d, x, base: TY.taylor_update_triton(d, x, base, c["valid"], c["gap"], c["flag"], config=config)
        return lambda d, base: TY.taylor_forecast_triton(d, base, c["valid"], c["e"], config=config)

    def math(self) -> Callable[..., object]:
        """The same math in plain torch (no host syncs), for eager and for torch.compile."""
        c = self.scalars
        if self.name == "residual_diff":
            return lambda x, ref, base: RD._decide_torch(RD._sums_torch(x, ref, base, False), c["gate"], c["acc"], THRESHOLD, math.inf)
        if self.name == "taylor_update_":
            return lambda d, x, base: taylor_update_math(d, x, base, c["gap"])
        return lambda d, base: taylor_forecast_math(d, base, c["e"])


def taylor_update_math(derivs: torch.Tensor, x: torch.Tensor, base: torch.Tensor, gap: torch.Tensor) -> None:
    """Steady-state update (all levels valid), written functionally and copied into the buffers."""
    new = [x.float() - base.float()]
    for i in range(1, derivs.shape[0]):
        new.append((new[-1] - derivs[i - 1].float()) / gap)
    derivs.copy_(torch.stack(new))


def taylor_forecast_math(derivs: torch.Tensor, base: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    out, coef = base.float(), torch.ones_like(e)
    for i in range(derivs.shape[0]):
        coef = coef * e / i if i else coef
        out = out + derivs[i].float() * coef
    return out.to(base.dtype)


def time_us(fn: Callable[..., object], inputs: list[tuple], device: str, graph: bool = True) -> float:
    """Median microseconds per call of ``fn`` rotating over ``inputs``.

    CUDA, ``graph``: one CUDA graph calls ``fn`` on every input set in turn and ``do_bench`` times its
    replays: device time only, as under the core's CUDA graphs. CUDA, not ``graph``: ``do_bench`` of
    eager calls, Python launch overhead included. CPU (smoke): a host timer, no claims.
    """
    if device == "cuda":
        for args in inputs:  # warm-up: Triton/Inductor compilation, allocations
            fn(*args)
        torch.cuda.synchronize()
        if not graph:
            it = itertools.cycle(inputs)
            return 1e3 * triton.testing.do_bench(lambda: fn(*next(it)), warmup=25, rep=100, return_mode="median")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for args in inputs:
                fn(*args)
        us = 1e3 * triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median") / len(inputs)
        del g
        return us
    times = []
    for args in [inputs[0]] + inputs[:3]:
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times[1:])


def copy_gbs(n: int, dtype: torch.dtype, device: str) -> float:
    sets = rotation_sets("copy", n, dtype, max(2, math.ceil(4 * L2_BYTES / (2 * n * elsize(dtype)))))
    pairs = [(torch.randn(n, device=device).to(dtype), torch.empty(n, device=device, dtype=dtype)) for _ in range(sets)]
    us = time_us(lambda src, dst: dst.copy_(src), pairs, device)
    return 2 * n * elsize(dtype) / us / 1e3


def check(case: Case) -> float:
    """Max relative error of ours vs the torch math on the first input set (fp32 math, so ~1e-6)."""
    args = case.inputs[0]
    if case.name == "taylor_update_":
        a, b = args[0].clone(), args[0].clone()
        case.ours()(a, *args[1:])
        case.math()(b, *args[1:])
        got, exp = a.float(), b.float()
    elif case.name == "residual_diff":
        got, exp = case.ours()(*args)[0], case.math()(*args)[0]
        again = case.ours()(*args)[0]
        case.bitwise_repeat = torch.equal(got.view(torch.int32), again.view(torch.int32))  # recorded in the row
    else:
        got, exp = case.ours()(*args).float(), case.math()(*args).float()
    return float((got - exp).abs().max() / exp.abs().max().clamp_min(1e-30))


def bench_case(name: str, n: int, dtype: torch.dtype, device: str, copy: float, config: Config | None = None) -> dict:
    sets = rotation_sets(name, n, dtype, max(2, math.ceil(4 * L2_BYTES / (n * (2 * ORDER + 3) * elsize(dtype)))))
    case = Case(name, n, dtype, device, sets, config)
    row = dict(kernel=name, dtype=str(dtype).replace("torch.", ""), n=n, bytes=case.bytes, sets=sets)
    row["config"] = config._asdict() if config is not None else None  # None: the op's default
    row["max_rel_err_vs_torch"] = check(case)
    row["bitwise_repeat"] = getattr(case, "bitwise_repeat", None)
    row["ours_us"] = time_us(case.ours(), case.inputs, device)
    row["ours_launch_us"] = time_us(case.ours(), case.inputs, device, graph=False) if device == "cuda" else math.nan
    row["eager_us"] = time_us(case.math(), case.inputs, device)
    torch._dynamo.reset()  # the math lambdas share code objects: no recompile limit, no cached guards
    compiled = torch.compile(case.math(), dynamic=False)
    row["compile_us"] = time_us(compiled, case.inputs, device)
    row["copy_gbs"] = copy
    for impl in ("ours", "eager", "compile"):
        row[f"{impl}_gbs"] = case.bytes / row[f"{impl}_us"] / 1e3
    row["ours_pct_copy"] = 100 * row["ours_gbs"] / copy
    row["speedup_vs_compile"] = row["compile_us"] / row["ours_us"]
    row["speedup_vs_eager"] = row["eager_us"] / row["ours_us"]
    del case
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def rotation(name: str, n: int, dtype: torch.dtype) -> int:
    """Input sets for the sweeps: one round reads more than 4x L2 (5 tensors' worth per set), or ``--rotate-l2``'s rule."""
    return rotation_sets(name, n, dtype, max(2, math.ceil(4 * L2_BYTES / (n * 5 * elsize(dtype)))))


def sweep(name: str, n: int, dtype: torch.dtype, device: str, configs: list[Config]) -> list[dict]:
    """Launch configurations at one size, to choose the defaults in dittofx/kernels/_layout.py."""
    case = Case(name, n, dtype, device, sets=rotation(name, n, dtype))
    out = []
    for cfg in configs:
        us = time_us(case.ours(cfg), case.inputs, device)
        out.append(dict(kernel=name, n=n, dtype=str(dtype).replace("torch.", ""), config=cfg._asdict(), us=us, gbs=case.bytes / us / 1e3))
    return out


def stages(n: int, dtype: torch.dtype, device: str, cfg: Config | None) -> dict:
    """residual_diff split into its launches (graph timing, same rotation as the sweep): what stage 2 costs.

    ``full`` = both launches; ``stage1`` = the partials kernel alone (gated); ``stage1_nogate`` = the same
    without the gate load; ``stage2`` = the decision kernel alone on ready partials; ``l1_sums`` = the
    ungated op with the sums finisher. ``full - stage1`` is what the second launch adds in the graph.
    """
    case = Case("residual_diff", n, dtype, device, rotation("residual_diff", n, dtype), cfg)
    c = case.scalars
    cfg = cfg or RD.CUDA_REDUCE
    outs = RD._decision_outs(torch.device(device))
    parts = [(RD._partials(x, r, b, c["gate"], False, cfg),) for x, r, b in case.inputs]
    us = dict(
        full=time_us(case.ours(), case.inputs, device),
        stage1=time_us(lambda x, r, b: RD._partials(x, r, b, c["gate"], False, cfg), case.inputs, device),
        stage1_nogate=time_us(lambda x, r, b: RD._partials(x, r, b, None, False, cfg), case.inputs, device),
        stage2=time_us(lambda p: RD._finish(p, None, outs, c["gate"], c["acc"], THRESHOLD, math.inf), parts, device),
        l1_sums=time_us(lambda x, r, b: RD.l1_sums_triton(x, r, b, False, config=cfg), case.inputs, device),
    )
    return dict(n=n, dtype=str(dtype).replace("torch.", ""), config=cfg._asdict(), programs=parts[0][0].shape[1], us=us)


def profile_target(cfg: Config | None, code_path: Path) -> None:
    """For Nsight Compute: residual_diff at 8M bf16, ours then torch.compile's, once each inside the NVTX
    range ``profile`` (``ncu --nvtx --nvtx-include profile/``); writes Inductor's generated code to ``code_path``."""
    from torch._inductor.utils import run_and_get_code

    case = Case("residual_diff", 8 * 2**20, torch.bfloat16, "cuda", 1, cfg)
    args = case.inputs[0]
    torch._dynamo.reset()
    compiled = torch.compile(case.math(), dynamic=False)
    _, code = run_and_get_code(compiled, *args)
    code_path.write_text("\n\n".join(code))
    case.ours()(*args)  # warm-up: compilation
    compiled(*args)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profile")
    case.ours()(*args)
    compiled(*args)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


# One wave is 132 SMs x blocks/SM; 512 and 1024 divide the tile counts at 8M and 16M evenly.
REDUCE_CONFIGS = [
    Config(b, w, p)
    for b, w, p in itertools.product((1024, 2048, 4096), (4, 8), (264, 396, 512, 528, 792, 1024, 1056))
    if b // (32 * w) >= 4
]


def reduce_sweep(
    device: str, sizes: tuple[int, ...], configs: list[Config], sweeps: list[dict], split: list[dict], save: Callable[[], None]
) -> Config:
    """residual_diff configs at each size (bf16), then its stages at the default and at the best; returns the best:
    the least sum over sizes of time relative to that size's fastest."""
    for n in sizes:
        sweeps += sweep("residual_diff", n, torch.bfloat16, device, configs)
        save()
    score: dict[Config, float] = {}
    for n in sizes:
        at_n = [s for s in sweeps if s["kernel"] == "residual_diff" and s["n"] == n]
        best_us = min(s["us"] for s in at_n)
        for s in at_n:
            cfg = Config(**s["config"])
            score[cfg] = score.get(cfg, 0.0) + s["us"] / best_us
    best = min(score, key=score.__getitem__)
    for n in sizes:
        for cfg in [None] + ([best] if best != RD.CUDA_REDUCE else []):
            split.append(stages(n, torch.bfloat16, device, cfg))
            print("stages", json.dumps(split[-1]), flush=True)
        save()
    for s in sorted(sweeps, key=lambda s: (s["n"], s["us"])):
        print(f"sweep {s['kernel']:16s} {s['n'] >> 20}M {s['config']} {s['us']:.1f} us {s['gbs']:.0f} GB/s", flush=True)
    print("sweep best (8M + 16M):", best, flush=True)
    return best


def parse_config(text: str) -> Config | None:
    return None if text in ("default", "auto") else Config(*(int(v) for v in text.split(",")))


def table(rows: list[dict]) -> str:
    head = "| kernel | dtype | N | ours µs | ours GB/s | % copy | eager µs | compile µs | vs compile | vs eager | copy GB/s | rel err | ours µs, eager launch |"
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['n'] / 2**20:g}M | {r['ours_us']:.1f} | {r['ours_gbs']:.0f} | "
            f"{r['ours_pct_copy']:.1f} | {r['eager_us']:.1f} | {r['compile_us']:.1f} | {r['speedup_vs_compile']:.2f}x | "
            f"{r['speedup_vs_eager']:.2f}x | {r['copy_gbs']:.0f} | {r['max_rel_err_vs_torch']:.1e} | {r['ours_launch_us']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny sizes; no speed claims")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kernels.json")
    ap.add_argument("--sizes", type=str, default="1,4,8,16,32,64", help="N in units of 2**20 elements")
    ap.add_argument("--sweep", action="store_true", help="first time residual_diff launch configurations at N = 8M and 16M bf16")
    ap.add_argument("--sweep-ew", action="store_true", help="also time taylor launch configurations at N = 16M bf16")
    ap.add_argument(
        "--reduce-config", default="default",
        help="residual_diff launch config for the table: 'default' (the op's), 'auto' (the --sweep's best at 8M+16M) or BLOCK,WARPS,PROGRAMS",
    )
    ap.add_argument(
        "--rotate-l2", type=float, default=None,
        help="each case and the copy rotate enough input sets that one round reads K x L2 of its own tensors (default: the legacy shared rule)",
    )
    ap.add_argument("--profile", type=Path, help="only run profile_target (for ncu) and write Inductor's code here")
    args = ap.parse_args()
    global ROTATE_L2
    ROTATE_L2 = None if args.smoke else args.rotate_l2  # smoke sizes are far below L2: nothing to rotate past
    if args.profile:
        profile_target(parse_config(args.reduce_config), args.profile)
        return
    device = "cpu" if args.smoke else "cuda"
    sizes = [2**16 + 3] if args.smoke else [int(s) * 2**20 for s in args.sizes.split(",")]
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name] + sys.argv),
        torch=torch.__version__,
        triton=triton.__version__,
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
        smoke=args.smoke,
        taylor_order=ORDER,
        rotate_l2=ROTATE_L2,
    )
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta.update(sms=props.multi_processor_count, l2_bytes=getattr(props, "L2_cache_size", None))
    rows: list[dict] = []
    sweeps: list[dict] = []
    split: list[dict] = []
    reduce_cfg = parse_config(args.reduce_config)

    def save() -> None:  # after every step: a run cut off at its time limit keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows, sweep=sweeps, stages=split), indent=1))

    if args.sweep and not args.smoke:
        best = reduce_sweep(device, (8 * 2**20, 16 * 2**20), REDUCE_CONFIGS, sweeps, split, save)
        meta["sweep_best_reduce"] = best._asdict()
        if args.reduce_config == "auto":
            reduce_cfg = best
    meta["reduce_config"] = reduce_cfg._asdict() if reduce_cfg is not None else dict(RD.CUDA_REDUCE._asdict(), default=True)
    print("residual_diff config for the table:", meta["reduce_config"], flush=True)
    for dtype in (torch.bfloat16, torch.float32):
        for n in sizes:
            copy = copy_gbs(n, dtype, device)
            for name in ("residual_diff", "taylor_update_", "taylor_forecast"):
                rows.append(bench_case(name, n, dtype, device, copy, reduce_cfg if name == "residual_diff" else None))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
                save()
    if args.sweep_ew and not args.smoke:
        n = 16 * 2**20
        ew_cfgs = [Config(b, w, 0) for b, w in itertools.product((512, 1024, 2048, 4096), (2, 4, 8)) if b // (32 * w) >= 2]
        sweeps += sweep("taylor_update_", n, torch.bfloat16, device, ew_cfgs)
        sweeps += sweep("taylor_forecast", n, torch.bfloat16, device, ew_cfgs)
        save()
    save()
    print(json.dumps(meta))
    print(table(rows))


if __name__ == "__main__":
    main()
