"""End-to-end 28-step denoising loop: compiled baseline, the ideal for the schedule, cache-dit, dittofx.

The ideal for a schedule (issue 7) = computed steps x a full compiled step + cached steps x a
compiled step of only prologue + Fn + Bn + epilogue (the same architecture built with Fn + Bn
blocks). Rows, per cache config (the static "fast" mask; a dynamic threshold, vLLM-omni's default
F1B0 W4 MC3 R0.24) and per torch.compile mode: cache-dit eager, cache-dit with its regional compile
(diffusers' `compile_repeated_blocks`, where the model class has repeated blocks), cache-dit with
full-model torch.compile, dittofx + torch.compile(fullgraph=True). Columns: request time; speed vs
ideal (ideal s / row s); speed vs cache-dit (fastest cache-dit row of the config, s / row s: > 1 is
ahead); cached-step cost (the row's median cached step / the ideal's cached step) and computed-step
cost (/ the baseline's step); graph breaks and
frames compiled while warming up; recompiles after warm-up; peak memory above what was allocated
before the request (CUDA only); cache-state bytes. Every dittofx row's output is checked against
the same config run eagerly.

Every row is built and warmed up (one request) first; then the rows are timed in interleaved rounds,
one request per row per round, so that load changes on a shared machine fall on all rows alike.
Times are medians over the rounds, per step (CUDA events, or time.perf_counter on CPU); a request
is the sum of its steps' medians. On CPU the compiled rows use inductor's C++ backend and there are
no CUDA-graph rows; the figures are ratios measured on a shared machine, not speed claims.

    python bench/e2e.py --device cuda --out bench/results/e2e.json          # PixArt-alpha-512 shape
    python bench/e2e.py --device cpu     # small Wan for 2 cores -> bench/results/e2e_cpu_<date>.{json,md}
    python bench/e2e.py --device cpu --smoke        # tiny PixArt: checks that every row runs
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, bench/ is on sys.path and bench/kernels.py would pass for the `kernels` package
# that diffusers probes for at import: the repository root (this checkout's dittofx) takes its place
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH.parent) if Path(p or ".").resolve() == _BENCH else p for p in sys.path]

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import cache_dit
import diffusers
import torch
from torch._dynamo.utils import counters

import dittofx

STEPS = 28
RESULTS = _BENCH / "results"


@dataclass(frozen=True)
class Spec:
    """A transformer shape to benchmark and how cache-dit adapts it."""

    cls: str  # diffusers class
    config: dict
    latent: tuple[int, ...]  # latent shape (batch 1)
    text: tuple[int, int]  # text tokens, text channels
    blocks: str  # the block list cache-dit caches
    pattern: str  # its cache-dit ForwardPattern
    extra: dict = field(default_factory=dict)  # constant call kwargs besides latents, text, timestep

    def build(self, device: str, dtype: torch.dtype, layers: int | None = None) -> torch.nn.Module:
        torch.manual_seed(0)
        config = dict(self.config, num_layers=layers or self.config["num_layers"])
        return getattr(diffusers, self.cls)(**config).to(device, dtype).eval()


# PixArt-alpha 512 (0.6 B): 28 blocks, 16 heads x 72, 64x64 latents -> 1024 tokens, 120 text tokens
PIXART = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    sample_size=64, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
)  # fmt: skip
PIXART_COND = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
# Wan 2.1 layout at a size where 2 CPU cores spend their time in the blocks, not in Python:
# 12 blocks, 4 heads x 64, 32x32 latents -> 256 tokens, 64 text tokens
WAN_CPU = dict(
    patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=64, in_channels=16, out_channels=16,
    text_dim=256, freq_dim=256, ffn_dim=768, num_layers=12, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
)  # fmt: skip
SPECS = {
    "pixart": Spec("PixArtTransformer2DModel", PIXART, (1, 4, 64, 64), (120, 4096), "transformer_blocks", "Pattern_3", PIXART_COND),
    "pixart-tiny": Spec(
        "PixArtTransformer2DModel",
        dict(PIXART, num_attention_heads=2, attention_head_dim=16, num_layers=6, sample_size=16, cross_attention_dim=32, caption_channels=32),
        (1, 4, 16, 16), (120, 32), "transformer_blocks", "Pattern_3", PIXART_COND,
    ),
    "wan-cpu": Spec("WanTransformer3DModel", WAN_CPU, (1, 16, 1, 24, 24), (64, 256), "blocks", "Pattern_2"),
}  # fmt: skip

FN, BN = 1, 0
# name -> (dittofx config, cache-dit DBCacheConfig fields): the same schedule rules on both sides
CONFIGS = {
    "static fast": (
        {"residual_diff_threshold": 1e9, "max_warmup_steps": 0, "scm_steps_mask_policy": "fast", "scm_steps_policy": "static"},
        {"residual_diff_threshold": 0.24, "max_warmup_steps": 0, "steps_computation_policy": "static",
         "steps_computation_mask": cache_dit.steps_mask(mask_policy="fast", total_steps=STEPS)},
    ),
    "dynamic F1B0 W4 MC3 R0.24": (
        {"residual_diff_threshold": 0.24, "max_warmup_steps": 4, "max_continuous_cached_steps": 3},
        {"residual_diff_threshold": 0.24, "max_warmup_steps": 4, "max_continuous_cached_steps": 3},
    ),
}  # fmt: skip


class Clock:
    """Marks between steps: CUDA events, or time.perf_counter on CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, marks: list) -> list[float]:
        if not self.cuda:
            return [b - a for a, b in zip(marks, marks[1:])]
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]


@dataclass
class Row:
    name: str
    config: str | None  # cache config name; None for baseline / Fn+Bn only
    mode: str | None  # torch.compile mode; None: eager
    kind: str  # "baseline", "chain", "cache-dit", "dittofx"
    model: Callable
    cached_steps: Callable[[], list[int]] = lambda: []
    state_bytes: Callable[[], int] = lambda: 0
    before_request: Callable[[], None] = lambda: None
    steps: list[list[float]] = field(default_factory=list)  # per timed request, seconds per step
    stats: dict = field(default_factory=dict)

    def step_medians(self) -> list[float]:
        return [statistics.median(s) for s in zip(*self.steps)]

    def seconds(self) -> float:
        """A request: the sum of its steps' medians (a load spike in one round moves one step's
        sample, not a whole request's)."""
        return sum(self.step_medians())


def denoise(model: Callable, spec: Spec, latents: torch.Tensor, text: torch.Tensor, clock: Clock) -> tuple[torch.Tensor, list[float]]:
    """A 28-step Euler loop (the scheduler's math is negligible next to the transformer)."""
    x = latents
    marks = [clock.mark()]
    for i in range(STEPS):
        t = torch.full((1,), 1000.0 * (1 - i / STEPS), device=x.device, dtype=x.dtype)
        v = model(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False, **spec.extra)[0]
        x = x - v[:, : x.shape[1]] / STEPS
        marks.append(clock.mark())
    return x, clock.seconds(marks)


def _compile_stats() -> tuple[int, int]:
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _cachedit_context(model: torch.nn.Module):
    model = getattr(model, "_orig_mod", model)
    (name,) = model._context_names  # one block list -> one cache-dit context
    return model._context_manager.get_context(name)


def _cachedit_row(spec: Spec, cname: str, how: str, mode: str | None, device: str, dtype: torch.dtype) -> Row | None:
    """cache-dit on a bare transformer, as tests/test_cachedit_differential.py drives it; `how`:
    "eager", "regional" (compile_repeated_blocks, after enable_cache as cache-dit's own tools do)
    or "compile" (torch.compile of the whole cached transformer)."""
    model = spec.build(device, dtype)
    if how == "regional" and not getattr(model, "_repeated_blocks", None):
        return None
    fields = dict(CONFIGS[cname][1], Fn_compute_blocks=FN, Bn_compute_blocks=BN, num_inference_steps=STEPS, enable_separate_cfg=False)
    adapter = cache_dit.BlockAdapter(
        transformer=model, blocks=model.get_submodule(spec.blocks),
        forward_pattern=getattr(cache_dit.ForwardPattern, spec.pattern), check_forward_pattern=False,
    )  # fmt: skip
    cache_dit.enable_cache(adapter, cache_config=cache_dit.DBCacheConfig(**fields))
    run = model
    if how == "regional":
        model.compile_repeated_blocks(mode=mode)
    elif how == "compile":
        run = torch.compile(model, mode=mode)
    buffers = lambda: sum(b.numel() * b.element_size() for b in _cachedit_context(model).buffers.values() if isinstance(b, torch.Tensor))  # noqa: E731
    return Row(
        f"cache-dit {how} {cname}" + (f" ({mode})" if mode else ""), cname, mode, "cache-dit", run,
        cached_steps=lambda: sorted(int(s) for s in _cachedit_context(model).get_cached_steps()),
        state_bytes=buffers,
        # cache-dit's own refresh of a bare transformer's context is one call late (see
        # tests/test_cachedit_differential.py): refresh before each request, as vLLM-omni does
        before_request=lambda: cache_dit.refresh_context(model, num_inference_steps=STEPS),
    )  # fmt: skip


def _dittofx_row(spec: Spec, cname: str, mode: str, device: str, dtype: torch.dtype) -> Row:
    cfg = dict(CONFIGS[cname][0], Fn_compute_blocks=FN, Bn_compute_blocks=BN, num_inference_steps=STEPS)
    model = dittofx.optimize(spec.build(device, dtype), cfg)
    return Row(
        f"dittofx {cname} ({mode})", cname, mode, "dittofx", torch.compile(model, mode=mode, fullgraph=True),
        cached_steps=lambda: dittofx.summary(model, log_table=False)[0].cached_steps,
        state_bytes=lambda: sum(s.bytes() for s in model._dittofx.states.values()),
    )  # fmt: skip


def build_rows(spec: Spec, modes: list[str], only: str | None, device: str, dtype: torch.dtype) -> list[Row]:
    rows = []
    for mode in modes:
        rows.append(Row(f"baseline compiled ({mode})", None, mode, "baseline", torch.compile(spec.build(device, dtype), mode=mode, fullgraph=True)))
        chain = torch.compile(spec.build(device, dtype, layers=FN + BN), mode=mode, fullgraph=True)
        rows.append(Row(f"Fn+Bn only compiled ({mode})", None, mode, "chain", chain))
    for cname in CONFIGS:
        if only is not None and only not in cname:
            continue
        rows.append(_cachedit_row(spec, cname, "eager", None, device, dtype))
        for mode in modes:
            rows += [_cachedit_row(spec, cname, how, mode, device, dtype) for how in ("regional", "compile")]
            rows.append(_dittofx_row(spec, cname, mode, device, dtype))
    return [r for r in rows if r is not None]


def measure(rows: list[Row], spec: Spec, latents: torch.Tensor, text: torch.Tensor, clock: Clock, repeats: int) -> dict[str, torch.Tensor]:
    """Warm every row up (compiles), then time interleaved rounds. Returns each row's last output."""
    outputs = {}
    for row in rows:
        graphs, breaks = _compile_stats()
        row.before_request()
        outputs[row.name], _ = denoise(row.model, spec, latents, text, clock)
        graphs_after, breaks_after = _compile_stats()
        row.stats = {"frames_compiled": graphs_after - graphs, "graph_breaks": breaks_after - breaks, "recompiles_after_warmup": 0}
        print(f"warmed up {row.name}: {row.stats}", flush=True)
    for _ in range(repeats):
        for row in rows:
            graphs, _ = _compile_stats()
            row.before_request()
            if clock.cuda:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            outputs[row.name], seconds = denoise(row.model, spec, latents, text, clock)
            row.steps.append(seconds)
            if clock.cuda:
                row.stats["peak_mem_mb"] = max(row.stats.get("peak_mem_mb", 0), (torch.cuda.max_memory_allocated() - before) / 2**20)
            row.stats["recompiles_after_warmup"] += _compile_stats()[0] - graphs
    return outputs


def report(rows: list[Row], outputs: dict, references: dict) -> list[dict]:
    """One record per row, and per config and mode one "ideal" record for dittofx's schedule."""
    full = {r.mode: statistics.median(r.step_medians()) for r in rows if r.kind == "baseline"}
    chain = {r.mode: statistics.median(r.step_medians()) for r in rows if r.kind == "chain"}
    first_mode = next(iter(full))  # cache-dit eager is held against the ideal of the first mode

    def ideal(n_cached: int, mode: str) -> float:
        return (STEPS - n_cached) * full[mode] + n_cached * chain[mode]

    cachedit_best: dict[str, float] = {}
    for row in rows:
        if row.kind == "cache-dit":
            cachedit_best[row.config] = min(cachedit_best.get(row.config, float("inf")), row.seconds())
    records = []
    for row in rows:
        rec = {"row": row.name, "kind": row.kind, "config": row.config, "mode": row.mode, "seconds": row.seconds(), **row.stats,
               "step_medians_s": row.step_medians()}  # fmt: skip
        if row.kind in ("cache-dit", "dittofx"):
            cached, medians, mode = row.cached_steps(), row.step_medians(), row.mode or first_mode
            computed = [m for s, m in enumerate(medians) if s not in cached]
            if row.kind == "dittofx":
                records.append({"row": f"ideal {row.config} ({mode})", "kind": "ideal", "config": row.config, "mode": mode,
                                "seconds": ideal(len(cached), mode), "cached": len(cached), "speed_vs_ideal": 1.0,
                                "speed_vs_cachedit": cachedit_best[row.config] / ideal(len(cached), mode)})  # fmt: skip
            rec.update(
                cached=len(cached), cached_steps=cached,
                ideal_s=ideal(len(cached), mode), speed_vs_ideal=ideal(len(cached), mode) / row.seconds(),
                speed_vs_cachedit=cachedit_best[row.config] / row.seconds(),
                cached_step_vs_ideal=statistics.median(medians[s] for s in cached) / chain[mode] if cached else None,
                computed_step_vs_baseline=statistics.median(computed) / full[mode],
                state_bytes=row.state_bytes(),
            )  # fmt: skip
        if row.kind == "dittofx":
            ref_out, ref_cached = references[row.config]
            out = outputs[row.name]
            rec["same_schedule_as_eager"] = row.cached_steps() == ref_cached
            rec["rel_err_vs_eager"] = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
        records.append(rec)
    return records


def markdown(meta: dict, records: list[dict], cpu: bool) -> str:
    lines = [f"# End-to-end, {meta['model']}, {meta['device']} — {meta['date']}", ""]
    if cpu:
        lines += [
            "**CPU wall-clock figures are not speed claims.** They were measured on a shared 2-core machine; only the "
            "ratios between rows of this one run mean anything, and the table gives ratios only (seconds are in the JSON).",
            "",
        ]
    lines += [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in meta.items()]
    lines += [
        "- speed vs ideal = ideal s / row s; speed vs cache-dit = fastest cache-dit row of the config, s / row s (> 1: ahead); "
        "cached step = the row's median cached step / the Fn+Bn-only compiled step; computed step = the row's median computed step / the baseline's; recompiles counted after the warm-up request.",
        "- peak memory: " + ("not measured on CPU (no allocator statistics without tracemalloc, which would slow every row)." if cpu else "CUDA bytes above what was allocated before the request."),
        "",
        "| row | cached | speed vs ideal | speed vs cache-dit | cached step vs ideal | computed step vs baseline | graph breaks | frames (warm-up) | recompiles | state KiB | "
        + ("" if cpu else "peak MiB | ")
        + "schedule = eager / rel err |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("" if cpu else "---|") + "---|",
    ]  # fmt: skip
    fmt = lambda v, f="{:.3f}": "" if v is None else f.format(v)  # noqa: E731
    for r in records:
        if r["kind"] in ("baseline", "chain"):
            continue
        if r["kind"] == "ideal":
            lines.append(f"| *{r['row']}* | {r['cached']} | 1 | {fmt(r['speed_vs_cachedit'])} | 1 | 1 | | | | |" + ("" if cpu else " |") + " |")
            continue
        check = f"{r['same_schedule_as_eager']} / {r['rel_err_vs_eager']:.1e}" if r["kind"] == "dittofx" else ""
        peak = "" if cpu else f"{fmt(r.get('peak_mem_mb'), '{:.0f}')} | "
        lines.append(
            f"| {r['row']} | {r['cached']} | {fmt(r['speed_vs_ideal'])} | {fmt(r['speed_vs_cachedit'])} | {fmt(r['cached_step_vs_ideal'])} | "
            f"{fmt(r['computed_step_vs_baseline'])} | "
            f"{r['graph_breaks']} | {r['frames_compiled']} | {r['recompiles_after_warmup']} | {r['state_bytes'] / 1024:.0f} | {peak}{check} |"
        )
    step = {(r["kind"], r["mode"]): statistics.median(r["step_medians_s"]) for r in records if r["kind"] in ("baseline", "chain")}
    ratios = [f"{step[('baseline', m)] / step[('chain', m)]:.2f} ({m})" for k, m in step if k == "baseline"]
    lines += ["", f"The ideal's parts: one baseline step costs {', '.join(ratios)} Fn+Bn-only steps."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, choices=sorted(SPECS), help="default: pixart on CUDA, wan-cpu on CPU, pixart-tiny with --smoke")
    ap.add_argument("--smoke", action="store_true", help="tiny model: checks that every row runs, no speed claims")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None, help="JSON path (CPU default: bench/results/e2e_cpu_<date>.json, with a .md beside it)")
    ap.add_argument("--only", default=None, help="run only the configs whose name contains this")
    ap.add_argument("--modes", default=None, help="comma-separated torch.compile modes (default: both on CUDA)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: on a shared 2-core machine two "
                    "threads per process made steps 2-4x slower and far noisier than one)")  # fmt: skip
    args = ap.parse_args()
    device = args.device
    cpu = device == "cpu"
    if cpu:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if cpu else torch.bfloat16
    model_name = args.model or ("pixart-tiny" if args.smoke else "wan-cpu" if cpu else "pixart")
    spec = SPECS[model_name]
    modes = args.modes.split(",") if args.modes else ["default"] if cpu else ["default", "reduce-overhead"]
    # rows share the model class's forward (and dittofx's) code objects: room for all their frames
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)

    g = torch.Generator().manual_seed(1)
    latents = torch.randn(*spec.latent, generator=g).to(device, dtype)
    text = torch.randn(1, *spec.text, generator=g).to(device, dtype)
    clock = Clock(device)
    references = {}
    with torch.no_grad():
        for cname, (cfg, _) in CONFIGS.items():
            if args.only is None or args.only in cname:
                eager = dittofx.optimize(spec.build(device, dtype), dict(cfg, Fn_compute_blocks=FN, Bn_compute_blocks=BN, num_inference_steps=STEPS))
                out, _ = denoise(eager, spec, latents, text, clock)
                references[cname] = (out, dittofx.summary(eager, log_table=False)[0].cached_steps)
        rows = build_rows(spec, modes, args.only, device, dtype)
        outputs = measure(rows, spec, latents, text, clock, args.repeats)
    records = report(rows, outputs, references)
    for r in records:
        print(json.dumps({k: v for k, v in r.items() if k not in ("cached_steps", "step_medians_s")}), flush=True)

    meta = {
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if not cpu else f"CPU: {_cpu_name()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "cache-dit": getattr(cache_dit, "__version__", "?"),
        "dtype": str(dtype), "model": model_name, "steps": STEPS, "repeats": args.repeats,
        "command": "python " + " ".join(sys.argv),
    }  # fmt: skip
    out = Path(args.out) if args.out else (RESULTS / f"e2e_cpu_{meta['date']}.json" if cpu and not args.smoke else None)
    if out is not None:
        out.write_text(json.dumps({"meta": meta, "rows": records}, indent=1))
        out.with_suffix(".md").write_text(markdown(meta, records, cpu))
        print(f"wrote {out} and {out.with_suffix('.md')}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
