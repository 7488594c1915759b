"""``dittofx`` command line: ``dittofx demo`` and ``dittofx metrics DIR_A DIR_B``.

The demo samples the shipped fixture DiT uncached and under several cache configs on CPU, and
writes the images, a grid, a speed-vs-PSNR plot and a JSON of the table into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# Caching configs the demo compares (DBCache on the fixture's 6-block chain, 28 steps; the last two
# with a steps mask, one of them with TaylorSeer).
DEMO_CONFIGS: list[dict[str, Any]] = [
    {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08, "max_warmup_steps": 4},
    {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.12, "max_warmup_steps": 4},
    {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.24, "max_warmup_steps": 4,
     "max_continuous_cached_steps": 2},
    {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.24, "max_warmup_steps": 4},
    {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.5, "max_warmup_steps": 2},
    {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.24, "max_warmup_steps": 4,
     "scm_steps_mask_policy": "fast", "scm_steps_policy": "static"},
    {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.12, "max_warmup_steps": 4,
     "enable_taylorseer": True, "scm_steps_mask_policy": "fast"},
]  # fmt: skip
UNCACHED = "uncached"


@dataclass
class Row:
    """One line of the demo table."""

    label: str
    config: dict[str, Any] | None
    cached_steps: dict[str, list[int]]  # per CFG branch
    seconds: float
    time_ratio: float
    psnr: float
    ssim: float
    rel_l2: float
    prompts_ok: int


def config_label(cfg: dict[str, Any]) -> str:
    """Short, file-name safe tag of a dict config, its defaults filled in, e.g. ``F1B0_W4_R0.12_MC2``
    (other methods: their config's short name, e.g. ``TeaCache_R0.2``)."""
    from dittofx.config import DBCacheConfig, parse_config

    c = parse_config(cfg)
    if not isinstance(c, DBCacheConfig):
        return c.short_name()
    tag = f"F{c.Fn_compute_blocks}B{c.Bn_compute_blocks}_W{c.max_warmup_steps}_R{c.residual_diff_threshold}"
    if c.max_continuous_cached_steps >= 0:
        tag += f"_MC{c.max_continuous_cached_steps}"
    if c.max_cached_steps >= 0:
        tag += f"_M{c.max_cached_steps}"
    if c.enable_taylorseer:
        tag += f"_T{c.taylorseer_order}"
    if c.steps_mask_policy:
        tag += f"_SCM{c.steps_mask_policy}{c.steps_computation_policy[0].upper()}"
    return tag


def run_labels(configs: list[dict[str, Any]]) -> list[str]:
    """Each config's label, made unique with a suffix (_2, _3, ...): a run's images and results are
    filed under its label."""
    labels: list[str] = []
    for cfg in configs:
        label, n = config_label(cfg), 2
        while label in (UNCACHED, *labels):
            label, n = f"{config_label(cfg)}_{n}", n + 1
        labels.append(label)
    return labels


class ConfigRefused(ValueError):
    """A demo config the fixture's model refused (a usage error of the CLI)."""

    @classmethod
    def of(cls, label: str, cfg: dict[str, Any], err: ValueError) -> "ConfigRefused":
        return cls(f"{label} {json.dumps(cfg)}: {err}")


def run_demo(
    out: Path,
    configs: list[dict[str, Any]],
    num_prompts: int = 8,
    num_inference_steps: int = 28,
    cfg_mode: str = "separate",
    repeats: int = 3,
) -> list[Row]:
    """Sample the fixture uncached and under each config; write images, grid, plot, results.json.

    Every config gets its own copy of the transformer, optimized and warmed up once (dittofx
    captures the graph on the first call); then the runs are timed round-robin ``repeats`` times
    and the fastest repeat of each counts, so load from other processes hits all runs alike.
    """
    import dittofx
    from dittofx.fixtures import EVAL_PROMPTS, Fixture, follows_prompt, load_fixture, sample
    from dittofx.metrics import psnr, relative_l2, save_pngs, ssim, to_uint8
    from tqdm import tqdm

    base = load_fixture()
    prompts = [EVAL_PROMPTS[i % len(EVAL_PROMPTS)] for i in range(num_prompts)]
    seeds = list(range(num_prompts))
    names = [f"{i:02d}_{p.replace(' ', '_')}" for i, p in enumerate(prompts)]
    runs: list[tuple[str, dict[str, Any] | None, Fixture]] = [(UNCACHED, None, base)]
    for label, cfg in zip(run_labels(configs), configs):
        try:
            runs.append((label, cfg, Fixture(dittofx.optimize(copy.deepcopy(base.transformer), cfg), base.encoder)))
        except ValueError as err:  # a config the fixture's model refuses (Fn + Bn over its 6 blocks)
            raise ConfigRefused.of(label, cfg, err) from err
    warmup_steps = 2
    bar = tqdm(total=len(runs) * (warmup_steps + repeats * num_inference_steps), desc="dittofx demo", unit="step")

    def run(fixture: Fixture, steps: int) -> Any:
        return sample(fixture, prompts, seeds, steps, cfg_mode=cfg_mode, callback=lambda _: bar.update())

    for label, cfg, fixture in runs:
        if cfg is not None:
            dittofx.refresh(fixture.transformer, num_inference_steps=warmup_steps)
        try:
            run(fixture, warmup_steps)
        except ValueError as err:  # ... or refuses at its first call, once its graph is captured
            if cfg is None:
                raise
            bar.close()
            raise ConfigRefused.of(label, cfg, err) from err
    seconds = {label: math.inf for label, _, _ in runs}
    results, cached = {}, {}
    for _ in range(repeats):
        for label, cfg, fixture in runs:
            if cfg is not None:
                dittofx.refresh(fixture.transformer, num_inference_steps=num_inference_steps)
            start = time.perf_counter()
            results[label] = run(fixture, num_inference_steps)
            seconds[label] = min(seconds[label], time.perf_counter() - start)
            if cfg is not None:
                cached[label] = {s.branch: list(s.cached_steps) for s in dittofx.summary(fixture.transformer, log_table=False)}
    bar.close()

    ref, ref_seconds = results[UNCACHED], seconds[UNCACHED]
    ref_pixels = to_uint8(ref.images)
    rows, images = [], {}
    for label, cfg, _ in runs:
        result = results[label]
        images[label] = result.images
        pixels = to_uint8(result.images)  # the PNGs': PSNR and SSIM as `dittofx metrics` gives them on the files
        save_pngs(pixels, out / "images" / label, names)
        rows.append(Row(
            label=label, config=cfg, cached_steps=cached.get(label, {}), seconds=seconds[label],
            time_ratio=seconds[label] / ref_seconds,
            psnr=psnr(pixels, ref_pixels, 255.0),
            ssim=ssim(pixels, ref_pixels, 255.0),
            rel_l2=relative_l2(result.latents, ref.latents),
            prompts_ok=sum(follows_prompt(im, p) for im, p in zip(result.images, prompts)),
        ))  # fmt: skip
    (out / "results.json").write_text(json.dumps(
        {"prompts": prompts, "seeds": seeds, "num_inference_steps": num_inference_steps, "cfg_mode": cfg_mode,
         "torch_threads": torch.get_num_threads(), "rows": [asdict(r) for r in rows]},
        indent=2, default=str) + "\n")  # fmt: skip
    _save_grid(out / "grid.png", images, prompts, rows)
    _save_plot(out / "speed_vs_psnr.png", rows, num_inference_steps)
    return rows


def format_table(rows: list[Row], num_prompts: int) -> str:
    """The demo table as fixed-width text."""
    width = max([24, *(len(r.label) for r in rows)])
    head = f"{'config':<{width}} {'cached steps c/u':>16} {'time ratio':>10} {'PSNR dB':>8} {'SSIM':>6} {'rel L2':>7} {'prompts ok':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cached = "/".join(str(len(v)) for v in r.cached_steps.values()) or "0"
        lines.append(
            f"{r.label:<{width}} {cached:>16} {r.time_ratio:>10.2f} {r.psnr:>8.2f} {r.ssim:>6.3f} {r.rel_l2:>7.4f} "
            f"{f'{r.prompts_ok}/{num_prompts}':>10}"
        )
    return "\n".join(lines)


def _save_grid(path: Path, images: dict[str, torch.Tensor], prompts: list[str], rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dittofx.metrics import to_uint8

    n_rows, n_cols = len(images), len(prompts)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.3 * n_cols + 1.6, 1.4 * n_rows + 0.4), squeeze=False)
    for i, (row, (label, batch)) in enumerate(zip(rows, images.items())):
        pixels = to_uint8(batch)
        cached = "/".join(str(len(v)) for v in row.cached_steps.values()) or "0"
        for j in range(n_cols):
            ax = axes[i][j]
            ax.imshow(pixels[j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(prompts[j].replace(" ", "\n", 1), fontsize=7)
        axes[i][0].set_ylabel(f"{label}\ncached {cached}\n{row.psnr:.1f} dB", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long row labels (config names) past the left edge
    plt.close(fig)


def _save_plot(path: Path, rows: list[Row], num_inference_steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = "osD^vP*Xhp"
    for i, r in enumerate(r for r in rows if r.label != UNCACHED):
        n = "/".join(str(len(v)) for v in r.cached_steps.values())
        ax.scatter(1 / r.time_ratio, r.psnr, marker=markers[i % len(markers)], s=50, zorder=3,
                   label=f"{r.label}: {n} of {num_inference_steps} steps cached (cond/uncond)")  # fmt: skip
    ax.axvline(1.0, color="gray", ls="--", lw=1, label="uncached (PSNR = inf)")
    ax.set_xlabel("speedup vs uncached (wall time, CPU)")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title("dittofx on the fixture DiT: speed vs quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _configs(parser: argparse.ArgumentParser, given: list[str] | None) -> list[dict[str, Any]]:
    """The --config JSON dicts, each checked by dittofx's own validation before anything runs."""
    from dittofx.config import parse_config

    configs = []
    for text in given or []:
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as err:
            parser.error(f"--config {text!r}: not JSON ({err})")
        if not isinstance(cfg, dict):
            parser.error(f"--config {text!r}: must be a JSON object (a dict of cache config fields)")
        try:
            parse_config(cfg)
        except (ValueError, TypeError) as err:
            parser.error(f"--config {text!r}: {err}")
        configs.append(cfg)
    return configs or DEMO_CONFIGS


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an int >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


def _demo(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        args.parser.error(f"--out {args.out}: a file, not a folder")
    configs = _configs(args.parser, args.config)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        rows = run_demo(args.out, configs, args.prompts, args.steps, args.cfg_mode, args.repeats)
    except ConfigRefused as err:
        args.parser.error(f"--config: {err}")
    print(format_table(rows, args.prompts))
    print(f"\nwrote {args.out}/grid.png, {args.out}/speed_vs_psnr.png, {args.out}/results.json, "
          f"{args.out}/images/<config>/*.png  ({time.perf_counter() - start:.0f} s)")  # fmt: skip
    return 0


def _metrics(args: argparse.Namespace) -> int:
    from dittofx.metrics import compare_dirs

    for folder in (args.dir_a, args.dir_b):
        if not folder.is_dir():
            args.parser.error(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    try:
        result = compare_dirs(args.dir_a, args.dir_b)
    except ValueError as err:
        args.parser.error(str(err))
    print(f"images {result['images']}  PSNR {result['psnr']:.2f} dB  SSIM {result['ssim']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dittofx`` console script."""
    parser = argparse.ArgumentParser(prog="dittofx", description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the fixture DiT uncached and cached; table, grid, plot")
    demo.add_argument("--out", type=Path, default=Path("dittofx-demo"), help="output folder (default ./dittofx-demo)")
    demo.add_argument("--prompts", type=_positive_int, default=8, help="images per run (default 8)")
    demo.add_argument("--steps", type=_positive_int, default=28, help="denoising steps (default 28)")
    demo.add_argument("--cfg-mode", choices=["separate", "batched"], default="separate",
                      help="CFG as two calls a step, cond and uncond, each with its own cache state (separate, the default), "
                           "or as one call on the [uncond, cond] batch (batched)")  # fmt: skip
    demo.add_argument("--repeats", type=_positive_int, default=3, help="timed repeats per run; the fastest counts (default 3)")
    demo.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads (default 1)")
    demo.add_argument("--config", action="append", metavar="JSON",
                      help="a cache config as a JSON dict; repeat for several (default: the demo's list)")  # fmt: skip
    demo.set_defaults(func=_demo, parser=demo)
    metrics = sub.add_parser("metrics", help="PSNR/SSIM between same-named PNGs of two folders")
    metrics.add_argument("dir_a", type=Path)
    metrics.add_argument("dir_b", type=Path)
    metrics.set_defaults(func=_metrics, parser=metrics)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
