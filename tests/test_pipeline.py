"""`dittofx.optimize(pipe)` on a real diffusers pipeline assembled offline (tiny FLUX transformer,
prompt embeddings given directly, latents out)."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, QwenImagePipeline

import dittofx
import zoo


def tiny_flux_pipeline() -> FluxPipeline:
    transformer = zoo.get("flux").build()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )  # fmt: skip


def generate(pipe, steps):
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 7, pipe.transformer.config.joint_attention_dim, generator=g)
    pooled = torch.randn(1, pipe.transformer.config.pooled_projection_dim, generator=g)
    return pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, height=64, width=64, num_inference_steps=steps,
                guidance_scale=3.5, output_type="latent", generator=torch.Generator().manual_seed(1)).images  # fmt: skip


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
    pipe = dittofx.optimize(tiny_flux_pipeline(), {"residual_diff_threshold": 10.0, "max_warmup_steps": 2,
                                                   "scm_steps_mask_policy": "fast", "scm_steps_policy": "dynamic"})  # fmt: skip
    for steps in (8, 8, 5, 12):
        generate(pipe, steps)
        (stats,) = dittofx.summary(pipe)
        assert stats.name == "transformer:transformer_blocks+single_transformer_blocks"
        assert stats.branch == "cond"  # FluxPipeline names its calls with cache_context("cond")
        mask = dittofx.steps_mask(mask_policy="fast", total_steps=steps)
        assert stats.computed_steps == [s for s in range(steps) if s < 2 or mask[s]]
        assert stats.cached_steps == [s for s in range(2, steps) if not mask[s]]
    assert "dittofx: FluxTransformer2DModel (transformer)" in dittofx.explain(pipe)


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
