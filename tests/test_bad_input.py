"""Bad input (SPEC §1): a clear ValueError/TypeError naming the field, the value and what is
allowed, and the model left exactly as it was."""

import logging
import math

import numpy as np
import pytest
import torch

import dittofx
import zoo


def snapshot(model):
    return (
        dict(model.__dict__.items()) | {"_modules": dict(model._modules)},
        {k: v.clone() for k, v in model.state_dict().items()},
        dict(model._forward_pre_hooks),
    )


def assert_untouched(model, before):
    attrs, state, hooks = snapshot(model)
    assert attrs.keys() == before[0].keys()
    assert attrs["_modules"] == before[0]["_modules"]
    assert hooks == before[2]
    assert state.keys() == before[1].keys() and all(torch.equal(state[k], before[1][k]) for k in state)


@pytest.fixture(scope="module")
def pixart():
    return zoo.get("pixart")


CASES = [
    ({"foo": 1}, ValueError, ["'foo'", "allowed keys"]),
    ({"Fn_compute_blocks": 0}, ValueError, ["Fn_compute_blocks=0", ">= 1"]),
    ({"Fn_compute_blocks": "1"}, TypeError, ["Fn_compute_blocks='1'", "int"]),
    ({"Fn_compute_blocks": True}, TypeError, ["Fn_compute_blocks=True", "int"]),
    ({"Bn_compute_blocks": -1}, ValueError, ["Bn_compute_blocks=-1", ">= 0"]),
    ({"residual_diff_threshold": -0.1}, ValueError, ["residual_diff_threshold=-0.1", ">= 0"]),
    ({"residual_diff_threshold": math.nan}, ValueError, ["residual_diff_threshold=nan", "finite"]),
    ({"residual_diff_threshold": "0.1"}, TypeError, ["residual_diff_threshold='0.1'", "float"]),
    ({"max_warmup_steps": -2}, ValueError, ["max_warmup_steps=-2", ">= 0"]),
    ({"warmup_interval": 0}, ValueError, ["warmup_interval=0", ">= 1"]),
    ({"max_cached_steps": -2}, ValueError, ["max_cached_steps=-2", "-1 for no limit"]),
    ({"max_continuous_cached_steps": 1.5}, TypeError, ["max_continuous_cached_steps=1.5", "int"]),
    ({"max_accumulated_residual_diff_threshold": -1.0}, ValueError, ["max_accumulated_residual_diff_threshold=-1.0"]),
    ({"enable_separate_cfg": "yes"}, TypeError, ["enable_separate_cfg='yes'", "True, False or None"]),
    ({"cfg_compute_first": None}, TypeError, ["cfg_compute_first=None", "True or False"]),
    ({"num_inference_steps": 0}, ValueError, ["num_inference_steps=0", ">= 1"]),
    ({"method": "fastcache"}, ValueError, ["method='fastcache'", "dbcache"]),
    ({"blocks": "transformer_blocks"}, TypeError, ["blocks='transformer_blocks'", "list of ModuleList"]),
    ({"blocks": 5}, TypeError, ["blocks=5", "list of ModuleList"]),
    ({"method": "dbprune", "non_prune_block_ids": 3}, ValueError, ["non_prune_block_ids=3", "list of block indices"]),
    # vLLM-omni's TeaCache dict, "method" left out: the keys' method is named
    ({"rel_l1_thresh": 0.2, "coefficients": [1.0, 0.0]}, ValueError,
     ["unknown cache_config key 'rel_l1_thresh' for method='dbcache'", "belong to method='teacache': add \"method\": \"teacache\""]),
    ({"method": "dbprune", "cfg_diff_compute_separate": False}, ValueError, ["cfg_diff_compute_separate=False", "method='dbcache' only"]),
    ({"taylorseer_order": 0}, ValueError, ["taylorseer_order=0", ">= 1"]),
    ({"enable_taylorseer": 1}, TypeError, ["enable_taylorseer=1", "True or False"]),
    ({"scm_steps_mask_policy": "turbo"}, ValueError, ["scm_steps_mask_policy='turbo'", "'fast'"]),
    ({"scm_steps_policy": "always"}, ValueError, ["scm_steps_policy='always'", "'dynamic' or 'static'"]),
    ({"steps_computation_mask": [1, 2, 0]}, ValueError, ["steps_computation_mask=(1, 2, 0)", "0/1 ints"]),
    ({"steps_computation_mask": [1] * 1025}, ValueError, ["steps_computation_mask=(1025 steps)", "at most 1024 steps"]),
    ({"steps_computation_mask": [1, 0], "scm_steps_mask_policy": "fast"}, ValueError, ["give one of them"]),
    ({"steps_computation_mask": np.array([1, 0, 1])}, TypeError, ["steps_computation_mask=array([1, 0, 1])", "ndarray", ".tolist()"]),
    ({"steps_computation_mask": torch.tensor([1, 0])}, TypeError, ["steps_computation_mask=tensor([1, 0])", "Tensor", "0/1 ints"]),
    ({"steps_computation_mask": "101"}, TypeError, ["steps_computation_mask='101'", "list of 0/1 ints"]),
    ({"method": "teacache", "coefficients": np.array([1.0, 0.0])}, TypeError, ["coefficients=array([1., 0.])", "ndarray", ".tolist()"]),
    ({"scm_steps_policy": "static", "steps_computation_policy": "dynamic"}, ValueError, ["the same setting twice"]),
    ([("Fn_compute_blocks", 1)], TypeError, ["cache_config=", "must be one of ['DBCacheConfig', 'TeaCacheConfig', 'DBPruneConfig'] or a dict"]),
    # what needs no capture to tell: a named list missing, more Fn + Bn blocks than the named lists hold
    # (the lists inside the blocks, an attention's to_out, a feed-forward's net, are no chain: helper-56)
    ({"blocks": ["nope"]}, ValueError, ["blocks=['nope']", "['nope'] not found", "ModuleLists: ['transformer_blocks']"]),
    ({"blocks": ["transformer_blocks"], "Fn_compute_blocks": 3, "Bn_compute_blocks": 2}, ValueError,
     ["Fn_compute_blocks + Bn_compute_blocks = 3 + 2 = 5", "at most 4 here (all blocks of ['transformer_blocks'])"]),
    ({"Fn_compute_blocks": 3, "Bn_compute_blocks": 2}, ValueError,
     ["Fn_compute_blocks + Bn_compute_blocks = 3 + 2 = 5", "at most 4 here (all blocks of ['transformer_blocks'])"]),
]


@pytest.mark.parametrize("cfg, exc, words", CASES, ids=[str(c[0])[:40] for c in CASES])
def test_bad_config_is_rejected_and_model_untouched(pixart, cfg, exc, words):
    model = pixart.build()
    before = snapshot(model)
    with pytest.raises(exc) as info:
        dittofx.optimize(model, cfg)
    for word in words:
        assert word in str(info.value)
    assert_untouched(model, before)


ARGUMENTS = [
    # cache_dit.enable_cache's keywords, written as a cache-dit user would, and one no API has
    ("calibrator_config", "taylorseer", ["calibrator_config=TaylorSeerCalibratorConfig(...)", "'enable_taylorseer': True", "'taylorseer_order': k"]),
    ("parallelism_config", "ulysses", ["parallelism_config='ulysses'", "enable_parallelism", "process_group="]),
    ("attention_backend", "flash", ["attention_backend='flash'", "set_attention_backend"]),
    ("quantize_config", "float8", ["quantize_config='float8'", "quantize the transformer first"]),
    # cache-dit's deprecated form: cache config fields as keywords
    ("Fn_compute_blocks", 2, ["Fn_compute_blocks=2", "a cache config field", "dittofx.optimize(model, {'Fn_compute_blocks': 2, ...})"]),
    ("scm_steps_mask_policy", "fast", ["scm_steps_mask_policy='fast'", "{'scm_steps_mask_policy': 'fast', ...}"]),
    ("guidance_scale", 4.5, ["guidance_scale=4.5", "no such argument", "cache_config, example_inputs, process_group"]),
]


@pytest.mark.parametrize("name, value, words", ARGUMENTS, ids=[a[0] for a in ARGUMENTS])
def test_a_cache_dit_argument_says_where_its_setting_goes_and_leaves_the_model_untouched(pixart, name, value, words):
    if value == "taylorseer":
        cache_dit = pytest.importorskip("cache_dit")
        value = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1)
    model = pixart.build()
    before = snapshot(model)
    with pytest.raises(TypeError) as info:
        dittofx.optimize(model, {"residual_diff_threshold": 0.1}, **{name: value})
    for word in words:
        assert word in str(info.value), str(info.value)
    assert_untouched(model, before)


def test_cache_dit_arguments_left_at_their_default_pass(pixart):
    """calibrator_config=None etc. (cache_dit.enable_cache's defaults) set nothing: the model is
    optimized as without them."""
    model = pixart.build()
    nones = dict.fromkeys(("calibrator_config", "parallelism_config", "attention_backend", "quantize_config"))
    assert dittofx.optimize(model, {"residual_diff_threshold": 0.1}, **nones) is model
    assert model._dittofx.cfg == dittofx.DBCacheConfig(residual_diff_threshold=0.1)


def test_not_a_module():
    with pytest.raises(TypeError, match=r"model=function: must be a torch.nn.Module"):
        dittofx.optimize(lambda x: x, {})


def _call(model, z):
    with torch.no_grad():
        return model(**z.inputs(0, 1.0))


@pytest.mark.parametrize(
    "name, cfg, words",
    [
        # Wan VACE's lists hold 6 blocks, its chain 4 (vace_blocks run beside it): known at capture
        ("wan_vace", {"Fn_compute_blocks": 3, "Bn_compute_blocks": 2}, ["Fn_compute_blocks + Bn_compute_blocks = 3 + 2 = 5", "<= the number of blocks in the chain (4"]),
        ("pixart", {"blocks": ["nope"]}, ["blocks=['nope']", "not found", "transformer_blocks"]),
    ],
)
def test_model_dependent_errors_leave_model_untouched(name, cfg, words):
    """Errors only known once the graph is captured: raised at optimize() with example_inputs,
    or at the first call (lazy); in both cases the model is restored."""
    z = zoo.get(name)
    for eager_capture in (True, False):
        model = z.build()
        before = snapshot(model)
        ref = _call(model, z)[0]
        example = ((), z.inputs(0, 1.0))
        with pytest.raises(ValueError) as info:
            dittofx.optimize(model, cfg, example_inputs=example if eager_capture else None)
            _call(model, z)
        for word in words:
            assert word in str(info.value)
        assert_untouched(model, before)
        assert torch.equal(_call(model, z)[0], ref)


class Stages(torch.nn.Module):
    """Blocks in lists that are themselves a list's elements (`stages.0`, `stages.1`): the chain."""

    def __init__(self):
        super().__init__()
        self.stages = torch.nn.ModuleList(torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3)) for _ in range(2))

    def forward(self, hidden_states):
        for stage in self.stages:
            for block in stage:
                hidden_states = hidden_states + torch.tanh(block(hidden_states))
        return hidden_states


def test_lists_that_are_a_lists_elements_count_toward_the_bound():
    """The optimize-time Fn + Bn bound leaves out lists inside blocks, not lists that are a list's
    elements: 6 blocks in `stages.0`, `stages.1` hold F2B1 (it was refused as 'at most 2'; helper-59)."""
    model = dittofx.optimize(Stages(), {"Fn_compute_blocks": 2, "Bn_compute_blocks": 1}, example_inputs=((torch.randn(1, 4, 8),), {}))
    assert model._dittofx.entries[0].chain.lists == ["stages.0", "stages.1"]


class NoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, hidden_states):
        return self.proj(hidden_states)


class UnusedList(NoBlocks):
    """A ModuleList the forward never runs: no chain, found only in the captured graph."""

    def __init__(self):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))


def test_model_without_block_chain_explains_what_was_searched():
    model = UnusedList()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no transformer block chain found in UnusedList: searched .*nn.ModuleList"):
        dittofx.optimize(model, {}, example_inputs=((torch.randn(1, 3, 4),), {}))
    assert_untouched(model, before)


def test_a_unet_names_the_block_that_hands_nothing_on():
    """A UNet's down blocks hand their outputs on through skip connections, not to the next block:
    the error names the last Fn block, the chain found and `blocks=` (it said only "no carried
    tensor"; helper-56), and the model is left as it was."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()  # fmt: skip
    before = snapshot(unet)
    example = ((torch.randn(1, 4, 8, 8), torch.tensor([10])), {"encoder_hidden_states": torch.randn(1, 3, 8)})
    with pytest.raises(ValueError, match=r"the last Fn block \(down_blocks.0; chain down_blocks -> .*name the lists that form one with blocks="):
        dittofx.optimize(unet, {}, example_inputs=example)
    assert_untouched(unet, before)


class LoopedList(NoBlocks):
    """Weight-shared blocks: the forward runs its ModuleList twice."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    def forward(self, hidden_states):
        for _ in range(2):
            for block in self.blocks:
                hidden_states = hidden_states + block(hidden_states)
        return self.proj(hidden_states)


@pytest.mark.parametrize("cfg", [{}, {"blocks": ["blocks"]}])
def test_a_block_list_run_twice_is_named_as_no_chain(cfg):
    model = LoopedList()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"not in index order, or a block run more than once: \['blocks'\]"):
        dittofx.optimize(model, cfg, example_inputs=((torch.randn(1, 3, 4),), {}))
    assert_untouched(model, before)


def test_already_optimized_and_refresh_errors(pixart):
    model = dittofx.optimize(pixart.build(), {})
    with pytest.raises(ValueError, match="already optimized"):
        dittofx.optimize(model, {})
    with pytest.raises(ValueError, match=r"num_inference_steps=0: must be an int >= 1 or None"):
        dittofx.refresh(model, num_inference_steps=0)
    for bad in (2.5, True, "28"):
        with pytest.raises(ValueError, match=r"num_inference_steps=.*: must be an int >= 1 or None"):
            dittofx.refresh(model, num_inference_steps=bad)
    dittofx.refresh(model, num_inference_steps=np.int64(6))  # numpy's ints are ints
    assert model._dittofx.num_steps == 6 and type(model._dittofx.num_steps) is int
    with pytest.raises(ValueError, match="not optimized by dittofx"):
        dittofx.summary(pixart.build())


@pytest.mark.parametrize(
    "cfg, words",
    [
        ({"residual_diff_threshold": 0.0}, "can never cache a step: residual_diff_threshold=0"),
        ({"max_continuous_cached_steps": 0}, "can never cache a step: max_cached_steps or max_continuous_cached_steps is 0"),
        ({"max_warmup_steps": 8, "num_inference_steps": 8}, "can never cache a step: max_warmup_steps=8 >= num_inference_steps=8"),
        ({"method": "teacache", "coefficients": [1.0, 0.0], "num_inference_steps": 2}, "can never cache a step: num_inference_steps=2"),
        ({"method": "dbprune", "residual_diff_threshold": 0.0}, "can never prune a block: residual_diff_threshold=0"),
        ({"max_accumulated_residual_diff_threshold": 0.0}, "can never cache a step: max_accumulated_residual_diff_threshold=0"),
        ({"steps_computation_mask": [1, 1, 1, 1], "num_inference_steps": 4}, "can never cache a step: steps_computation_mask has no 0"),
    ],
)
def test_a_config_that_can_never_cache_warns(pixart, cfg, words, caplog):
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        dittofx.optimize(pixart.build(), cfg)
    assert [r.getMessage() for r in caplog.records if words in r.getMessage()], caplog.text


@pytest.mark.parametrize(
    "name, cfg, words",
    [
        ("pixart", {"Fn_compute_blocks": 3, "Bn_compute_blocks": 1}, "can never cache a step: Fn_compute_blocks + Bn_compute_blocks = 3 + 1 = every block of the chain (transformer_blocks)"),
        ("lumina2", {"Fn_compute_blocks": 2, "Bn_compute_blocks": 2}, "can never cache a step: Fn_compute_blocks + Bn_compute_blocks = 2 + 2"),  # block by block
    ],
)
def test_a_chain_with_no_block_between_fn_and_bn_is_said_to_never_cache(name, cfg, words, caplog):
    """Known once the chain is found (optimize sees every ModuleList, the feed-forward's too), said at
    the first call, once. (DBPrune refuses it: no block left to prune.)"""
    z = zoo.get(name)
    model = dittofx.optimize(z.build(), dict(cfg, residual_diff_threshold=0.5, max_warmup_steps=0))
    with caplog.at_level(logging.WARNING, logger="dittofx"), torch.no_grad():
        for s in range(3):
            model(**z.inputs(s, 1 - s / 3))
    assert caplog.text.count(words) == 1, caplog.text


STATIC_FAST = {"scm_steps_mask_policy": "fast", "scm_steps_policy": "static", "max_warmup_steps": 2, "num_inference_steps": 10}


@pytest.mark.parametrize(
    "cfg",
    [
        {"residual_diff_threshold": 0.1, "max_warmup_steps": 2, "num_inference_steps": 8},
        # a static mask's 0s cache with no diff measured: the diff-based gates do not stop them
        dict(STATIC_FAST, residual_diff_threshold=0.0),
        dict(STATIC_FAST, max_cached_steps=0),
        dict(STATIC_FAST, max_accumulated_residual_diff_threshold=0.0),
        # steps past a mask's end count as 0
        {"steps_computation_mask": [1, 1, 1], "num_inference_steps": 4, "max_warmup_steps": 1, "residual_diff_threshold": 1.0},
    ],
)
def test_a_config_that_can_cache_does_not_warn(pixart, cfg, caplog):
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        model = dittofx.optimize(pixart.build(), cfg)
    assert "never" not in caplog.text
    steps = cfg["num_inference_steps"]
    with torch.no_grad():
        for s in range(steps):
            model(**pixart.inputs(s, 1 - s / steps))
    assert dittofx.summary(model, log_table=False)[0].cached_steps  # it does cache


def test_numpy_scalars_are_taken_as_the_python_numbers_they_hold():
    """A threshold computed with numpy or a count read from an array (np.float32 and np.int64 are
    not float and int subclasses): the config equals the one with Python numbers."""
    from dittofx.config import parse_config

    plain = {"residual_diff_threshold": 0.25, "Fn_compute_blocks": 2, "max_warmup_steps": 3, "enable_taylorseer": True,
             "steps_computation_mask": [1, 0, 1]}  # fmt: skip
    given = {"residual_diff_threshold": np.float32(0.25), "Fn_compute_blocks": np.int64(2), "max_warmup_steps": np.int32(3),
             "enable_taylorseer": np.bool_(True), "steps_computation_mask": [np.int64(1), np.int64(0), np.int64(1)]}  # fmt: skip
    got, want = parse_config(given), parse_config(plain)
    assert got == want and type(got.residual_diff_threshold) is float and type(got.Fn_compute_blocks) is int
    assert all(type(m) is int for m in got.steps_computation_mask)
    assert parse_config(dittofx.DBCacheConfig(residual_diff_threshold=np.float32(0.25), Fn_compute_blocks=np.int64(2), max_warmup_steps=3,
                                              enable_taylorseer=True, steps_computation_mask=(1, 0, 1))) == want  # fmt: skip
    tea = parse_config({"method": "teacache", "rel_l1_thresh": np.float32(0.5), "coefficients": list(np.array([2.0, 0.5], dtype=np.float32))})
    assert tea == parse_config({"method": "teacache", "rel_l1_thresh": 0.5, "coefficients": [2.0, 0.5]})
    with pytest.raises(TypeError, match=r"residual_diff_threshold=tensor\(0.2500\) \(Tensor\): must be a float"):
        parse_config({"residual_diff_threshold": torch.tensor(0.25)})


def test_a_model_without_a_module_list_is_refused_at_optimize():
    """Known without a capture (the chain is made of ModuleLists), so raised by optimize itself."""
    model = NoBlocks()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no transformer block chain found in NoBlocks: it has no nn.ModuleList"):
        dittofx.optimize(model, {})
    assert_untouched(model, before)


def test_a_first_call_the_model_itself_refuses_leaves_it_optimized(caplog):
    """A first call with inputs the model's own forward raises on (a text width the model was not
    built for) raises the model's error, as the plain model does, without export's traceback of the
    op that failed on fake tensors; the model stays optimized (it was detached: every later call ran
    uncached, silently), and the next request, with good inputs, caches as a fresh model does."""
    z = zoo.get("flux")
    cfg = {"residual_diff_threshold": 0.3, "max_warmup_steps": 1, "num_inference_steps": 4}
    plain, model, fresh = z.build(), dittofx.optimize(z.build(), cfg), dittofx.optimize(z.build(), cfg)
    bad = z.inputs(0, 1.0)
    bad["encoder_hidden_states"] = bad["encoder_hidden_states"][..., :8]
    with torch.no_grad(), pytest.raises(RuntimeError) as want:
        plain(**bad)
    with torch.no_grad(), pytest.raises(RuntimeError) as got, caplog.at_level(logging.WARNING):
        model(**bad)
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value)
    assert not [r.name for r in caplog.records if r.levelno >= logging.ERROR]
    steps = [z.inputs(s, 1 - s / 4) for s in range(4)]
    with torch.no_grad():
        got_out, want_out = [model(**kw)[0] for kw in steps], [fresh(**kw)[0] for kw in steps]
    got_cached, want_cached = (dittofx.summary(m, log_table=False)[0].cached_steps for m in (model, fresh))
    assert got_cached == want_cached and 0 < len(want_cached) < 3, (got_cached, want_cached)
    assert all(torch.equal(g, w) for g, w in zip(got_out, want_out))
