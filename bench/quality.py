"""Quality of dittofx vs cache-dit DBCache on the trained fixture DiT, at matched cached steps.

Both libraries cache the fixture's single chain of 6 blocks (FLUX's 2 double-stream blocks then
4 single-stream blocks; cache-dit joins the two lists into one chain for FLUX as well) with
F1B0 and separate CFG state for the conditional and unconditional calls. Same prompts, seeds and
sampler for every run; quality is measured against the uncached run.

Three sweeps:
* ``dynamic``: residual_diff_threshold from 0.04 to 0.32 (warmup 4). The libraries decide
  differently (cache-dit thresholds the batch-mean diff and compares with the previous step's
  residual, dittofx requires every sample of the batch to pass and compares with the residual of
  the last computed step, SPEC §3), so their counts differ at the same threshold: the plot shows
  PSNR against the count.
* ``capped``: threshold 0.24 with max_cached_steps=M per branch: both libraries cache exactly M
  steps per branch, each chosen by its own diff gate: the matched-count comparison.
* ``fixed``: threshold 1000 with max_continuous_cached_steps=k: every step after warmup that the
  k-limit allows is cached, so both libraries cache exactly the same steps (checked) and differ
  only in what they apply on a cached step.

    python bench/quality.py                 # 32 samples, 28 steps: ~6 min on one CPU thread
    python bench/quality.py --samples 8     # quicker look

Writes bench/results/quality.json, quality.md (the tables) and quality.png (PSNR vs cached steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

# run as a script, bench/ is on sys.path and bench/kernels.py would pass for the `kernels` package
# that diffusers probes for at import: keep bench/ off the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from typing import Any

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # before cache_dit is imported

import torch  # noqa: E402

import dittofx  # noqa: E402
from dittofx.fixtures import EVAL_PROMPTS, Samples, follows_prompt, load_fixture, sample  # noqa: E402
from dittofx.metrics import psnr, relative_l2, ssim  # noqa: E402

THRESHOLDS = [0.04, 0.06, 0.08, 0.10, 0.12, 0.16, 0.20, 0.24, 0.32]
CONTINUOUS = [1, 2, 3]
CAPS = [4, 8, 12, 16]
WARMUP = 4
RESULTS = Path(__file__).parent / "results"


def run_dittofx(cfg: dict[str, Any], prompts: list[str], seeds: list[int], steps: int) -> tuple[Samples, dict]:
    fixture = load_fixture()
    dittofx.optimize(fixture.transformer, {**cfg, "num_inference_steps": steps})
    out = sample(fixture, prompts, seeds, steps)
    cached = {s.branch: list(s.cached_steps) for s in dittofx.summary(fixture.transformer, log_table=False)}
    return out, cached


def run_cache_dit(cfg: dict[str, Any], prompts: list[str], seeds: list[int], steps: int) -> tuple[Samples, dict]:
    import cache_dit

    fixture = load_fixture()
    config = cache_dit.DBCacheConfig(**cfg, num_inference_steps=steps, enable_separate_cfg=True, cfg_compute_first=False)
    cache_dit.enable_cache(fixture.transformer, cache_config=config)
    out = sample(fixture, prompts, seeds, steps)  # calls alternate cond, uncond: even calls = cond
    (stats,) = cache_dit.summary(fixture.transformer, logging=False)
    return out, {"cond": list(stats.cached_steps), "uncond": list(stats.cfg_cached_steps)}


def measure(library: str, sweep: str, cfg: dict, out: Samples, ref: Samples, cached: dict, prompts: list[str]) -> dict:
    images, reference = out.images.permute(0, 2, 3, 1), ref.images.permute(0, 2, 3, 1)
    return {
        "library": library,
        "sweep": sweep,
        "config": cfg,
        "cached_steps": cached,
        "total_cached": sum(len(v) for v in cached.values()),
        "psnr": psnr(out.images, ref.images, 2.0),
        "ssim": ssim(images, reference, 2.0),
        "rel_l2": relative_l2(out.latents, ref.latents),
        "prompts_ok": sum(follows_prompt(im, p) for im, p in zip(out.images, prompts)),
    }


def _pair(rows: list[dict], sweep: str, key: str, value: int) -> tuple[dict, dict]:
    """The (dittofx, cache-dit) runs of one sweep whose config has ``key == value``."""
    return tuple(next(r for r in rows if r["sweep"] == sweep and r["library"] == lib and r["config"][key] == value)
                 for lib in ("dittofx", "cache-dit"))  # fmt: skip


def tables(rows: list[dict], samples: int, steps: int) -> str:
    """Markdown: fixed-schedule pairs, capped (matched-count) pairs, and every dynamic run."""
    n = 2 * steps
    head = "| config | cached cond+uncond of {n} (dittofx / cache-dit) | dittofx PSNR | cache-dit PSNR | dittofx SSIM | cache-dit SSIM | same steps |"
    sep = "|---|---|---|---|---|---|---|"
    out = [f"# dittofx vs cache-dit on the fixture DiT ({samples} samples, {steps} steps, CFG 4, F1B0, W{WARMUP})", ""]
    out += ["## Fixed schedules (threshold 1000, max_continuous_cached_steps = k)", "", head.format(n=n), sep]
    for k in CONTINUOUS:
        d, c = _pair(rows, "fixed", "max_continuous_cached_steps", k)
        same = "yes" if d["cached_steps"] == c["cached_steps"] else "no"
        out.append(f"| MC{k} | {d['total_cached']} / {c['total_cached']} | {d['psnr']:.2f} | {c['psnr']:.2f} "
                   f"| {d['ssim']:.4f} | {c['ssim']:.4f} | {same} |")  # fmt: skip
    out += ["", "## Matched counts (threshold 0.24, max_cached_steps = M per branch)", "",
            "| M | cached cond/uncond dittofx | cached cond/uncond cache-dit | dittofx PSNR | cache-dit PSNR | dittofx SSIM | cache-dit SSIM |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in CAPS:
        d, c = _pair(rows, "capped", "max_cached_steps", m)
        counts = ["/".join(str(len(v)) for v in r["cached_steps"].values()) for r in (d, c)]
        out.append(f"| {m} | {counts[0]} | {counts[1]} | {d['psnr']:.2f} | {c['psnr']:.2f} "
                   f"| {d['ssim']:.4f} | {c['ssim']:.4f} |")  # fmt: skip
    dyn = [r for r in rows if r["sweep"] == "dynamic"]
    out += ["", "## Dynamic threshold: all runs", "",
            "| library | R | cached cond / uncond | PSNR | SSIM | rel L2 latents | prompts ok |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in dyn:
        counts = f"{len(r['cached_steps']['cond'])} / {len(r['cached_steps']['uncond'])}"
        out.append(f"| {r['library']} | {r['config']['residual_diff_threshold']} | {counts} | {r['psnr']:.2f} "
                   f"| {r['ssim']:.4f} | {r['rel_l2']:.4f} | {r['prompts_ok']}/{samples} |")  # fmt: skip
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path, samples: int, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for lib, colour in (("dittofx", "tab:blue"), ("cache-dit", "tab:orange")):
        dyn = sorted((r for r in rows if r["library"] == lib and r["sweep"] == "dynamic"), key=lambda r: r["total_cached"])
        ax.plot([r["total_cached"] for r in dyn], [r["psnr"] for r in dyn], "o-", color=colour, label=f"{lib}, threshold sweep")
        for sweep, marker, what in (("capped", "^", "R0.24 capped at M"), ("fixed", "s", "fixed schedule (MC1-3)")):
            pts = [r for r in rows if r["library"] == lib and r["sweep"] == sweep]
            ax.scatter([r["total_cached"] for r in pts], [r["psnr"] for r in pts], marker=marker, s=60,
                       facecolors="none", edgecolors=colour, label=f"{lib}, {what}")  # fmt: skip
    ax.set_xlabel(f"cached steps (cond + uncond, of {2 * steps})")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title(f"DBCache F1B0 on the fixture DiT ({samples} samples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("dittofx").setLevel(logging.ERROR)
    prompts = [EVAL_PROMPTS[i % len(EVAL_PROMPTS)] for i in range(args.samples)]
    seeds = [1000 + i for i in range(args.samples)]
    start = time.perf_counter()
    ref = sample(load_fixture(), prompts, seeds, args.steps)
    plan = [("dynamic", {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": WARMUP,
                         "residual_diff_threshold": r}) for r in THRESHOLDS]  # fmt: skip
    plan += [("capped", {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": WARMUP,
                         "residual_diff_threshold": 0.24, "max_cached_steps": m}) for m in CAPS]  # fmt: skip
    plan += [("fixed", {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": WARMUP,
                        "residual_diff_threshold": 1000.0, "max_continuous_cached_steps": k}) for k in CONTINUOUS]  # fmt: skip
    rows = []
    for sweep, cfg in plan:
        for library, run in (("dittofx", run_dittofx), ("cache-dit", run_cache_dit)):
            out, cached = run(cfg, prompts, seeds, args.steps)
            rows.append(measure(library, sweep, cfg, out, ref, cached, prompts))
            r = rows[-1]
            print(f"{library:>9} {sweep:>7} R{cfg['residual_diff_threshold']:<6g} M{cfg.get('max_cached_steps', -1):<3}"
                  f"MC{cfg.get('max_continuous_cached_steps', -1):<2} "
                  f"cached {r['total_cached']:>2}  PSNR {r['psnr']:6.2f}  SSIM {r['ssim']:.4f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"samples": args.samples, "steps": args.steps, "guidance_scale": 4.0, "cfg_mode": "separate",
            "prompts": prompts, "seeds": seeds, "torch": torch.__version__,
            "cache_dit": __import__("cache_dit").__version__, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    (args.out / "quality.json").write_text(json.dumps({**meta, "runs": rows}, indent=2) + "\n")
    md = tables(rows, args.samples, args.steps)
    (args.out / "quality.md").write_text(md)
    plot(rows, args.out / "quality.png", args.samples, args.steps)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
