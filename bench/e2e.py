"""End-to-end 28-step denoising loop: compiled baseline vs dittofx vs the ideal for the schedule.

The ideal for a schedule (issue 7) = computed steps x a full compiled step + cached steps x a
compiled step of only prologue + Fn + Bn + epilogue (here: the same architecture built with Fn + Bn
blocks). Every row runs in the same process on the same inputs; times are CUDA-event medians of
whole requests after a warm-up request. Rows: compiled baseline (default, reduce-overhead), ideal,
dittofx + torch.compile (default / reduce-overhead) with the static "fast" mask and with a dynamic
threshold (vLLM-omni's default F1B0 W4 MC3 R0.24). Outputs of every dittofx row are checked
against the same dittofx config run eagerly.

    python bench/e2e.py --device cuda --model pixart --out bench/results/e2e.json
    python bench/e2e.py --device cpu --smoke            # tiny model, no speed claims

Not yet here (issue 7): the FLUX rows, cache-dit rows, graph-break / recompile / memory columns.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, bench/ is on sys.path and bench/kernels.py would pass for the `kernels` package
# that diffusers probes for at import: keep bench/ off the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import statistics
import time
from typing import Callable

import torch
from diffusers import PixArtTransformer2DModel

import dittofx

STEPS = 28

# PixArt-alpha 512 (0.6 B): 28 blocks, 16 heads x 72, 64x64 latents -> 1024 tokens, 120 text tokens
PIXART = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    sample_size=64, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
)  # fmt: skip
TINY = dict(PIXART, num_attention_heads=2, attention_head_dim=16, num_layers=6, sample_size=16,
            cross_attention_dim=32, caption_channels=32)  # fmt: skip

CONFIGS = {
    "static fast": {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 1e9,
                    "max_warmup_steps": 0, "scm_steps_mask_policy": "fast", "scm_steps_policy": "static"},
    "dynamic F1B0 W4 MC3 R0.24": {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.24,
                                  "max_warmup_steps": 4, "max_continuous_cached_steps": 3},
}  # fmt: skip


def build(config: dict, layers: int | None, device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dict(config, num_layers=layers or config["num_layers"])
    return PixArtTransformer2DModel(**cfg).to(device, dtype).eval()


def inputs(config: dict, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    side = config["sample_size"]
    latents = torch.randn(1, config["in_channels"], side, side, generator=g).to(device, dtype)
    text = torch.randn(1, 120, config["caption_channels"], generator=g).to(device, dtype)
    return latents, text


def denoise(model: Callable, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """A 28-step Euler loop (the scheduler's math is negligible next to the transformer)."""
    x = latents
    for i in range(STEPS):
        t = torch.full((1,), 1000.0 * (1 - i / STEPS), device=x.device, dtype=x.dtype)
        v = model(hidden_states=x, encoder_hidden_states=text, timestep=t,
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]  # fmt: skip
        x = x - v[:, : x.shape[1]] / STEPS
    return x


def timed(fn: Callable[[], torch.Tensor], device: str, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of `repeats` requests after one warm-up request."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny model (CPU): checks the rows run, no speed claims")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="run only the dittofx configs whose name contains this")
    ap.add_argument("--modes", default=None, help="comma-separated torch.compile modes (default: both on CUDA)")
    args = ap.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = TINY if args.smoke else PIXART
    modes = args.modes.split(",") if args.modes else ["default", "reduce-overhead"] if device == "cuda" else ["default"]
    latents, text = inputs(config, device, dtype)
    rows = []

    def add(name: str, seconds: float, **extra) -> None:
        rows.append({"row": name, "seconds": seconds, **extra})
        print(f"{name:<58} {seconds * 1000:9.1f} ms  {json.dumps(extra)}", flush=True)

    with torch.no_grad():
        step_cost = {}
        for mode in modes:
            for name, layers in (("baseline", None), ("Fn+Bn only", 1)):
                torch._dynamo.reset()
                model = torch.compile(build(config, layers, device, dtype), mode=mode, fullgraph=True)
                seconds, _ = timed(lambda: denoise(model, latents, text), device, args.repeats)
                step_cost[(name, mode)] = seconds / STEPS
                add(f"{name} compiled ({mode})", seconds)
        for cname, cfg in CONFIGS.items():
            if args.only is not None and args.only not in cname:
                continue
            cfg = dict(cfg, num_inference_steps=STEPS)
            eager = dittofx.optimize(build(config, None, device, dtype), cfg)
            reference = denoise(eager, latents, text)
            schedule = dittofx.summary(eager, log_table=False)[0]
            n_cached = len(schedule.cached_steps)
            for mode in modes:
                torch._dynamo.reset()
                model = torch.compile(dittofx.optimize(build(config, None, device, dtype), cfg), mode=mode, fullgraph=True)
                seconds, out = timed(lambda: denoise(model, latents, text), device, args.repeats)
                ideal = (STEPS - n_cached) * step_cost[("baseline", mode)] + n_cached * step_cost[("Fn+Bn only", mode)]
                same = dittofx.summary(model, log_table=False)[0].cached_steps == schedule.cached_steps
                err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
                add(f"dittofx {cname} ({mode})", seconds, cached=n_cached, ideal_s=ideal,
                    ratio_to_ideal=ideal / seconds, same_schedule_as_eager=same, rel_err_vs_eager=err)  # fmt: skip
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "torch": torch.__version__, "dtype": str(dtype), "model": "tiny" if args.smoke else "pixart-alpha-512",
                "steps": STEPS, "repeats": args.repeats}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
