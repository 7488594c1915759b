"""`dittofx.optimize(pipe)` on a real diffusers pipeline assembled offline (tiny FLUX transformer,
prompt embeddings given directly, latents out)."""

import logging

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline, QwenImagePipeline

import dittofx
import zoo


def tiny_flux_pipeline() -> FluxPipeline:
    transformer = zoo.get("flux").build()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )  # fmt: skip


def generate(pipe, steps=None, **call):
    """One call; `steps=None` leaves `num_inference_steps` at the pipeline's default."""
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 7, pipe.transformer.config.joint_attention_dim, generator=g)
    pooled = torch.randn(1, pipe.transformer.config.pooled_projection_dim, generator=g)
    if steps is not None:
        call["num_inference_steps"] = steps
    return pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, height=64, width=64, guidance_scale=3.5,
                output_type="latent", generator=torch.Generator().manual_seed(1), **call).images  # fmt: skip


MASKED = {"residual_diff_threshold": 10.0, "max_warmup_steps": 2, "scm_steps_mask_policy": "fast",
          "scm_steps_policy": "dynamic"}  # fmt: skip


def masked_schedule(steps):
    """(computed, cached) steps of `MASKED` for a request of `steps` steps: with a threshold no diff
    reaches, the 2 warmup steps and the ones of the "fast" mask for `steps` compute, the rest cache."""
    mask = dittofx.steps_mask(mask_policy="fast", total_steps=steps)
    return [s for s in range(steps) if s < 2 or mask[s]], [s for s in range(2, steps) if not mask[s]]


def transformer_calls(pipe, **call) -> int:
    """How many times a plain pipeline calls its transformer in one call (independent of dittofx)."""
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    generate(pipe, **call)
    handle.remove()
    return len(calls)


def test_pipeline_threshold_zero_equals_the_plain_pipeline_and_disable_restores():
    plain = tiny_flux_pipeline()
    want = generate(plain, 6)
    pipe = tiny_flux_pipeline()
    cls = type(pipe)
    assert dittofx.optimize(pipe, {"residual_diff_threshold": 0.0, "max_warmup_steps": 0}) is pipe
    assert torch.equal(generate(pipe, 6), want)
    assert type(plain) is cls  # only the instance changed
    dittofx.disable(pipe)
    assert type(pipe) is cls and "_dittofx" not in pipe.transformer.__dict__
    assert torch.equal(generate(pipe, 6), want)


def test_every_pipeline_call_refreshes_the_request_length():
    pipe = dittofx.optimize(tiny_flux_pipeline(), MASKED)
    for steps in (8, 8, 5, 12, np.int64(6)):  # diffusers takes numpy's ints too
        generate(pipe, steps)
        (stats,) = dittofx.summary(pipe)
        assert stats.name == "transformer:transformer_blocks+single_transformer_blocks"
        assert stats.branch == "cond"  # FluxPipeline names its calls with cache_context("cond")
        assert (stats.computed_steps, stats.cached_steps) == masked_schedule(steps)
    assert "dittofx: FluxTransformer2DModel (transformer)" in dittofx.explain(pipe)


SIGMAS = [1.0 - 0.09 * i for i in range(10)]


def test_custom_sigmas_set_the_request_length():
    """`sigmas` of length 10 with num_inference_steps left at FLUX's default 28 (or given as 5): the
    loop runs 10 steps, so the schedule is the one for 10 steps, last step computed."""
    assert transformer_calls(tiny_flux_pipeline(), sigmas=SIGMAS) == 10
    pipe = dittofx.optimize(tiny_flux_pipeline(), MASKED)
    for steps in (None, 5):
        generate(pipe, steps, sigmas=SIGMAS)
        (stats,) = dittofx.summary(pipe)
        assert (stats.computed_steps, stats.cached_steps) == masked_schedule(10)
        assert stats.computed_steps[-1] == 9
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert not {"set_timesteps", "set_begin_index"} & set(vars(pipe.scheduler))


def tiny_vae() -> AutoencoderKL:
    """Random weights; 4 levels so that FLUX's pipelines see the usual 8x downsampling."""
    torch.manual_seed(0)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=8,
                         shift_factor=0.0, scaling_factor=1.0)  # fmt: skip


def test_img2img_strength_sets_the_request_length():
    """strength=0.5 of 20 steps: FluxImg2ImgPipeline keeps the last 10 timesteps (`set_begin_index`)."""

    def pipeline():
        return FluxImg2ImgPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=None,
                                   tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                   transformer=zoo.get("flux").build())  # fmt: skip

    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert transformer_calls(pipeline(), steps=20, image=image, strength=0.5) == 10
    pipe = dittofx.optimize(pipeline(), MASKED)
    for steps, strength, runs in ((20, 0.5, 10), (12, 0.75, 9)):
        generate(pipe, steps, image=image, strength=strength)
        (stats,) = dittofx.summary(pipe)
        assert (stats.computed_steps, stats.cached_steps) == masked_schedule(runs), (steps, strength)


def from_pipe_pair():
    """A text-to-image pipeline and an img2img one made from it with `from_pipe`: one transformer."""
    t2i = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=None, tokenizer=None,
                       text_encoder_2=None, tokenizer_2=None, transformer=zoo.get("flux").build())  # fmt: skip
    return t2i, FluxImg2ImgPipeline.from_pipe(t2i)


IMAGE = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def test_a_pipeline_sharing_the_transformer_never_serves_a_request_from_the_last_ones_cache(caplog):
    """optimize(t2i), then calls through FluxImg2ImgPipeline.from_pipe(t2i): the length t2i's calls set
    does not hold there, so new requests are told by the timestep (said once). Expected: each img2img
    request as on a pipeline that never saw another request."""
    config = {"residual_diff_threshold": 0.3, "max_warmup_steps": 1}
    t2i, i2i = from_pipe_pair()
    dittofx.optimize(t2i, config)
    generate(t2i, 8)
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        got = [generate(i2i, 8, image=IMAGE, strength=0.5) for _ in range(2)]
    assert caplog.text.count("is called outside the pipeline that dittofx.optimize was given") == 1
    schedule = {s.branch: s.cached_steps for s in dittofx.summary(t2i.transformer)}["default"]  # img2img names no branch
    _, fresh = from_pipe_pair()
    dittofx.optimize(fresh, config)
    want = generate(fresh, 8, image=IMAGE, strength=0.5)
    assert schedule == dittofx.summary(fresh)[0].cached_steps and schedule
    for image in got:
        torch.testing.assert_close(image, want, rtol=1e-5, atol=1e-6)


def test_optimizing_the_pipeline_that_shares_the_transformer_makes_its_calls_set_the_length():
    """A preset mask needs the length: a call outside t2i's calls says how to give it; optimize(i2i)
    (no config, or the same) then has i2i's calls set it too; another config is refused."""
    t2i, i2i = from_pipe_pair()
    dittofx.optimize(t2i, MASKED)
    generate(t2i, 8)
    for _attempt in range(2):  # refused each time: nothing half-applied runs the next call on t2i's request
        with pytest.raises(ValueError, match="called outside the pipeline that dittofx.optimize was given.*dittofx.optimize that pipeline too"):
            generate(i2i, 20, image=IMAGE, strength=0.5)
    with pytest.raises(ValueError, match=r"FluxImg2ImgPipeline.transformer: already optimized with DBCache_F1B0_W2.*shared with another pipeline"):
        dittofx.optimize(i2i, {"residual_diff_threshold": 0.3})
    for option in ({"split_at_decision": False}, {"split_at_decision": {}}, {"cuda_graphs": True}):  # options of its own: refused too
        with pytest.raises(ValueError, match=r"already optimized with DBCache_F1B0_W2.*no other options"):
            dittofx.optimize(i2i, MASKED, **option)
    assert dittofx.optimize(i2i, MASKED) is i2i
    for steps, strength, runs in ((20, 0.5, 10), (12, 0.75, 9)):
        generate(i2i, steps, image=IMAGE, strength=strength)
        stats = {s.branch: s for s in dittofx.summary(i2i)}["default"]  # img2img names no branch; t2i: "cond"
        assert (stats.computed_steps, stats.cached_steps) == masked_schedule(runs), (steps, strength)
    generate(t2i, 8)
    stats = {s.branch: s for s in dittofx.summary(t2i)}["cond"]
    assert (stats.computed_steps, stats.cached_steps) == masked_schedule(8)


def test_outside_its_pipeline_the_configs_length_holds():
    """A length in the config is the user's: after a pipeline call set another, a loop of the user's
    own over the transformer gets the config's length back (its preset mask included)."""
    pipe = dittofx.optimize(tiny_flux_pipeline(), dict(MASKED, num_inference_steps=6))
    generate(pipe, 8)
    z = zoo.get("flux")
    with torch.no_grad():
        for s in range(6):
            pipe.transformer(**z.inputs(s, 1 - s / 6))
    stats = {s.branch: s for s in dittofx.summary(pipe)}["default"]
    assert (stats.computed_steps, stats.cached_steps) == masked_schedule(6)


def test_a_models_own_error_at_the_first_call_leaves_the_pipeline_optimized():
    """Latents of the wrong width fail inside the model (a RuntimeError, not a config dittofx
    refuses): the pipeline is not restored whole for it."""
    pipe = dittofx.optimize(tiny_flux_pipeline(), {"residual_diff_threshold": 0.3})
    with pytest.raises(RuntimeError):
        generate(pipe, 4, latents=torch.randn(1, 16, 3))
    assert type(pipe) is not FluxPipeline


@pytest.mark.parametrize("how", ["disable the transformer", "replace the transformer"])
def test_a_pipelines_transformer_no_longer_optimized_runs_uncached_and_disable_still_restores(how, caplog):
    plain = tiny_flux_pipeline()
    want = generate(plain, 4)
    pipe = dittofx.optimize(tiny_flux_pipeline(), {"residual_diff_threshold": 0.3, "max_warmup_steps": 1})
    generate(pipe, 4)
    if how == "disable the transformer":
        dittofx.disable(pipe.transformer)
    else:
        pipe.transformer = zoo.get("flux").build()
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        assert torch.equal(generate(pipe, 4), want) and torch.equal(generate(pipe, 4), want)
    assert caplog.text.count("FluxTransformer2DModel is not optimized") == 1
    with pytest.raises(ValueError, match=r"none of its transformers \['transformer'\] is optimized any more"):
        dittofx.summary(pipe)
    assert dittofx.disable(pipe) is pipe and type(pipe) is FluxPipeline


def test_scheduler_is_restored_after_a_call_that_raises():
    """The scheduler object is shared with a plain pipeline: after an optimized call raises
    mid-loop, it is of its own class again and the plain pipeline's output is unchanged."""
    want = generate(tiny_flux_pipeline(), sigmas=SIGMAS)
    pipe = dittofx.optimize(tiny_flux_pipeline(), MASKED)
    plain = tiny_flux_pipeline()
    plain.scheduler = pipe.scheduler

    def fail(*_):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        generate(pipe, sigmas=SIGMAS, callback_on_step_end=fail)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert not {"set_timesteps", "set_begin_index"} & set(vars(pipe.scheduler))
    assert torch.equal(generate(plain, sigmas=SIGMAS), want)
    generate(pipe, 8)  # the next call starts a request of its own length
    (stats,) = dittofx.summary(pipe)
    assert (stats.computed_steps, stats.cached_steps) == masked_schedule(8)


def test_pipeline_errors():
    pipe = tiny_flux_pipeline()
    with pytest.raises(ValueError, match="Fn_compute_blocks=0"):
        dittofx.optimize(pipe, {"Fn_compute_blocks": 0})
    assert "_dittofx" not in pipe.transformer.__dict__ and type(pipe) is FluxPipeline
    # cache-dit's params_modifiers for FLUX's two block lists: one config per region of one graph is not supported
    per_region = [{"residual_diff_threshold": 0.08}, {"residual_diff_threshold": 0.16}]
    with pytest.raises(ValueError, match=r"2 entries; .* 1 transformers \['transformer'\].*block list inside one transformer"):
        dittofx.optimize(pipe, {}, params_modifiers=per_region)
    with pytest.raises(ValueError, match="params_modifiers: model=FluxTransformer2DModel is one transformer"):
        dittofx.optimize(pipe.transformer, {}, params_modifiers={"single_transformer_blocks": {}})
    with pytest.raises(ValueError, match="example_inputs: model=FluxPipeline is a pipeline"):
        dittofx.optimize(pipe, {}, example_inputs=((), {}))
    assert "_dittofx" not in pipe.transformer.__dict__ and type(pipe) is FluxPipeline
    dittofx.optimize(pipe, {})
    with pytest.raises(ValueError, match="already optimized"):
        dittofx.optimize(pipe, {})


def qwen_generate(pipe, steps):
    g = torch.Generator().manual_seed(0)
    dim = pipe.transformer.config.joint_attention_dim
    text, negative = torch.randn(1, 7, dim, generator=g), torch.randn(1, 5, dim, generator=g)
    return pipe(
        prompt_embeds=text, prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long), negative_prompt_embeds=negative,
        negative_prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long), true_cfg_scale=4.0, height=64, width=64,
        num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(1),
    ).images  # fmt: skip


def test_pipeline_with_separate_cfg_calls_keeps_one_state_per_branch():
    """QwenImagePipeline calls the transformer twice per step, in cache_context("cond") and ("uncond")."""

    def pipeline():
        return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                 tokenizer=None, transformer=zoo.get("qwenimage").build())  # fmt: skip

    want = qwen_generate(pipeline(), 6)
    exact = dittofx.optimize(pipeline(), {"residual_diff_threshold": 0.0})
    assert torch.equal(qwen_generate(exact, 6), want)
    caching = dittofx.optimize(pipeline(), {"residual_diff_threshold": 10.0, "max_warmup_steps": 2})
    for steps in (6, 4):
        qwen_generate(caching, steps)
        stats = {s.branch: s for s in dittofx.summary(caching)}
        assert set(stats) == {"cond", "uncond"}
        for s in stats.values():  # each branch counts its own steps: warmup 0-1, then cached
            assert s.computed_steps == [0, 1] and s.cached_steps == list(range(2, steps))


def lumina2_generate(pipe, steps, guidance_scale=4.0):
    """Lumina2Pipeline calls its transformer twice per step under CFG (cond, then uncond), naming neither."""
    kw = zoo.get("lumina2").inputs(0, 1.0)
    text, mask = kw["encoder_hidden_states"], kw["encoder_attention_mask"]
    return pipe(
        prompt_embeds=text, prompt_attention_mask=mask, negative_prompt_embeds=torch.zeros_like(text),
        negative_prompt_attention_mask=mask, height=64, width=64, guidance_scale=guidance_scale,
        num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip


def test_unnamed_cfg_calls_sharing_one_state_warn_and_parity_separates_them(caplog):
    """SPEC §3: with no names, the calls share one state, which then counts 2 calls per timestep and
    restarts halfway through the request: said once, with the fix. enable_separate_cfg=True gives
    each branch its own state counting the request's steps."""
    from diffusers import Lumina2Pipeline

    def pipeline(cfg):
        pipe = Lumina2Pipeline(transformer=zoo.get("lumina2").build(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                               text_encoder=None, tokenizer=None)  # fmt: skip
        return dittofx.optimize(pipe, {"residual_diff_threshold": 10.0, "max_warmup_steps": 2, **cfg})

    shared = pipeline({})
    shared.transformer = torch.compile(shared.transformer, backend="eager")  # the README's way: seen through the wrapper
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        lumina2_generate(shared, 4)
        lumina2_generate(shared, 4)
    warnings = [r.getMessage() for r in caplog.records if "more than the 4 times" in r.getMessage()]
    assert len(warnings) == 1 and "Lumina2Pipeline called Lumina2Transformer2DModel" in warnings[0]
    assert "enable_separate_cfg=True" in warnings[0]
    (stats,) = dittofx.summary(shared)
    assert stats.computed_steps == [0, 1] and stats.cached_steps == [2, 3]  # the second half of 8 calls

    caplog.clear()
    separate, single = pipeline({"enable_separate_cfg": True}), pipeline({})
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        lumina2_generate(separate, 4)
        lumina2_generate(single, 4, guidance_scale=1.0)  # no CFG: one call per timestep
    assert not [r for r in caplog.records if "more than the" in r.getMessage()]
    stats = {s.branch: s for s in dittofx.summary(separate)}
    for branch in ("cond", "uncond"):
        assert stats[branch].computed_steps == [0, 1] and stats[branch].cached_steps == [2, 3]
    (stats,) = dittofx.summary(single)
    assert stats.computed_steps == [0, 1] and stats.cached_steps == [2, 3]
