"""`dittofx demo`: table, images, grid and plot, checked against direct sampling and the metrics CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import dittofx
from dittofx.cli import DEMO_CONFIGS, config_label, main
from dittofx.fixtures import EVAL_PROMPTS, follows_prompt, load_fixture, sample
from dittofx.metrics import compare_dirs, load_pngs, to_uint8

CONFIG = {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.5, "max_warmup_steps": 2}


def test_demo_small_run(tmp_path, capsys):
    torch.set_num_threads(1)
    steps, prompts = 6, list(EVAL_PROMPTS[:2])
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--prompts", "2", "--steps", str(steps), "--repeats", "1"]
    assert main([*args, "--config", json.dumps(CONFIG)]) == 0
    label = config_label(CONFIG)
    assert label == "F1B0_W2_R0.5"

    table = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in table.splitlines() if line.split()}
    assert lines["uncached"][1:5] == ["0", "1.00", "inf", "1.000"]
    assert label in lines

    results = json.loads((out / "results.json").read_text())
    assert results["prompts"] == prompts and results["num_inference_steps"] == steps
    rows = {r["label"]: r for r in results["rows"]}
    assert set(rows) == {"uncached", label}

    # the uncached images are exactly what the sampler gives for the same prompts and seeds
    ref = sample(load_fixture(), prompts, seeds=[0, 1], num_inference_steps=steps)
    saved = load_pngs(out / "images" / "uncached")
    assert np.array_equal(np.stack(list(saved.values())), to_uint8(ref.images))
    assert rows["uncached"]["prompts_ok"] == sum(follows_prompt(im, p) for im, p in zip(ref.images, prompts))

    # cached run: warmup 2 steps computed in both branches, the rest decided by the threshold
    cached = rows[label]["cached_steps"]
    assert set(cached) == {"cond", "uncond"}
    assert all(min(v) >= 2 and max(v) < steps for v in cached.values() if v)
    assert lines[label][1] == "/".join(str(len(v)) for v in cached.values())
    # the demo's PSNR and SSIM are `dittofx metrics`' on the PNGs it wrote (the table's SSIM was taken
    # on unclamped floats: 0.962 against 0.848 on the files; helper-56)
    on_disk = compare_dirs(out / "images" / "uncached", out / "images" / label)
    assert rows[label]["psnr"] < float("inf")
    assert (on_disk["psnr"], on_disk["ssim"]) == pytest.approx((rows[label]["psnr"], rows[label]["ssim"]), rel=1e-9)

    grid = Image.open(out / "grid.png")
    plot = Image.open(out / "speed_vs_psnr.png")
    assert grid.size[0] > 200 and grid.size[1] > 200 and plot.size[0] > 300


def test_default_demo_configs_are_accepted_by_optimize():
    model = load_fixture().transformer
    for cfg in DEMO_CONFIGS:
        assert dittofx.optimize(model, cfg) is model
        dittofx.disable(model)
    assert len({config_label(c) for c in DEMO_CONFIGS}) == len(DEMO_CONFIGS)


@pytest.mark.parametrize(
    "args, words",
    [
        (["demo", "--config", "{bad json"], "not JSON"),
        (["demo", "--config", "[1, 2]"], "must be a JSON object"),
        (["demo", "--config", '{"residual_diff_threshold": -1}'], "residual_diff_threshold=-1"),
        (["demo", "--repeats", "0"], "--repeats: 0: must be >= 1"),
        (["demo", "--prompts", "0"], "--prompts: 0: must be >= 1"),
        (["demo", "--steps", "0"], "--steps: 0: must be >= 1"),
        (["demo", "--threads", "0"], "--threads: 0: must be >= 1"),
        (["demo", "--out", "__file__"], "a file, not a folder"),
        (["metrics", "no-such-a", "no-such-b"], "no-such-a: no such folder"),
    ],
)
def test_bad_cli_arguments_stop_before_any_work_naming_the_argument(args, words, capsys, tmp_path):
    args = [str(tmp_path / "file") if a == "__file__" else a for a in args]
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2 and words in capsys.readouterr().err


def test_demo_labels_stay_apart_where_two_configs_share_one():
    """A run's images and results are filed under its label: two runs under one would mix."""
    from dittofx.cli import run_labels

    tea = [{"method": "teacache", "rel_l1_thresh": t, "coefficients": "flux"} for t in (0.05, 2.0)]
    assert config_label(tea[0]) == "TeaCache_R0.05" != config_label(tea[1])
    same = [{"residual_diff_threshold": 0.1, "warmup_interval": 2}, {"residual_diff_threshold": 0.1}, {"residual_diff_threshold": 0.1}]
    assert len({config_label(c) for c in same}) == 1
    assert run_labels(same) == ["F1B0_W8_R0.1", "F1B0_W8_R0.1_2", "F1B0_W8_R0.1_3"]  # max_warmup_steps: 8 by default
    assert config_label({}) == "F1B0_W8_R0.08"  # what the empty config runs


@pytest.mark.parametrize(
    "config, words",
    [
        ({"Fn_compute_blocks": 7}, "Fn_compute_blocks + Bn_compute_blocks = 7 + 0"),  # refused by optimize
        ({"blocks": ["single_transformer_blocks", "transformer_blocks"]}, "neither run one after another"),  # at the first call
    ],
)
def test_a_config_the_fixture_refuses_is_a_usage_error(config, words, capsys, tmp_path):
    """Configs that pass the config check (it knows no model) and that the fixture's model refuses,
    by optimize or at its first call: a usage error naming the config, not a traceback (helper-56)."""
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--config", json.dumps(config), "--prompts", "1", "--steps", "2", "--repeats", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"--config: {config_label(config)} {json.dumps(config)}: " in err and words in err
    assert "Traceback" not in err
