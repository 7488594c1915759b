"""Wan 2.2's two experts in a real diffusers WanPipeline assembled offline (two tiny Wan
transformers, prompt embeddings given directly, latents out): each expert runs the steps the
pipeline's `boundary_ratio` gives it, with its own request length, state and config."""

import functools
import logging

import pytest
import torch
from diffusers import FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

import dittofx
import zoo
from reference import NaiveConfig, NaiveDBCache

BOUNDARY = 0.7  # with flow_shift=3: 20 steps -> 12 high-noise + 8 low-noise, 14 -> 8 + 6, 1 -> 1 + 0


def expert(seed: int) -> torch.nn.Module:
    model = zoo.get("wan").build()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # two experts with different weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def wan_pipeline() -> WanPipeline:
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=expert(1),
                       transformer_2=expert(2), boundary_ratio=BOUNDARY)  # fmt: skip


def generate(pipe: WanPipeline, steps: int, guidance: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    text, negative = torch.randn(1, 7, 16, generator=g), torch.randn(1, 7, 16, generator=g)
    return pipe(prompt_embeds=text, negative_prompt_embeds=negative, height=64, width=64, num_frames=1,
                num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                generator=torch.Generator().manual_seed(1)).frames  # fmt: skip


@functools.cache
def split(steps: int) -> dict[str, int]:
    """How many steps each expert runs, counted on a plain pipeline's calls (independent of dittofx)."""
    pipe = wan_pipeline()
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:
        getattr(pipe, name).register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    generate(pipe, steps, guidance=1.0)  # one call per step
    return calls


def by_expert(pipe) -> dict[tuple[str, str], dittofx.CacheStats]:
    return {(s.name.split(":")[0], s.branch): s for s in dittofx.summary(pipe, log_table=False)}


def test_threshold_zero_equals_the_plain_pipeline_and_each_expert_counts_its_own_steps():
    want = generate(wan_pipeline(), 12)
    high, low = split(12).values()
    assert high > 2 and low > 2 and high + low == 12
    pipe = dittofx.optimize(wan_pipeline(), {"residual_diff_threshold": 0.0, "max_warmup_steps": 0})
    assert torch.equal(generate(pipe, 12), want)
    stats = by_expert(pipe)
    assert set(stats) == {(e, b) for e in ("transformer", "transformer_2") for b in ("cond", "uncond")}
    for (name, _), s in stats.items():
        assert s.cached_steps == [] and s.computed_steps == list(range(high if name == "transformer" else low))
    dittofx.disable(pipe)
    assert type(pipe) is WanPipeline and torch.equal(generate(pipe, 12), want)


def test_each_expert_gets_the_preset_mask_for_its_own_share_of_every_call():
    pipe = dittofx.optimize(wan_pipeline(), {"residual_diff_threshold": 10.0, "max_warmup_steps": 2,
                                             "scm_steps_mask_policy": "fast", "scm_steps_policy": "dynamic"})  # fmt: skip
    for steps in (20, 14, 1, 20):
        generate(pipe, steps, guidance=1.0)
        stats = by_expert(pipe)
        for name, n in split(steps).items():
            mask = dittofx.steps_mask(mask_policy="fast", total_steps=n) if n else []
            assert stats[name, "cond"].computed_steps == [i for i in range(n) if i < 2 or mask[i]], (steps, name)
            assert stats[name, "cond"].cached_steps == [i for i in range(2, n) if not mask[i]], (steps, name)


@pytest.mark.parametrize("experts", [1, 2])
def test_an_order_2_scheduler_runs_each_expert_once_per_timestep(experts):
    """Heun lists 2N-1 timesteps for N steps and the loop calls a transformer once per entry: each
    transformer (Wan 2.1's one, or Wan 2.2's two split by the boundary) gets the schedule for the
    calls it really gets, counted on a plain pipeline's calls."""

    def pipeline():
        second = {"transformer_2": expert(2), "boundary_ratio": BOUNDARY} if experts == 2 else {}
        return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchHeunDiscreteScheduler(shift=3.0),
                           transformer=expert(1), **second)  # fmt: skip

    names = ["transformer", "transformer_2"][:experts]
    plain, calls = pipeline(), dict.fromkeys(names, 0)
    for name in names:
        getattr(plain, name).register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    generate(plain, 8, guidance=1.0)
    assert sum(calls.values()) == 15 and all(n > 2 for n in calls.values())
    pipe = dittofx.optimize(pipeline(), {"residual_diff_threshold": 10.0, "max_warmup_steps": 2,
                                         "scm_steps_mask_policy": "fast", "scm_steps_policy": "dynamic"})  # fmt: skip
    generate(pipe, 8, guidance=1.0)
    stats = by_expert(pipe)
    for name, n in calls.items():
        mask = dittofx.steps_mask(mask_policy="fast", total_steps=n)
        assert stats[name, "cond"].computed_steps == [i for i in range(n) if i < 2 or mask[i]], name
        assert stats[name, "cond"].cached_steps == [i for i in range(2, n) if not mask[i]], name


def naive(transformer: torch.nn.Module, cfg: NaiveConfig) -> NaiveDBCache:
    """The transformer's forward replaced by the naive reference (which runs the class's forward)."""
    ref = NaiveDBCache(transformer, ("blocks",), cfg)
    ref.model = functools.partial(type(transformer).forward, transformer)
    transformer.forward = ref
    return ref


def test_per_expert_configs_match_a_naive_reference_per_expert():
    """`params_modifiers` gives transformer_2 its own threshold and warmup; each expert's schedule
    and the pipeline's output equal a pipeline whose experts are naive references, each running
    its own share of the steps (one request per pipeline call, so a fresh reference per call)."""
    probe = wan_pipeline()
    refs = {n: naive(getattr(probe, n), NaiveConfig(threshold=0.0)) for n in ("transformer", "transformer_2")}
    generate(probe, 20, guidance=1.0)
    thresholds = {}
    for name, ref in refs.items():
        measured = sorted(d for d in ref.diffs if d == d)
        thresholds[name] = measured[len(measured) // 2] * 1.05
    warmup = {"transformer": 1, "transformer_2": 3}
    pipe = dittofx.optimize(
        wan_pipeline(), {"residual_diff_threshold": thresholds["transformer"], "max_warmup_steps": warmup["transformer"]},
        params_modifiers={"transformer_2": {"residual_diff_threshold": thresholds["transformer_2"],
                                            "max_warmup_steps": warmup["transformer_2"]}},
    )  # fmt: skip
    for steps in (20, 14):
        reference = wan_pipeline()
        refs = {n: naive(getattr(reference, n), NaiveConfig(threshold=thresholds[n], max_warmup_steps=warmup[n]))
                for n in refs}  # fmt: skip
        want = generate(reference, steps, guidance=1.0)
        got = generate(pipe, steps, guidance=1.0)
        stats = by_expert(pipe)
        assert set(stats) == {("transformer", "cond"), ("transformer_2", "cond")}
        for name, ref in refs.items():
            s = stats[name, "cond"]
            assert sorted(s.cached_steps + s.computed_steps) == list(range(ref.step))
            assert s.cached_steps == ref.cached_steps, (steps, name)
        assert all(len(ref.cached_steps) > 0 for ref in refs.values())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert f"_R{thresholds['transformer_2']:g}" in stats["transformer_2", "cond"].config
    assert stats["transformer_2", "cond"].config.startswith("DBCache_F1B0_W3I1")


def test_cache_dits_list_of_params_modifiers_sets_each_experts_config():
    """cache-dit's Wan 2.2 form: one `ParamsModifier(cache_config=DBCacheConfig().reset(...))` per
    transformer in order, None keeping the shared config; only the fields given change it."""
    import cache_dit
    from cache_dit import ParamsModifier

    shared = dittofx.DBCacheConfig(residual_diff_threshold=0.2, max_warmup_steps=4)
    low_noise = ParamsModifier(cache_config=cache_dit.DBCacheConfig().reset(max_warmup_steps=2, max_cached_steps=20))
    pipe = dittofx.optimize(wan_pipeline(), shared, params_modifiers=[None, low_noise])
    assert pipe.transformer._dittofx.cfg == shared
    assert pipe.transformer_2._dittofx.cfg == dittofx.DBCacheConfig(residual_diff_threshold=0.2, max_warmup_steps=2, max_cached_steps=20)


def untouched(pipe) -> bool:
    return type(pipe) is WanPipeline and all("_dittofx" not in m.__dict__ for m in (pipe.transformer, pipe.transformer_2))


@pytest.mark.parametrize(
    "modifiers, error, words",
    [
        ({"transformer_3": {}}, ValueError, ["'transformer_3'", "['transformer', 'transformer_2']"]),
        ({"transformer.blocks": {}}, ValueError, ["not a transformer", "per block list inside one transformer"]),
        ({"transformer_2": {"threshold": 0.1}}, ValueError, ["params_modifiers['transformer_2']", "unknown cache_config key 'threshold'"]),
        ({"transformer_2": {"max_warmup_steps": -1}}, ValueError, ["params_modifiers['transformer_2']", "max_warmup_steps=-1"]),
        ({"transformer_2": 0.1}, TypeError, ["params_modifiers['transformer_2']", "must be one of ['DBCacheConfig', 'TeaCacheConfig', 'DBPruneConfig'] or a dict"]),
        ([{}, {}, {}], ValueError, ["3 entries", "2 transformers", "one entry each"]),
        ("transformer_2", TypeError, ["params_modifiers='transformer_2'"]),
    ],
)  # fmt: skip
def test_bad_params_modifiers_raise_and_leave_the_pipeline_untouched(modifiers, error, words):
    pipe = wan_pipeline()
    with pytest.raises(error) as info:
        dittofx.optimize(pipe, {}, params_modifiers=modifiers)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert untouched(pipe)


def test_a_config_one_expert_refuses_at_its_first_call_restores_the_whole_pipeline(caplog):
    """non_prune_block_ids past transformer_2's chain is known only in its graph: its first call
    raises and restores it; the pipeline is then restored whole (never run half cached), and
    runs as the plain pipeline."""
    want = generate(wan_pipeline(), 20)
    pipe = dittofx.optimize(wan_pipeline(), {"method": "dbprune", "residual_diff_threshold": 0.1, "max_warmup_steps": 1},
                            params_modifiers={"transformer_2": {"non_prune_block_ids": [7]}})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="dittofx"), pytest.raises(ValueError, match=r"non_prune_block_ids=\[7\]: \[7\] past the chain"):
        generate(pipe, 20)
    assert untouched(pipe) and "transformer_2 failed at its first call and was restored; so is the whole pipeline" in caplog.text
    assert torch.equal(generate(pipe, 20), want)


def test_params_modifiers_forms():
    """cache-dit's list (one entry per transformer, in pipeline order) equals the dict by name; a
    dict changes only what it names, a DBCacheConfig replaces the whole config."""
    shared = {"residual_diff_threshold": 0.2, "max_warmup_steps": 4}
    configs = []
    for modifiers in ([None, {"max_warmup_steps": 2}], {"transformer_2": {"max_warmup_steps": 2}}):
        pipe = dittofx.optimize(wan_pipeline(), shared, params_modifiers=modifiers)
        configs.append([pipe.transformer._dittofx.cfg, pipe.transformer_2._dittofx.cfg])
    assert configs[0] == configs[1]
    assert configs[0][0] == dittofx.DBCacheConfig(**shared)
    assert configs[0][1] == dittofx.DBCacheConfig(residual_diff_threshold=0.2, max_warmup_steps=2)
    whole = dittofx.DBCacheConfig(Fn_compute_blocks=2)
    pipe = dittofx.optimize(wan_pipeline(), shared, params_modifiers={"transformer": whole})
    assert pipe.transformer._dittofx.cfg == whole
