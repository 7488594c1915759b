"""The shipped fixture DiT: data, checker, weights, sampler contract, and that it really learned."""

import contextlib
import json

import pytest
import torch
from safetensors import safe_open

from dittofx.fixtures import ALL_PROMPTS, EVAL_PROMPTS, classify, follows_prompt, load_fixture, sample
from dittofx.fixtures.data import COLOURS, POSITIONS, SHAPES, VOCAB, Scene, random_scenes, render_prompts, tokenize
from dittofx.fixtures.model import CONFIG_FILE, TRANSFORMER_CONFIG, WEIGHTS_FILE
from dittofx.fixtures.sampler import pack, position_ids, unpack


@pytest.fixture(scope="module")
def fixture():
    torch.set_num_threads(1)
    return load_fixture()


def test_data_is_deterministic_and_covers_every_attribute():
    a_img, a_ids = random_scenes(64, torch.Generator().manual_seed(5))
    b_img, b_ids = random_scenes(64, torch.Generator().manual_seed(5))
    assert torch.equal(a_img, b_img) and torch.equal(a_ids, b_ids)
    assert a_img.shape == (64, 3, 32, 32) and a_img.min() >= -1 and a_img.max() <= 1
    assert len(ALL_PROMPTS) == len(COLOURS) * len(SHAPES) * len(POSITIONS) == 72
    c_img, _ = random_scenes(64, torch.Generator().manual_seed(6))
    assert not torch.equal(a_img, c_img)


def test_scene_is_drawn_where_the_prompt_says():
    img = render_prompts(["red square bottom-right"], seed=3)[0]
    lit = (img.amax(0) > 0).nonzero()
    # all shape pixels lie in the bottom-right quadrant; red dominates
    assert (lit >= 16).all()
    r, g, b = ((img[:, img.amax(0) > 0.5] + 1) / 2).mean(1)
    assert r > 0.7 and g < 0.3 and b < 0.3
    assert torch.equal(img[:, :16, :], torch.full_like(img[:, :16, :], -1.0))


def test_checker_reads_back_every_rendered_prompt():
    # the independent reference is the renderer's own parameters: 72 prompts x 3 seeds
    for seed in range(3):
        images = render_prompts(list(ALL_PROMPTS), seed=seed)
        wrong = [p for p, im in zip(ALL_PROMPTS, images) if not follows_prompt(im, p)]
        assert wrong == []
    assert classify(torch.full((3, 32, 32), -1.0)) is None  # blank canvas: no verdict
    assert not follows_prompt(render_prompts(["red circle top-left"])[0], "red circle top-right")


def test_tokenize_and_parse():
    assert tokenize([None, ""]).tolist() == [[0, 0, 0], [0, 0, 0]]
    ids = tokenize(["cyan triangle bottom-left"])[0].tolist()
    assert [VOCAB[i] for i in ids] == ["cyan", "triangle", "bottom-left"]
    assert Scene.parse("blue circle top-right").prompt == "blue circle top-right"
    with pytest.raises(ValueError, match="purple"):
        Scene.parse("purple circle top-left")
    with pytest.raises(ValueError, match="COLOUR SHAPE POSITION"):
        Scene.parse("red circle")


def test_pack_matches_flux_layout():
    images = torch.randn(2, 3, 32, 32)
    tokens = pack(images)
    assert tokens.shape == (2, 64, 48)
    # token (row 2, col 5) holds pixels [8:12, 20:24] of every channel, channel-major
    assert torch.equal(tokens[1, 2 * 8 + 5], images[1, :, 8:12, 20:24].reshape(-1))
    assert torch.equal(unpack(tokens), images)
    img_ids, txt_ids = position_ids()
    assert img_ids.shape == (64, 3) and txt_ids.shape == (3, 3)
    assert img_ids[2 * 8 + 5].tolist() == [0.0, 2.0, 5.0]


def test_weights_are_small_fp16_with_config_and_card():
    assert WEIGHTS_FILE.stat().st_size <= 10 * 2**20
    with safe_open(str(WEIGHTS_FILE), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert json.loads(CONFIG_FILE.read_text()) == TRANSFORMER_CONFIG
    card = (WEIGHTS_FILE.parent / "README.md").read_text()
    assert "2026-11-22" in card and "prompt" in card.lower()


def test_trained_model_follows_prompts(fixture):
    prompts = list(EVAL_PROMPTS[:8])
    out = sample(fixture, prompts, seeds=[100 + i for i in range(8)])
    assert out.images.shape == (8, 3, 32, 32) and out.latents.shape == (8, 64, 48)
    ok = sum(follows_prompt(im, p) for im, p in zip(out.images, prompts))
    assert ok >= 0.8 * len(prompts), f"{ok}/8 samples follow their prompt"


def test_untrained_model_does_not_follow_prompts():
    """The checker is not trivially satisfied: random weights score near chance."""
    from dittofx.fixtures.model import build

    untrained = build()
    untrained.transformer.eval()
    prompts = list(EVAL_PROMPTS[:8])
    out = sample(untrained, prompts, num_inference_steps=4)
    assert sum(follows_prompt(im, p) for im, p in zip(out.images, prompts)) <= 2


def test_sampler_calls_the_model_like_a_pipeline(fixture, monkeypatch):
    """Separate CFG: cond then uncond per step, each inside its cache_context; batched: one call."""
    model = fixture.transformer
    calls, active = [], []

    @contextlib.contextmanager
    def cache_context(name, **kwargs):
        active.append(name)
        try:
            yield
        finally:
            active.pop()

    def hook(module, args, kwargs):
        calls.append((active[-1] if active else None, args, sorted(kwargs), kwargs["hidden_states"].shape[0],
                      kwargs["return_dict"]))  # fmt: skip

    monkeypatch.setattr(model, "cache_context", cache_context)
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        sample(fixture, ["red circle top-left", "blue square bottom-right"], num_inference_steps=3, cfg_mode="separate")
        separate = list(calls)
        calls.clear()
        sample(fixture, ["red circle top-left", "blue square bottom-right"], num_inference_steps=3, cfg_mode="batched")
    finally:
        handle.remove()
    keys = ["encoder_hidden_states", "hidden_states", "img_ids", "pooled_projections", "return_dict", "timestep", "txt_ids"]
    assert [c[0] for c in separate] == ["cond", "uncond"] * 3
    assert all(c[1] == () and c[2] == keys and c[3] == 2 and c[4] is False for c in separate)
    assert [(c[0], c[3]) for c in calls] == [(None, 4)] * 3


def test_batched_cfg_equals_separate_cfg(fixture):
    prompts = ["yellow triangle top-right", "green circle bottom-left"]
    a = sample(fixture, prompts, seeds=[7, 8], num_inference_steps=8, cfg_mode="separate")
    b = sample(fixture, prompts, seeds=[7, 8], num_inference_steps=8, cfg_mode="batched")
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-4)


def test_each_sample_depends_only_on_its_prompt_and_seed(fixture):
    both = sample(fixture, ["red circle top-left", "cyan square bottom-right"], seeds=[3, 4], num_inference_steps=6)
    alone = sample(fixture, ["cyan square bottom-right"], seeds=[4], num_inference_steps=6)
    again = sample(fixture, ["cyan square bottom-right"], seeds=[4], num_inference_steps=6)
    assert torch.equal(alone.latents, again.latents)
    torch.testing.assert_close(both.latents[1:], alone.latents, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="cfg_mode"):
        sample(fixture, ["red circle top-left"], cfg_mode="fused")


def test_sampler_runs_a_dittofx_optimized_model_unchanged():
    """optimize() in place: a never-caching config reproduces the uncached samples bitwise, and a
    caching config keeps one state per CFG branch (the sampler's cache_context names)."""
    import dittofx

    torch.set_num_threads(1)
    fx = load_fixture()
    prompts, seeds = list(EVAL_PROMPTS[:4]), [11, 12, 13, 14]
    ref = sample(fx, prompts, seeds)
    assert dittofx.optimize(fx.transformer, {"residual_diff_threshold": 0.0}) is fx.transformer
    same = sample(fx, prompts, seeds)
    assert torch.equal(same.latents, ref.latents)
    dittofx.disable(fx.transformer)
    dittofx.optimize(fx.transformer, {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.12, "max_warmup_steps": 4})
    cached = sample(fx, prompts, seeds)
    stats = {s.branch: s for s in dittofx.summary(fx.transformer, log_table=False)}
    assert set(stats) == {"cond", "uncond"}
    for s in stats.values():
        assert len(s.cached_steps) + len(s.computed_steps) == 28
        assert 4 <= len(s.cached_steps) <= 24 and min(s.cached_steps) >= 4
    from dittofx.metrics import psnr

    assert 30 < psnr(cached.images, ref.images, 2.0) < float("inf")
    assert all(follows_prompt(im, p) for im, p in zip(cached.images, prompts))


def test_training_loss_is_the_one_the_shipped_model_minimised(fixture):
    """The shipped weights reach a low flow-matching loss on fresh scenes; untrained weights do not."""
    from dittofx.fixtures.model import build
    from dittofx.fixtures.train import flow_matching_loss

    images, ids = random_scenes(64, torch.Generator().manual_seed(123))
    with torch.no_grad():
        trained = flow_matching_loss(fixture, images, ids, torch.Generator().manual_seed(0), null_prob=0.0)
        untrained = flow_matching_loss(build(), images, ids, torch.Generator().manual_seed(0), null_prob=0.0)
    assert trained < 0.05 < 0.5 < untrained


def test_training_script_writes_a_loadable_fixture(tmp_path):
    from dittofx.fixtures.train import main as train

    train(["--out", str(tmp_path), "--max-steps", "2", "--batch", "4", "--device", "cpu", "--eval-guidance"])
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["steps"] == 2
    loaded = load_fixture(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == TRANSFORMER_CONFIG
    built = json.loads(json.dumps({k: loaded.transformer.config[k] for k in TRANSFORMER_CONFIG}))  # tuples -> lists
    assert built == TRANSFORMER_CONFIG
