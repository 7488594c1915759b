"""Tiny real diffusers transformers with random weights, for CPU tests.

Each entry builds a real diffusers transformer class with a tiny config (2-4 blocks per list, a few
heads of 4-16 channels), seeded, fp32, eval(), on CPU, and gives deterministic inputs for a
denoising step: a fixed seeded base latent plus a slow drift with the step, the same text
embeddings every step. Image tokens (16) and text tokens (7) differ in count, so the image and text
streams have different shapes.

    from tests.zoo import ZOO, get
    zm = get("flux")
    model = zm.build()
    out = model(**zm.inputs(step=3, t=0.8), return_dict=False)[0]

`block_lists` names the main chain's ModuleLists in run order (read from the diffusers source):
lists whose carried values flow to the output, not refiners / guidance approximators / hint blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["ZooModel", "ZOO", "get", "names"]

IMG_TOKENS = 16  # image tokens after patchify, for every model
TXT_TOKENS = 7  # text tokens
DRIFT = 0.02  # latent drift per step


@dataclass
class ZooModel:
    name: str  # e.g. "flux"
    cls_name: str  # diffusers class name
    build: Callable[[], torch.nn.Module]  # seeded, fp32, eval(), on CPU
    # inputs(step, t) -> kwargs for model(**kw, return_dict=False); t in (0, 1], scaled inside to what
    # the model expects ([0, 1000] for most; Flux/Flux2/Chroma/QwenImage/AuraFlow/ZImage scale it themselves)
    inputs: Callable[[int, float], dict]
    block_lists: tuple[str, ...]  # main chain's ModuleList attribute paths, in run order
    capturable: bool = True
    note: str = ""  # oddities seen when capturing (lifted constants, data-dependent ops, warm-up)


ZOO: dict[str, ZooModel] = {}
# no graph dittofx can rewrite (not capturable; Framepack: outputs of data-dependent lengths), yet each
# block hands its streams straight to the next: dittofx caches them block by block
BLOCKWISE = ("hidream", "lumina2", "bria_fibo2_mask", "omnigen", "qwenimage21", "hunyuanvideo15", "hunyuanvideo_framepack")


def get(name: str) -> ZooModel:
    return ZOO[name]


def names(capturable: bool | None = None) -> list[str]:
    return [n for n, z in ZOO.items() if capturable is None or z.capturable == capturable]


# ----------------------------------------------------------------------------------------- helpers


def _randn(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _latent(seed: int, *shape: int, step: int) -> torch.Tensor:
    """Fixed base latent + slow drift along a fixed direction."""
    return _randn(seed, *shape) + DRIFT * step * _randn(seed + 1000, *shape)


def _text(seed: int, *shape: int) -> torch.Tensor:
    return _randn(seed + 2000, *shape)


def _ts(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32)


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    # Built on CPU in the default dtype; `.to(dtype=...)` would only print diffusers' keep-in-fp32 warning.
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    return model.eval()


def _builder(
    cls_name: str,
    config: dict,
    warmup: Callable[[], dict] | None = None,
    seed: int = 0,
    init: Callable[[torch.nn.Module], None] | None = None,
):
    def build() -> torch.nn.Module:
        import diffusers

        cls = getattr(diffusers, cls_name)
        torch.manual_seed(seed)
        model = _finish(cls(**config))
        if init is not None:  # weights the class initialises to a degenerate value (zeros)
            init(model)
        if warmup is not None:  # lazily built tables (rope caches): one eager forward before capture
            with torch.no_grad():
                model(**warmup(), return_dict=False)
        return model

    return build


def _register(name, cls_name, config, inputs, block_lists, capturable=True, warmup=False, note="", init=None):
    ZOO[name] = ZooModel(
        name=name,
        cls_name=cls_name,
        build=_builder(cls_name, config, (lambda: inputs(0, 1.0)) if warmup else None, init=init),
        inputs=inputs,
        block_lists=tuple(block_lists),
        capturable=capturable,
        note=note,
    )


def _redraw_zero_init(model: torch.nn.Module) -> None:
    """Re-draws the weights a class initialises to zero (adaLN-zero modulation, output projections):
    with them a random-weight model's blocks are identities and its output is zero."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 0 and not p.any():
                p.normal_(0.0, 0.2)


def _redraw(part: str) -> Callable[[torch.nn.Module], None]:
    """Re-draws the weights whose name contains `part`: ones a class leaves uninitialised
    (`torch.empty`, filled by checkpoint loading), which may hold anything."""

    def init(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if part in name:
                    p.normal_(0.0, 0.2)

    return init


def _img_ids_2d(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


# ------------------------------------------------------------------------------------------ models

# FLUX.1: 2 double-stream blocks then 2 single-stream blocks. Packed latents (1, 16, C); t in [0, 1]
# (the model multiplies timestep and guidance by 1000).
def _flux_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(1, 1, IMG_TOKENS, 16, step=step),
        encoder_hidden_states=_text(1, 1, TXT_TOKENS, 32),
        pooled_projections=_text(2, 1, 32),
        timestep=_ts(t),
        img_ids=_img_ids_2d(4, 4),
        txt_ids=torch.zeros(TXT_TOKENS, 3),
        guidance=_ts(3.5),
    )


_register(
    "flux",
    "FluxTransformer2DModel",
    dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    ),
    _flux_inputs,
    ("transformer_blocks", "single_transformer_blocks"),
)


# Wan 2.1: 4 blocks. Video latent (1, C, F, H, W) = (1, 4, 1, 8, 8) -> 16 tokens with patch (1, 2, 2).
# Timestep in [0, 1000].
def _wan_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(3, 1, 4, 1, 8, 8, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(3, 1, TXT_TOKENS, 16),
    )


_WAN_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=32, ffn_dim=32, num_layers=4, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
_register("wan", "WanTransformer3DModel", _WAN_CONFIG, _wan_inputs, ("blocks",))


# Qwen-Image: 4 dual-stream blocks. Packed latents (1, 16, C) with img_shapes [(1, 4, 4)].
# Timestep in [0, 1] (the time projection scales by 1000).
def _qwen_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(4, 1, IMG_TOKENS, 16, step=step),
        encoder_hidden_states=_text(4, 1, TXT_TOKENS, 16),
        encoder_hidden_states_mask=torch.ones(1, TXT_TOKENS, dtype=torch.long),
        timestep=_ts(t),
        img_shapes=[(1, 4, 4)],
    )


_register(
    "qwenimage",
    "QwenImageTransformer2DModel",
    dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    ),
    _qwen_inputs,
    ("transformer_blocks",),
    note="pos_embed.pos_freqs (plain tensor attribute) is lifted as an export constant",
)


# HunyuanVideo: token refiner (prologue) then 2 double + 2 single blocks. Latent (1, 4, 1, 4, 4), patch 1.
# Timestep and guidance in [0, 1000] (pipeline passes guidance * 1000).
def _hyv_inputs(step: int, t: float) -> dict:
    mask = torch.ones(1, TXT_TOKENS, dtype=torch.long)
    mask[:, -2:] = 0  # two padding tokens: the mask matters
    return dict(
        hidden_states=_latent(5, 1, 4, 1, 4, 4, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(5, 1, TXT_TOKENS, 16),
        encoder_attention_mask=mask,
        pooled_projections=_text(6, 1, 8),
        guidance=_ts(3500.0),
    )


_register(
    "hunyuanvideo",
    "HunyuanVideoTransformer3DModel",
    dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ),
    _hyv_inputs,
    ("transformer_blocks", "single_transformer_blocks"),
)


# PixArt-alpha/sigma: 4 blocks, adaLN-single. Latent (1, 4, 8, 8), patch 2. Timestep in [0, 1000].
def _pixart_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(7, 1, 4, 8, 8, step=step),
        encoder_hidden_states=_text(7, 1, TXT_TOKENS, 32),
        timestep=_ts(1000.0 * t),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


_register(
    "pixart",
    "PixArtTransformer2DModel",
    dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=32,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False,
    ),
    _pixart_inputs,
    ("transformer_blocks",),
)


# SD3: 4 joint blocks (the last is context_pre_only). Latent (1, 4, 8, 8), patch 2. Timestep [0, 1000].
def _sd3_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(8, 1, 4, 8, 8, step=step),
        encoder_hidden_states=_text(8, 1, TXT_TOKENS, 32),
        pooled_projections=_text(9, 1, 64),
        timestep=_ts(1000.0 * t),
    )


_register(
    "sd3",
    "SD3Transformer2DModel",
    dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=8,
    ),
    _sd3_inputs,
    ("transformer_blocks",),
)


# CogVideoX: 4 blocks. Latent (1, F, C, H, W) = (1, 1, 4, 8, 8), patch 2. Timestep [0, 1000].
# max_text_seq_length = text tokens (sincos positional embeddings are laid out text-first).
def _cogvideox_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(10, 1, 1, 4, 8, 8, step=step),
        encoder_hidden_states=_text(10, 1, TXT_TOKENS, 16),
        timestep=_ts(1000.0 * t),
    )


_register(
    "cogvideox",
    "CogVideoXTransformer3DModel",
    dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=4, sample_width=8, sample_height=8, sample_frames=1,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TXT_TOKENS,
    ),
    _cogvideox_inputs,
    ("transformer_blocks",),
)


# LTX-Video: 4 blocks. Packed latent (1, 16, C) with num_frames=1, height=width=4. Timestep [0, 1000].
def _ltx_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(11, 1, IMG_TOKENS, 4, step=step),
        encoder_hidden_states=_text(11, 1, TXT_TOKENS, 16),
        timestep=_ts(1000.0 * t),
        encoder_attention_mask=torch.ones(1, TXT_TOKENS, dtype=torch.long),
        num_frames=1,
        height=4,
        width=4,
    )


_register(
    "ltx",
    "LTXVideoTransformer3DModel",
    dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=4, caption_channels=16,
    ),
    _ltx_inputs,
    ("transformer_blocks",),
)


# Sana: 4 linear-attention blocks. Latent (1, 4, 4, 4), patch 1. Timestep [0, 1000].
def _sana_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(12, 1, 4, 4, 4, step=step),
        encoder_hidden_states=_text(12, 1, TXT_TOKENS, 8),
        timestep=_ts(1000.0 * t),
    )


_register(
    "sana",
    "SanaTransformer2DModel",
    dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4, num_layers=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8,
        caption_channels=8, sample_size=4, patch_size=1,
    ),
    _sana_inputs,
    ("transformer_blocks",),
)


# Cosmos (1.0 text2world style): 4 blocks. Latent (1, 4, 1, 8, 8), patch (1, 2, 2). Timestep [0, 1000].
# concat_padding_mask=False: the padding-mask path resizes with torchvision (not a dependency).
def _cosmos_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(13, 1, 4, 1, 8, 8, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(13, 1, TXT_TOKENS, 16),
        fps=24,
    )


_register(
    "cosmos",
    "CosmosTransformer3DModel",
    dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=4,
        mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable",
    ),
    _cosmos_inputs,
    ("transformer_blocks",),
)


# Chroma: FLUX without pooled/guidance embed; its `distilled_guidance_layer.layers` (approximator)
# stays in the prologue. 2 double + 2 single blocks. t in [0, 1].
def _chroma_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(14, 1, IMG_TOKENS, 16, step=step),
        encoder_hidden_states=_text(14, 1, TXT_TOKENS, 32),
        timestep=_ts(t),
        img_ids=_img_ids_2d(4, 4),
        txt_ids=torch.zeros(TXT_TOKENS, 3),
    )


_register(
    "chroma",
    "ChromaTransformer2DModel",
    dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1,
    ),
    _chroma_inputs,
    ("transformer_blocks", "single_transformer_blocks"),
)


# SkyReels-V2: Wan-like, 4 blocks. Timestep [0, 1000].
def _skyreels_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(15, 1, 4, 1, 8, 8, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(15, 1, TXT_TOKENS, 16),
    )


_register(
    "skyreels_v2",
    "SkyReelsV2Transformer3DModel",
    dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ),
    _skyreels_inputs,
    ("blocks",),
)


# HunyuanImage 2.1: token refiner (prologue) then 2 double + 2 single blocks. Latent (1, 4, 4, 4),
# patch (1, 1). Timestep [0, 1000].
def _hyi_inputs(step: int, t: float) -> dict:
    mask = torch.ones(1, TXT_TOKENS, dtype=torch.long)
    mask[:, -2:] = 0
    return dict(
        hidden_states=_latent(16, 1, 4, 4, 4, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(16, 1, TXT_TOKENS, 16),
        encoder_attention_mask=mask,
    )


_register(
    "hunyuanimage",
    "HunyuanImageTransformer2DModel",
    dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16,
        rope_axes_dim=(4, 4),
    ),
    _hyi_inputs,
    ("transformer_blocks", "single_transformer_blocks"),
)


# AuraFlow: 2 MMDiT (joint) blocks, then text and image are concatenated for 2 single DiT blocks.
# Latent (1, 4, 8, 8), patch 2. Timestep in [0, 1] (the time projection scales by 1000).
def _auraflow_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(17, 1, 4, 8, 8, step=step),
        encoder_hidden_states=_text(17, 1, TXT_TOKENS, 32),
        timestep=_ts(t),
    )


_register(
    "auraflow",
    "AuraFlowTransformer2DModel",
    dict(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
        caption_projection_dim=32, out_channels=4, pos_embed_max_size=256,
    ),
    _auraflow_inputs,
    ("joint_transformer_blocks", "single_transformer_blocks"),
)


# FLUX.2: 2 double + 2 single blocks, 4-axis rope ids (t, h, w, l). t and guidance in [0, 1]
# (the model multiplies both by 1000).
def _flux2_ids_img() -> torch.Tensor:
    ids = torch.zeros(4, 4, 4)
    ids[..., 1] = torch.arange(4)[:, None]
    ids[..., 2] = torch.arange(4)[None, :]
    return ids.reshape(1, IMG_TOKENS, 4)


def _flux2_inputs(step: int, t: float) -> dict:
    txt_ids = torch.zeros(1, TXT_TOKENS, 4)
    txt_ids[..., 3] = torch.arange(TXT_TOKENS)
    return dict(
        hidden_states=_latent(18, 1, IMG_TOKENS, 16, step=step),
        encoder_hidden_states=_text(18, 1, TXT_TOKENS, 32),
        timestep=_ts(t),
        img_ids=_flux2_ids_img(),
        txt_ids=txt_ids,
        guidance=_ts(4.0),
    )


_register(
    "flux2",
    "Flux2Transformer2DModel",
    dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
    ),
    _flux2_inputs,
    ("transformer_blocks", "single_transformer_blocks"),
)


# Mochi: 4 asymmetric dual-stream blocks (the last is context_pre_only). Latent (1, 4, 1, 8, 8),
# patch 2. Timestep [0, 1000]. Its attention processor keeps `nonzero` (data-dependent) nodes.
def _mochi_inputs(step: int, t: float) -> dict:
    mask = torch.ones(1, TXT_TOKENS, dtype=torch.long)
    mask[:, -2:] = 0
    return dict(
        hidden_states=_latent(19, 1, 4, 1, 8, 8, step=step),
        encoder_hidden_states=_text(19, 1, TXT_TOKENS, 16),
        timestep=_ts(1000.0 * t),
        encoder_attention_mask=mask,
    )


_register(
    "mochi",
    "MochiTransformer3DModel",
    dict(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=4,
        pooled_projection_dim=16, in_channels=4, qk_norm="rms_norm", text_embed_dim=16,
        time_embed_dim=4, activation_fn="swiglu", max_sequence_length=16,
    ),
    _mochi_inputs,
    ("transformer_blocks",),
    note="attention processor keeps nonzero (data-dependent) nodes",
)


# Z-Image: noise_refiner / context_refiner (prologue) then 4 joint blocks `layers`. Inputs are
# lists of unbatched tensors: x [(C, F, H, W)] = [(16, 1, 8, 8)] -> 16 tokens with patch 2; t in [0, 1]
# (t_scale 1000 inside). Rope tables are built lazily: build() runs one eager forward first.
def _zimage_inputs(step: int, t: float) -> dict:
    return dict(
        x=[_latent(20, 16, 1, 8, 8, step=step)],
        t=_ts(t),
        cap_feats=[_text(20, TXT_TOKENS, 16)],
    )


_register(
    "zimage",
    "ZImageTransformer2DModel",
    dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=4,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4],
        axes_lens=[64, 32, 32],
    ),
    _zimage_inputs,
    ("layers",),
    warmup=True,
    note="rope tables built lazily: eager warm-up forward in build(); tables lifted as constants",
)


# Wan VACE: 4 main blocks; `vace_blocks` (at layers 0 and 2) compute hints from the control video
# that are added into `blocks`: the main chain is `blocks`.
def _wan_vace_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(21, 1, 4, 1, 8, 8, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(21, 1, TXT_TOKENS, 16),
        control_hidden_states=_randn(22, 1, 8, 1, 8, 8),
        control_hidden_states_scale=torch.ones(2),
    )


_register(
    "wan_vace",
    "WanVACETransformer3DModel",
    dict(_WAN_CONFIG, vace_layers=[0, 2], vace_in_channels=8),
    _wan_vace_inputs,
    ("blocks",),
)

# ---- survey a

# DiT: 4 class-conditioned blocks (adaLN-zero). Latent (1, 4, 8, 8), patch 2. Timestep [0, 1000].
# The epilogue re-runs `transformer_blocks[0].norm1.emb` (a block's submodule) after the chain.
def _dit_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(30, 1, 4, 8, 8, step=step),
        timestep=_ts(1000.0 * t),
        class_labels=torch.tensor([3]),
    )


_register(
    "dit",
    "DiTTransformer2DModel",
    dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=4,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ),
    _dit_inputs,
    ("transformer_blocks",),
)


# HunyuanDiT: 4 blocks with U-Net-style long skips (block 0's output feeds block 3). Latent
# (1, 4, 8, 8), patch 2; CLIP text (7 tokens, 2 padded) and T5 text (5 tokens); 2D rope for a 4x4
# grid as the pipeline builds it. Timestep [0, 1000].
def _hunyuandit_inputs(step: int, t: float) -> dict:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    mask = torch.ones(1, TXT_TOKENS, dtype=torch.long)
    mask[:, -2:] = 0
    return dict(
        hidden_states=_latent(31, 1, 4, 8, 8, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(31, 1, TXT_TOKENS, 16),
        text_embedding_mask=mask,
        encoder_hidden_states_t5=_text(32, 1, 5, 16),
        text_embedding_mask_t5=torch.ones(1, 5, dtype=torch.long),
        image_meta_size=torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]]),
        style=torch.tensor([0]),
        image_rotary_emb=get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4), output_type="pt"),
    )


_register(
    "hunyuandit",
    "HunyuanDiT2DModel",
    dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
        hidden_size=16, num_layers=4, mlp_ratio=2.0, cross_attention_dim=16, cross_attention_dim_t5=16,
        pooled_projection_dim=8, text_len=TXT_TOKENS, text_len_t5=5,
    ),
    _hunyuandit_inputs,
    ("blocks",),
    note="no-op .float() of the long skip and temb in each block (capture drops them; they looked carried)",
)


# Lumina-Next: 4 blocks. Latent (1, 4, 8, 8), patch 2; complex 2D rope table (8x8 grid, sliced to
# 4x4 inside). Timestep in [0, 1] with 0 = noise (the pipeline passes 1 - t / 1000).
def _lumina_next_inputs(step: int, t: float) -> dict:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    mask = torch.ones(1, TXT_TOKENS, dtype=torch.long)
    mask[:, -2:] = 0
    return dict(
        hidden_states=_latent(33, 1, 4, 8, 8, step=step),
        timestep=_ts(1.0 - t),
        encoder_hidden_states=_text(33, 1, TXT_TOKENS, 8),
        encoder_mask=mask,
        image_rotary_emb=get_2d_rotary_pos_embed_lumina(16, 8, 8),
        cross_attention_kwargs={},  # the block unpacks it with ** (the pipeline passes a dict)
    )


_register(
    "lumina_next",
    "LuminaNextDiT2DModel",
    dict(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=4, num_attention_heads=2,
        num_kv_heads=1, multiple_of=2, cross_attention_dim=8,
    ),
    _lumina_next_inputs,
    ("layers",),
    init=_redraw("pad_token"),  # torch.empty (and unused by forward)
)


# Transformer2DModel, continuous patched input in PixArt's config (adaLN-single): 4 blocks.
# Latent (1, 4, 8, 8), patch 2. Timestep [0, 1000].
def _transformer_2d_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(34, 1, 4, 8, 8, step=step),
        encoder_hidden_states=_text(34, 1, TXT_TOKENS, 32),
        timestep=_ts(1000.0 * t),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


_register(
    "transformer_2d",
    "Transformer2DModel",
    dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=32,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False,
    ),
    _transformer_2d_inputs,
    ("transformer_blocks",),
)


# Bria 3.x: FLUX-like without pooled/guidance embeddings, 2 double + 2 single blocks. Packed latents
# (1, 16, C); timestep [0, 1000] (no scaling inside).
def _bria_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(35, 1, IMG_TOKENS, 16, step=step),
        encoder_hidden_states=_text(35, 1, TXT_TOKENS, 32),
        timestep=_ts(1000.0 * t),
        img_ids=_img_ids_2d(4, 4),
        txt_ids=torch.zeros(TXT_TOKENS, 3),
    )


_register(
    "bria",
    "BriaTransformer2DModel",
    dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
    ),
    _bria_inputs,
    ("transformer_blocks", "single_transformer_blocks"),
)

# Bria FIBO: FLUX-like, 2 double + 2 single blocks; before every block the text stream's second half
# is replaced by that block's own projected text-encoder layer (`text_encoder_layers`, one per block).
# Packed latents (1, 16, C); timestep [0, 1000].
def _bria_fibo_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(36, 1, IMG_TOKENS, 16, step=step),
        encoder_hidden_states=_text(36, 1, TXT_TOKENS, 32),
        text_encoder_layers=[_text(37 + i, 1, TXT_TOKENS, 16) for i in range(4)],
        timestep=_ts(1000.0 * t),
        img_ids=_img_ids_2d(4, 4),
        txt_ids=torch.zeros(TXT_TOKENS, 3),
        joint_attention_kwargs={},  # the single block unpacks it with ** (the pipeline passes a dict)
    )


_register(
    "bria_fibo",
    "BriaFiboTransformer2DModel",
    dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8), text_encoder_dim=16,
    ),
    _bria_fibo_inputs,
    ("transformer_blocks", "single_transformer_blocks"),
    note="caption_projection: 4 Linears, more list entries than either block list (the chain holds more nodes)",
)


# Bria FIBO 2: noise_refiner (prologue), a Perceiver turns the first text bundle into 4 gist tokens,
# then 4 single-stream blocks `layers` (layer 1 also cross-attends to the second bundle). Latent
# (1, 4, 8, 8), patch 2; t in [0, 1] (t_scale 1000 inside). No text mask (the pipeline drops an
# all-ones mask); with a padded one the gist count comes from `.tolist()` (bria_fibo2_mask below).
# Rope tables are built lazily: build() runs one eager forward first.
def _bria_fibo2_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(41, 1, 4, 8, 8, step=step),
        timestep=_ts(t),
        encoder_hidden_states=_text(41, 1, 2, TXT_TOKENS, 16),
    )


_BRIA_FIBO2_CONFIG = dict(
    in_channels=4, patch_size=2, dim=32, n_layers=4, n_refiner_layers=1, n_heads=2, cap_feat_dim=16,
    injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=4,
    gist_step=4, gist_min_text_len=1, gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(16, 8, 8),
)
_register(
    "bria_fibo2",
    "BriaFibo2Transformer2DModel",
    _BRIA_FIBO2_CONFIG,
    _bria_fibo2_inputs,
    ("layers",),
    warmup=True,
)


# CogView3-Plus: 4 blocks (image and text streams). Latent (1, 4, 8, 8), patch 2; SDXL-style size
# conditioning. Timestep [0, 1000].
def _cogview_size_inputs() -> dict:
    return dict(
        original_size=torch.tensor([[64.0, 64.0]]),
        target_size=torch.tensor([[64.0, 64.0]]),
        crop_coords=torch.tensor([[0.0, 0.0]]),
    )


def _cogview3plus_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(42, 1, 4, 8, 8, step=step),
        encoder_hidden_states=_text(42, 1, TXT_TOKENS, 16),
        timestep=_ts(1000.0 * t),
        **_cogview_size_inputs(),
    )


_register(
    "cogview3plus",
    "CogView3PlusTransformer2DModel",
    dict(
        patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
        out_channels=4, text_embed_dim=16, time_embed_dim=16, condition_dim=8, pos_embed_max_size=8,
        sample_size=8,
    ),
    _cogview3plus_inputs,
    ("transformer_blocks",),
)


# CogView4: 4 blocks (image and text streams), rope built inside. Latent (1, 4, 8, 8), patch 2.
# Timestep [0, 1000].
def _cogview4_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(43, 1, 4, 8, 8, step=step),
        encoder_hidden_states=_text(43, 1, TXT_TOKENS, 16),
        timestep=_ts(1000.0 * t),
        **_cogview_size_inputs(),
    )


_register(
    "cogview4",
    "CogView4Transformer2DModel",
    dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
        num_attention_heads=2, text_embed_dim=16, time_embed_dim=16, condition_dim=8,
        pos_embed_max_size=8, sample_size=8, rope_axes_dim=(8, 8),
    ),
    _cogview4_inputs,
    ("transformer_blocks",),
)


# ERNIE-Image: 4 shared-adaLN blocks on a sequence-first stream (S, B, D) of image then text tokens.
# Latent (1, 4, 8, 8), patch 2; 7 text tokens of which 5 are real (text_lens). Timestep [0, 1000].
# adaLN_modulation and final_linear are zero-initialized: redrawn so that the output is not zero.
def _ernie_image_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(44, 1, 4, 8, 8, step=step),
        timestep=_ts(1000.0 * t),
        text_bth=_text(44, 1, TXT_TOKENS, 16),
        text_lens=torch.tensor([5]),
    )


_register(
    "ernie_image",
    "ErnieImageTransformer2DModel",
    dict(
        hidden_size=32, num_attention_heads=2, num_layers=4, ffn_hidden_size=64, in_channels=4,
        out_channels=4, patch_size=2, text_in_dim=16, rope_axes_dim=(4, 6, 6),
    ),
    _ernie_image_inputs,
    ("layers",),
    init=_redraw_zero_init,
    note="(S, B, D) modulation tensors through no-op .float() in each block (looked carried, hidden-sized)",
)


# FLUX.3: text-only `txt_mode_blocks` (at timestep 0: they never see the latent) and image-only
# `mode_blocks.image` (per-modality refiners, as ZImage's: prologue), then 4 joint
# `single_transformer_blocks`. Packed latents (1, 16, C), ids (S, 4); t in [0, 1] (the model
# multiplies by 1000).
def _flux3_inputs(step: int, t: float) -> dict:
    txt_ids = torch.zeros(TXT_TOKENS, 4)
    txt_ids[:, 3] = torch.arange(TXT_TOKENS)
    return dict(
        hidden_states=_latent(45, 1, IMG_TOKENS, 16, step=step),
        encoder_hidden_states=_text(45, 1, TXT_TOKENS, 32),
        timestep=_ts(t),
        img_ids=_flux2_ids_img()[0],
        txt_ids=txt_ids,
    )


_register(
    "flux3",
    "Flux3Transformer2DModel",
    dict(
        in_channels=16, cond_in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_channels=32, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
    ),
    _flux3_inputs,
    ("single_transformer_blocks",),
    note="mode_blocks.image stay in the prologue: chain.py's _feeds refuses them (text comes from txt_mode_blocks)",
)


# GLM-Image: 4 blocks (image and text streams), rope built inside; the image tokens add an embedding
# of the AR prior's token ids (one per image token). Latent (1, 4, 8, 8), patch 2. Timestep [0, 1000].
def _glm_image_inputs(step: int, t: float) -> dict:
    prior = torch.arange(IMG_TOKENS).remainder(32)[None]
    return dict(
        hidden_states=_latent(46, 1, 4, 8, 8, step=step),
        encoder_hidden_states=_text(46, 1, TXT_TOKENS, 16),
        prior_token_id=prior,
        prior_token_drop=torch.zeros_like(prior, dtype=torch.bool),
        timestep=_ts(1000.0 * t),
        target_size=torch.tensor([[64.0, 64.0]]),
        crop_coords=torch.tensor([[0.0, 0.0]]),
    )


_register(
    "glm_image",
    "GlmImageTransformer2DModel",
    dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
        num_attention_heads=2, text_embed_dim=16, time_embed_dim=16, condition_dim=8,
        prior_vq_quantizer_codebook_size=32,
    ),
    _glm_image_inputs,
    ("transformer_blocks",),
)

# ---- survey b

# Ideogram 4: one packed [left-pad][text][image] sequence of 1 + 6 + 16 tokens, 4 single-stream blocks
# `layers`. Per-token indicator (0 pad, 3 text, 2 image), segment ids (-1 pad) and 3-axis MRoPE ids
# (image ids offset by 65536). t in [0, 1].
def _ideogram4_inputs(step: int, t: float) -> dict:
    n = 1 + TXT_TOKENS - 1 + IMG_TOKENS
    indicator = torch.full((1, n), 2, dtype=torch.long)
    indicator[:, 0] = 0
    indicator[:, 1:TXT_TOKENS] = 3
    segment_ids = torch.ones(1, n, dtype=torch.long)
    segment_ids[:, 0] = -1
    position_ids = torch.zeros(1, n, 3, dtype=torch.long)
    position_ids[0, 1:TXT_TOKENS] = torch.arange(TXT_TOKENS - 1)[:, None]
    position_ids[0, TXT_TOKENS:] = 65536 + _img_ids_2d(4, 4).long()
    return dict(
        hidden_states=_latent(30, 1, n, 16, step=step),
        timestep=_ts(t),
        encoder_hidden_states=_text(30, 1, n, 8),
        position_ids=position_ids,
        segment_ids=segment_ids,
        indicator=indicator,
    )


_register(
    "ideogram4",
    "Ideogram4Transformer2DModel",
    dict(
        in_channels=16, num_layers=4, attention_head_dim=16, num_attention_heads=2, intermediate_size=32,
        adaln_dim=16, llm_features_dim=8, rope_theta=10000, mrope_section=(4, 2, 2),
    ),
    _ideogram4_inputs,
    ("layers",),
)


# Krea 2: text fusion (layer-wise + refiner blocks, prologue) then 4 single-stream blocks over
# [text, image]. Text is a stack of 3 tapped encoder layers per token; rope ids (7 + 16, 3) with zero
# text rows. t in [0, 1] (the embedding scales by 1000).
def _krea2_inputs(step: int, t: float) -> dict:
    mask = torch.ones(1, TXT_TOKENS, dtype=torch.bool)
    mask[:, -2:] = False
    return dict(
        hidden_states=_latent(31, 1, IMG_TOKENS, 16, step=step),
        encoder_hidden_states=_text(31, 1, TXT_TOKENS, 3, 16),
        timestep=_ts(t),
        position_ids=torch.cat([torch.zeros(TXT_TOKENS, 3), _img_ids_2d(4, 4)]),
        encoder_attention_mask=mask,
    )


_register(
    "krea2",
    "Krea2Transformer2DModel",
    dict(
        in_channels=16, num_layers=4, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, timestep_embed_dim=32, text_hidden_dim=16, num_text_layers=3,
        text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6),
    ),
    _krea2_inputs,
    ("transformer_blocks",),
    note="text_fusion lists refine the text before it meets the patchified image: a refiner, not the chain",
)


# LongCat-Image: FLUX-like, 2 double + 2 single blocks, no pooled/guidance embedding. t in [0, 1].
# Ovis-Image has the same interface (its text goes through an RMSNorm first).
def _flux_like_inputs(seed: int):
    def inputs(step: int, t: float) -> dict:
        return dict(
            hidden_states=_latent(seed, 1, IMG_TOKENS, 16, step=step),
            encoder_hidden_states=_text(seed, 1, TXT_TOKENS, 32),
            timestep=_ts(t),
            img_ids=_img_ids_2d(4, 4),
            txt_ids=torch.zeros(TXT_TOKENS, 3),
        )

    return inputs


_FLUX_LIKE = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
)
_register(
    "longcat_image",
    "LongCatImageTransformer2DModel",
    dict(_FLUX_LIKE, pooled_projection_dim=32),
    _flux_like_inputs(32),
    ("transformer_blocks", "single_transformer_blocks"),
)
_register(
    "ovis_image",
    "OvisImageTransformer2DModel",
    dict(_FLUX_LIKE, out_channels=16),
    _flux_like_inputs(33),
    ("transformer_blocks", "single_transformer_blocks"),
)


# Nucleus-MoE-Image: 4 single-stream blocks cross-attending to text; blocks 1..3 are expert-choice MoE
# (4 experts, looped expert path). Packed latents (1, 16, C), img_shapes [(1, 4, 4)]. t in [0, 1].
def _nucleusmoe_inputs(step: int, t: float) -> dict:
    mask = torch.ones(1, TXT_TOKENS, dtype=torch.long)
    mask[:, -2:] = 0
    return dict(
        hidden_states=_latent(34, 1, IMG_TOKENS, 16, step=step),
        img_shapes=[(1, 4, 4)],
        encoder_hidden_states=_text(34, 1, TXT_TOKENS, 16),
        encoder_hidden_states_mask=mask,
        timestep=_ts(t),
    )


_register(
    "nucleusmoe_image",
    "NucleusMoEImageTransformer2DModel",
    dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=16,
        num_attention_heads=2, num_key_value_heads=1, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
        mlp_ratio=6.0, dense_moe_strategy="leave_first_block_dense", num_experts=4,
        moe_intermediate_dim=16, capacity_factors=2.0,
    ),
    _nucleusmoe_inputs,
    ("transformer_blocks",),
    init=_redraw(".experts."),  # torch.empty experts (filled by checkpoint loading)
    warmup=True,
    note="its rope table is built on the first eager call (export of a fresh model fails in view_as_complex)",
)


# OmniGen: one sequence [text tokens, time token, image], 4 Phi-3 style blocks `layers`. Latent
# (1, 4, 8, 8), patch 2; text as token ids; mask causal except the image block (as the pipeline's).
def _omnigen_inputs(step: int, t: float) -> dict:
    n = TXT_TOKENS + 1 + IMG_TOKENS
    mask = torch.tril(torch.ones(1, n, n))
    mask[:, -IMG_TOKENS:, -IMG_TOKENS:] = 1
    return dict(
        hidden_states=_latent(35, 1, 4, 8, 8, step=step),
        timestep=_ts(t),
        input_ids=torch.arange(1, TXT_TOKENS + 1)[None],
        input_img_latents=[],
        input_image_sizes={},
        attention_mask=mask,
        position_ids=torch.arange(n)[None],
    )


_register(
    "omnigen",
    "OmniGenTransformer2DModel",
    dict(
        in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, num_layers=4, pad_token_id=0, vocab_size=64,
        rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.0] * 8}, pos_embed_max_size=8,
        time_step_dim=32,
    ),
    _omnigen_inputs,
    ("layers",),
    capturable=False,
    note="rope: `if torch.max(position_ids) + 1 > original_max_position_embeddings` (data-dependent Python)",
)


# PRX: 4 blocks (image queries, image + text keys). Latent (1, 4, 8, 8), patch 2. t in [0, 1].
# 4 heads, not 2: with 2 the rope table (1, 1, 16, 8, 2, 2) has as many elements as the hidden stream
# (1, 16, 32), and the no-op `.to` each block applies to it makes it look carried (see note).
def _prx_inputs(step: int, t: float) -> dict:
    mask = torch.ones(1, TXT_TOKENS, dtype=torch.bool)
    mask[:, -2:] = False
    return dict(
        hidden_states=_latent(36, 1, 4, 8, 8, step=step),
        timestep=_ts(t),
        encoder_hidden_states=_text(36, 1, TXT_TOKENS, 16),
        attention_mask=mask,
    )


_register(
    "prx",
    "PRXTransformer2DModel",
    dict(
        in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32, mlp_ratio=2.0, num_heads=4,
        depth=4, axes_dim=[4, 4],
    ),
    _prx_inputs,
    ("blocks",),
    init=_redraw_zero_init,  # adaLN-zero modulation: every block the identity
    note="no-op .to(device, dtype) of the rope table and text mask in each block is captured as an alias node "
    "that the next block reads: both look carried (zero residual)",
)


# Qwen-Image 2.1: one block-causal [text, image] sequence, 4 blocks. img_mask marks the VLM slots of
# the target image (each stands for 2x2 latent tokens): 7 text + 4 slots. t in [0, 1].
def _qwenimage21_inputs(step: int, t: float) -> dict:
    img_mask = torch.zeros(1, TXT_TOKENS + IMG_TOKENS // 4, dtype=torch.bool)
    img_mask[:, TXT_TOKENS:] = True
    return dict(
        hidden_states=_latent(37, 1, IMG_TOKENS, 16, step=step),
        encoder_hidden_states=_text(37, 1, TXT_TOKENS, 16),
        timestep=_ts(t),
        img_shapes=[[(1, 4, 4)]],
        img_mask=img_mask,
    )


_register(
    "qwenimage21",
    "QwenImage21Transformer2DModel",
    dict(
        patch_size=1, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=16,
        num_attention_heads=2, context_in_dim=16, mlp_ratio=2, axes_dims_rope=(8, 4, 4),
    ),
    _qwenimage21_inputs,
    ("transformer_blocks",),
    capturable=False,
    note="rope: image_pad_mask.tolist() after a tensor-repeats repeat_interleave (data-dependent Python)",
)


# Stable Audio: 4 DiT blocks over [global token, audio]. Latent (1, 4, 16); rope tables are an input
# (built as the pipeline does, for 1 + 16 positions). t in [0, 1].
def _stable_audio_inputs(step: int, t: float) -> dict:
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    return dict(
        hidden_states=_latent(38, 1, 4, IMG_TOKENS, step=step),
        timestep=_ts(t),
        encoder_hidden_states=_text(38, 1, TXT_TOKENS, 8),
        global_hidden_states=_text(39, 1, 1, 8),
        rotary_embedding=get_1d_rotary_pos_embed(4, IMG_TOKENS + 1, use_real=True, repeat_interleave_real=False),
    )


_register(
    "stable_audio",
    "StableAudioDiTModel",
    dict(
        sample_size=IMG_TOKENS, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
        num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16, time_proj_dim=16,
        global_states_input_dim=8, cross_attention_input_dim=8,
    ),
    _stable_audio_inputs,
    ("transformer_blocks",),
)


# Stable Audio 3: 2 memory tokens prepended to the audio, 4 differential-attention DiT blocks. Latent
# (1, 4, 16). t in [0, 1].
def _stable_audio3_inputs(step: int, t: float) -> dict:
    mask = torch.ones(1, TXT_TOKENS, dtype=torch.bool)
    mask[:, -2:] = False
    return dict(
        hidden_states=_latent(40, 1, 4, IMG_TOKENS, step=step),
        timestep=_ts(t),
        encoder_hidden_states=_text(40, 1, TXT_TOKENS, 8),
        global_hidden_states=_text(41, 1, 8),
        encoder_attention_mask=mask,
    )


_register(
    "stable_audio3",
    "StableAudio3DiTModel",
    dict(
        io_channels=4, embed_dim=32, depth=4, num_heads=2, cond_token_dim=8, global_cond_dim=8,
        local_add_cond_dim=4, timestep_features_dim=16, ff_mult=2.0, num_memory_tokens=2,
    ),
    _stable_audio3_inputs,
    ("transformer_blocks",),
)


# ACE-Step 1.5: 4 blocks `layers` (sliding-window / full attention alternating, cross-attention to the
# condition). Latent (1, 32, 8) + context latents (1, 32, 8), patch 2 -> 16 tokens. t = r in [0, 1].
def _ace_step_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(42, 1, 2 * IMG_TOKENS, 8, step=step),
        timestep=_ts(t),
        timestep_r=_ts(t),
        encoder_hidden_states=_text(42, 1, TXT_TOKENS, 16),
        context_latents=_randn(43, 1, 2 * IMG_TOKENS, 8),
    )


_register(
    "ace_step",
    "AceStepTransformer1DModel",
    dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, in_channels=16, audio_acoustic_hidden_dim=8, patch_size=2,
        sliding_window=4, encoder_hidden_size=16,
    ),
    _ace_step_inputs,
    ("layers",),
    note="carries a transposed stream (Conv1d then .transpose(1, 2)): the cond returns it in that memory order",
)


# ---- survey c

# ConsisID: CogVideoX-like, 4 blocks, with its identity branch on (is_train_face): a local facial
# extractor (prologue) and `perceiver_cross_attention` added into the image stream after blocks 0 and 2.
# Latent (1, F, C, H, W) = (1, 1, 4, 8, 8), patch 2. Timestep [0, 1000].
def _consisid_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(30, 1, 1, 4, 8, 8, step=step),
        encoder_hidden_states=_text(30, 1, TXT_TOKENS, 16),
        timestep=_ts(1000.0 * t),
        id_cond=_text(31, 1, 8),
        id_vit_hidden=[_text(32, 1, 5, 8), _text(33, 1, 5, 8)],
    )


_register(
    "consisid",
    "ConsisIDTransformer3DModel",
    dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=4, sample_width=8, sample_height=8, sample_frames=1, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=TXT_TOKENS, is_train_face=True, cross_attn_interval=2,
        cross_attn_dim_head=4, cross_attn_num_heads=2, LFE_id_dim=8, LFE_vit_dim=8, LFE_depth=2, LFE_dim_head=4,
        LFE_num_heads=2, LFE_num_id_token=2, LFE_num_querie=4, LFE_output_dim=10, LFE_ff_mult=2, LFE_num_scale=2,
    ),
    _consisid_inputs,
    ("transformer_blocks",),
    note="perceiver cross-attention after blocks 0 and 2: code after the middle's last block runs with Bn",
)


# Latte: spatial block i then temporal block i, interleaved (zip of `transformer_blocks` and
# `temporal_transformer_blocks`), 2 + 2 blocks. Latent (1, C, F, H, W) = (1, 4, 2, 8, 8): 2 frames of 16
# tokens (patch 2). Timestep [0, 1000].
def _latte_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(34, 1, 4, 2, 8, 8, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(34, 1, TXT_TOKENS, 16),
    )


_register(
    "latte",
    "LatteTransformer3DModel",
    dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=16, video_length=2,
    ),
    _latte_inputs,
    ("transformer_blocks", "temporal_transformer_blocks"),
    note="spatial and temporal lists interleave (s0 t0 s1 t1), the stream reshaped between them",
)


# Allegro: 4 blocks. Latent (1, 4, 1, 8, 8), patch 2; the pipeline's 3D rope tables are inputs.
# Timestep [0, 1000].
def _allegro_rope():
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    ft, fh, fw, gt, gh, gw = get_3d_rotary_pos_embed_allegro(
        embed_dim=12, crops_coords=((0, 0), (4, 4)), grid_size=(4, 4), temporal_size=1,
        interpolation_scale=(2.2, 2.0, 2.0),
    )  # fmt: skip
    pos = torch.cartesian_prod(gt.long(), gh.long(), gw.long()).reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1)
    return (ft, fh, fw), tuple(pos)


def _allegro_inputs(step: int, t: float) -> dict:
    mask = torch.ones(1, TXT_TOKENS, dtype=torch.long)
    mask[:, -2:] = 0
    return dict(
        hidden_states=_latent(35, 1, 4, 1, 8, 8, step=step),
        encoder_hidden_states=_text(35, 1, TXT_TOKENS, 16),
        timestep=_ts(1000.0 * t),
        encoder_attention_mask=mask,
        image_rotary_emb=_allegro_rope(),
    )


_register(
    "allegro",
    "AllegroTransformer3DModel",
    dict(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        num_layers=4, cross_attention_dim=24, sample_height=8, sample_width=8, sample_frames=1,
        caption_channels=16,
    ),
    _allegro_inputs,
    ("transformer_blocks",),
)


# AnyFlow (bidirectional): Wan backbone, 4 blocks, dual timestep (t, r) per frame.
# Latent (1, F, C, H, W) = (1, 1, 4, 8, 8), patch (1, 2, 2). Timesteps [0, 1000], shape (B, F).
def _anyflow_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(36, 1, 1, 4, 8, 8, step=step),
        timestep=torch.tensor([[1000.0 * t]]),
        r_timestep=torch.tensor([[1000.0 * max(t - 0.1, 0.0)]]),
        encoder_hidden_states=_text(36, 1, TXT_TOKENS, 16),
    )


_ANYFLOW_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=32, ffn_dim=32, num_layers=4, rope_max_seq_len=32,
)
_register(
    "anyflow",
    "AnyFlowTransformer3DModel",
    _ANYFLOW_CONFIG,
    _anyflow_inputs,
    ("blocks",),
    note="no-op temb.float() in each block (capture drops it; the per-token projection looked carried)",
)


# AnyFlow-FAR (causal, chunk-wise): the denoising step of the 4th chunk of chunk_partition [1, 1, 1, 1]
# (3 chunks cached: 1 compressed + 2 full, the KV cache a seeded input), 4 blocks. The pipeline's
# inference path: kv_cache given, kv_cache_flag["is_cache_step"] False; returns (sample, kv_cache).
def _anyflow_far_inputs(step: int, t: float) -> dict:
    kv = {
        i: {"full_cache": _randn(40 + i, 2, 1, 2, 48, 12), "compressed_cache": _randn(50 + i, 2, 1, 2, 8, 12)}
        for i in range(4)
    }
    return dict(
        hidden_states=_latent(37, 1, 1, 4, 8, 8, step=step),
        timestep=torch.tensor([[1000.0 * t]]),
        r_timestep=torch.tensor([[1000.0 * max(t - 0.1, 0.0)]]),
        encoder_hidden_states=_text(37, 1, TXT_TOKENS, 16),
        chunk_partition=[1, 1, 1, 1],
        kv_cache=kv,
        kv_cache_flag={"num_cached_chunks": 3, "is_cache_step": False},
    )


_register(
    "anyflow_far",
    "AnyFlowFARTransformer3DModel",
    dict(_ANYFLOW_CONFIG, compressed_patch_size=(1, 4, 4), full_chunk_limit=3, chunk_partition=(1, 1, 1, 1)),
    _anyflow_far_inputs,
    ("blocks",),
    note="no-op temb.float() in each block (capture drops it; the per-token projection looked carried)",
)


# ChronoEdit: Wan I2V backbone, 4 blocks, image embeddings concatenated before the text. Two latent
# frames (input image, edited image; the rope's temporal-skip path): (1, 4, 2, 4, 8) -> 16 tokens.
def _chronoedit_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(38, 1, 4, 2, 4, 8, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(38, 1, TXT_TOKENS, 16),
        encoder_hidden_states_image=_text(39, 1, 4, 8),
    )


_register(
    "chronoedit",
    "ChronoEditTransformer3DModel",
    dict(_WAN_CONFIG, image_dim=8, rope_temporal_skip_len=8),
    _chronoedit_inputs,
    ("blocks",),
)


# Cosmos3 (omni): a packed joint sequence, 7 text (understanding, causal) tokens then 16 vision
# (generation) tokens; 4 MoT decoder layers carry both pathways. Vision latent (1, 4, 1, 8, 8),
# patch 2. Per-patch timesteps [0, 1000] (scaled by timestep_scale inside).
def _cosmos3_inputs(step: int, t: float) -> dict:
    n = TXT_TOKENS + IMG_TOKENS
    pos = torch.zeros(3, n, dtype=torch.long)
    pos[:, :TXT_TOKENS] = torch.arange(TXT_TOKENS)
    pos[0, TXT_TOKENS:] = TXT_TOKENS
    pos[1, TXT_TOKENS:] = TXT_TOKENS + torch.arange(4).repeat_interleave(4)
    pos[2, TXT_TOKENS:] = TXT_TOKENS + torch.arange(4).repeat(4)
    vision = torch.arange(TXT_TOKENS, n)
    return dict(
        input_ids=(torch.arange(TXT_TOKENS) * 3) % 32,
        text_indexes=torch.arange(TXT_TOKENS),
        position_ids=pos,
        und_len=TXT_TOKENS,
        sequence_length=n,
        vision_tokens=[_latent(40, 1, 4, 1, 8, 8, step=step)],
        vision_token_shapes=[(1, 4, 4)],
        vision_sequence_indexes=vision,
        vision_mse_loss_indexes=vision,
        vision_timesteps=torch.full((IMG_TOKENS,), 1000.0 * t),
        vision_noisy_frame_indexes=[torch.tensor([0])],
    )


_register(
    "cosmos3",
    "Cosmos3OmniTransformer",
    dict(
        dtype="float32", head_dim=16, hidden_size=32, intermediate_size=32, latent_channel=4,
        latent_patch_size=2, num_attention_heads=2, num_hidden_layers=4, num_key_value_heads=1,
        patch_latent_dim=16, vocab_size=32, rope_axes_dim=(4, 2, 2), rope_theta=10000.0,
    ),
    _cosmos3_inputs,
    ("layers",),
)


# EasyAnimate: 4 MMDiT blocks (text and image streams). Latent (1, 4, 1, 8, 8), patch 2. Timestep [0, 1000].
def _easyanimate_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(41, 1, 4, 1, 8, 8, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(41, 1, TXT_TOKENS, 16),
    )


_register(
    "easyanimate",
    "EasyAnimateTransformer3DModel",
    dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2,
        sample_width=8, sample_height=8, num_layers=4, mmdit_layers=4, time_embed_dim=8, text_embed_dim=16,
    ),
    _easyanimate_inputs,
    ("transformer_blocks",),
)


# Helios: Wan-like, 4 blocks; short / mid / long history latents are patchified (1, 1/2, 1/4 scale) and
# put before the 16 noisy tokens (history tokens get timestep 0). Latent (1, 4, 1, 8, 8). Timestep [0, 1000].
def _helios_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(42, 1, 4, 1, 8, 8, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(42, 1, TXT_TOKENS, 16),
        indices_hidden_states=torch.tensor([[7]]),
        indices_latents_history_short=torch.tensor([[6]]),
        indices_latents_history_mid=torch.tensor([[4, 5]]),
        indices_latents_history_long=torch.tensor([[0, 1, 2, 3]]),
        latents_history_short=_randn(43, 1, 4, 1, 8, 8),
        latents_history_mid=_randn(44, 1, 4, 2, 8, 8),
        latents_history_long=_randn(45, 1, 4, 4, 8, 8),
    )


_register(
    "helios",
    "HeliosTransformer3DModel",
    dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=4, rope_dim=(4, 4, 4),
    ),
    _helios_inputs,
    ("blocks",),
    note="no-op temb.float() in each block (capture drops it; the per-token projection looked carried)",
)


# HunyuanVideo 1.5: token refiner (prologue) then 4 double-stream blocks; text, ByT5 glyph text and image
# (SigLIP) tokens are reordered valid-first. Latent (1, 4 + 4 + 1, 1, 4, 4), patch 1. Timestep [0, 1000].
def _hyv15_inputs(step: int, t: float) -> dict:
    mask = torch.ones(1, TXT_TOKENS, dtype=torch.long)
    mask[:, -2:] = 0
    mask_2 = torch.ones(1, 5, dtype=torch.long)
    mask_2[:, -1:] = 0
    return dict(
        hidden_states=_latent(46, 1, 9, 1, 4, 4, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(46, 1, TXT_TOKENS, 16),
        encoder_attention_mask=mask,
        encoder_hidden_states_2=_text(47, 1, 5, 8),
        encoder_attention_mask_2=mask_2,
        image_embeds=_text(48, 1, 4, 8),
    )


_register(
    "hunyuanvideo15",
    "HunyuanVideo15Transformer3DModel",
    dict(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=4,
        num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(2, 2, 4),
    ),
    _hyv15_inputs,
    ("transformer_blocks",),
    capturable=False,
    note="`if torch.all(image_embeds == 0)` (is_t2v) in forward, then boolean-mask indexing (data-dependent Python)",
)


# JoyImage-Edit: 4 double-stream blocks; multi-item input (1, items, C, F, H, W) = (1, 2, 4, 1, 4, 4):
# reference image and target, 8 tokens each with patch (1, 2, 2). Timestep [0, 1000].
def _joyimage_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(49, 1, 2, 4, 1, 4, 8, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(49, 1, TXT_TOKENS, 16),
    )


_register(
    "joyimage",
    "JoyImageEditTransformer3DModel",
    dict(
        patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=16,
        mlp_width_ratio=2.0, num_layers=4, rope_dim_list=[4, 6, 6],
    ),
    _joyimage_inputs,
    ("double_blocks",),
)


_register(
    "joyimage_mrope",
    "JoyImageEditTransformer3DModel",
    dict(
        patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=16,
        mlp_width_ratio=2.0, num_layers=4, rope_dim_list=[4, 6, 6], rope_type="mrope",
    ),
    _joyimage_inputs,
    ("double_blocks",),
    note="mrope: the text positions start after `grid.max().item()`, which export traces (a value, not a shape)",
)


# JoyImage-Edit-Plus: 4 double-stream blocks over pre-patchified padded input (1, 16, C, 1, 2, 2): target
# (1, 2, 4) = 8 patches, one reference (1, 2, 2) = 4 patches, 4 padding patches; text mask with 2 padding
# tokens. Timestep [0, 1000].
def _joyimage_plus_inputs(step: int, t: float) -> dict:
    mask = torch.ones(1, TXT_TOKENS, dtype=torch.long)
    mask[:, -2:] = 0
    return dict(
        hidden_states=_latent(50, 1, IMG_TOKENS, 4, 1, 2, 2, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(50, 1, TXT_TOKENS, 16),
        encoder_hidden_states_mask=mask,
        shape_list=[[(1, 2, 4), (1, 2, 2)]],
    )


_register(
    "joyimage_plus",
    "JoyImageEditPlusTransformer3DModel",
    dict(
        patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=16,
        mlp_width_ratio=2.0, num_layers=4, rope_dim_list=[4, 6, 6],
    ),
    _joyimage_plus_inputs,
    ("double_blocks",),
)


# ---- survey d

# HunyuanVideo-Framepack: token refiner (prologue) then 2 double + 2 single blocks. Latent (1, 4, 1, 8, 8),
# patch 2 -> 16 tokens; the clean / 2x / 4x history latents are prepended (16 + 4 + 1 tokens) and cut off
# before the output projection. The forward needs every history input (it reads their ropes unconditionally).
# Timestep and guidance in [0, 1000].
def _framepack_inputs(step: int, t: float) -> dict:
    mask = torch.ones(1, TXT_TOKENS, dtype=torch.long)
    mask[:, -2:] = 0
    return dict(
        hidden_states=_latent(30, 1, 4, 1, 8, 8, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(30, 1, TXT_TOKENS, 16),
        encoder_attention_mask=mask,
        pooled_projections=_text(31, 1, 8),
        image_embeds=_text(32, 1, 2, 8),
        indices_latents=torch.tensor([7]),
        guidance=_ts(3500.0),
        latents_clean=_randn(33, 1, 4, 1, 8, 8),
        indices_latents_clean=torch.tensor([0]),
        latents_history_2x=_randn(34, 1, 4, 2, 8, 8),
        indices_latents_history_2x=torch.tensor([1, 2]),
        latents_history_4x=_randn(35, 1, 4, 4, 8, 8),
        indices_latents_history_4x=torch.tensor([3, 4, 5, 6]),
    )


_register(
    "hunyuanvideo_framepack",
    "HunyuanVideoFramepackTransformer3DModel",
    dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 4, 8), has_image_proj=True,
        image_proj_dim=8, has_clean_x_embedder=True,
    ),
    _framepack_inputs,
    ("transformer_blocks", "single_transformer_blocks"),
    note="the text is cut to a data-dependent length, so in the graph block outputs have lengths (unbacked) "
    "that match no block input: cached block by block in eager Python",
)


# LTX-2: 4 audio-video blocks carrying a video stream (16 tokens) and an audio stream (8 tokens). Packed
# video latent (1, 16, 4) with num_frames=1, height=width=4; timestep in [0, 1000] (already scaled).
def _ltx2_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(36, 1, IMG_TOKENS, 4, step=step),
        audio_hidden_states=_randn(37, 1, 8, 4),  # fixed: only the video latent drifts
        encoder_hidden_states=_text(36, 1, TXT_TOKENS, 16),
        audio_encoder_hidden_states=_text(37, 1, TXT_TOKENS, 16),
        timestep=_ts(1000.0 * t),
        encoder_attention_mask=torch.ones(1, TXT_TOKENS, dtype=torch.long),
        audio_encoder_attention_mask=torch.ones(1, TXT_TOKENS, dtype=torch.long),
        num_frames=1,
        height=4,
        width=4,
        audio_num_frames=8,
    )


_LTX2_CONFIG = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
    audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8,
    audio_cross_attention_dim=16, num_layers=4, caption_channels=16,
)
_register("ltx2", "LTX2VideoTransformer3DModel", _LTX2_CONFIG, _ltx2_inputs, ("transformer_blocks",))


# MiniMax-H3: token refiner (prologue) then 4 blocks over one packed sequence of 7 text + 16 video + 4 audio
# rows (text first). One timestep value in [0, 1] (unscaled), every row pointing at it.
_MINIMAX_ROWS = TXT_TOKENS + IMG_TOKENS + 4


def _minimax_inputs(step: int, t: float) -> dict:
    tags = torch.tensor([1] * TXT_TOKENS + [0] * IMG_TOKENS + [2] * 4)
    pos = torch.zeros(_MINIMAX_ROWS, 3, dtype=torch.long)
    pos[:TXT_TOKENS, 0] = torch.arange(TXT_TOKENS)
    pos[TXT_TOKENS : TXT_TOKENS + IMG_TOKENS, 1:] = _img_ids_2d(4, 4)[:, 1:].long()
    pos[TXT_TOKENS + IMG_TOKENS :, 0] = torch.arange(4)
    return dict(
        hidden_states=_latent(38, 1, IMG_TOKENS, 16, step=step),
        audio_hidden_states=_randn(39, 1, 4, 8),  # fixed: only the video latent drifts
        encoder_hidden_states=_text(38, 1, TXT_TOKENS, 16),
        timestep=_ts(t),
        timestep_indices=torch.zeros(_MINIMAX_ROWS, dtype=torch.long),
        token_tags=tags,
        position_ids=pos,
        video_indices=torch.arange(TXT_TOKENS, TXT_TOKENS + IMG_TOKENS),
        audio_indices=torch.arange(TXT_TOKENS + IMG_TOKENS, _MINIMAX_ROWS),
        text_indices=torch.arange(TXT_TOKENS),
    )


_register(
    "minimax_h3",
    "MiniMaxH3Transformer3DModel",
    dict(
        num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=4, num_refiner_layers=1,
        ffn_dim=64, in_channels=4, audio_in_channels=8, patch_size=(1, 2, 2), text_dim=16, freq_dim=32,
        time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=2,
    ),
    _minimax_inputs,
    ("transformer_blocks",),
    note="no-op .to() of the rope in each block; token_refiner's text is packed with video and audio after it",
)


# Motif-Video: 2 dual-stream then 2 single-stream blocks (no decoder layers). Latent (1, 4, 1, 8, 8),
# patch 2. Timestep in [0, 1000].
def _motif_inputs(step: int, t: float) -> dict:
    mask = torch.ones(1, TXT_TOKENS, dtype=torch.long)
    mask[:, -2:] = 0
    return dict(
        hidden_states=_latent(40, 1, 4, 1, 8, 8, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(40, 1, TXT_TOKENS, 16),
        encoder_attention_mask=mask,
    )


_register(
    "motif_video",
    "MotifVideoTransformer3DModel",
    dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, patch_size=2, patch_size_t=1, text_embed_dim=16, rope_axes_dim=(4, 4, 8),
    ),
    _motif_inputs,
    ("transformer_blocks", "single_transformer_blocks"),
)


# Motif-Video with a decoder: the last single-stream block re-reads the patch embedding (cloned before the
# chain) as its stream, with the encoder's output as context. 2 dual-stream + 3 single-stream (1 decoder) blocks.
_register(
    "motif_video_decoder",
    "MotifVideoTransformer3DModel",
    dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=3, num_decoder_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        rope_axes_dim=(4, 4, 8),
    ),
    _motif_inputs,
    ("transformer_blocks", "single_transformer_blocks"),
)


# Sana-Video: 4 linear-attention blocks with temporal conv. Latent (1, 4, 1, 8, 8), patch (1, 2, 2).
# Timestep in [0, 1000].
def _sana_video_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(41, 1, 4, 1, 8, 8, step=step),
        encoder_hidden_states=_text(41, 1, TXT_TOKENS, 16),
        timestep=_ts(1000.0 * t),
    )


_register(
    "sana_video",
    "SanaVideoTransformer3DModel",
    dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=4,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32,
    ),
    _sana_video_inputs,
    ("transformer_blocks",),
)


# SANA-WM: 4 camera-control blocks (GDN linear attention, every 2nd a softmax one), no camera input.
# Latent (1, 4, 1, 4, 4), patch 1 -> 16 tokens. Per-frame timestep (1, 1, F) in [0, 1000], cast to long
# inside; text (1, 1, L, D) with its mask.
def _sana_wm_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(42, 1, 4, 1, 4, 4, step=step),
        timestep=torch.full((1, 1, 1), 1000.0 * t),
        encoder_hidden_states=_text(42, 1, 1, TXT_TOKENS, 16),
        encoder_attention_mask=torch.ones(1, TXT_TOKENS, dtype=torch.long),
    )


_register(
    "sana_wm",
    "SanaWMTransformer3DModel",
    dict(
        in_channels=4, num_layers=4, hidden_size=32, num_attention_heads=2, softmax_every_n=2,
        linear_head_dim=16, use_chunk_plucker_post_attn=False, chunk_plucker_post_attn_blocks=0,
        caption_channels=16, mlp_ratio=2.0,
    ),
    _sana_wm_inputs,
    ("blocks",),
    note="the attention scale, a float of the token count made in block 0, is read in the middle blocks",
)


# SANA-WM refiner (LTX-2 video-only, stage 2): 4 blocks, no KV cache (plain self-attention). The video rope is
# an input: built from a parameter-free rope module with the model's config, for frame 0 of a 4x4 grid.
def _sana_wm_refiner_rope() -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMLTX2AudioVideoRotaryPosEmbed

    rope = SanaWMLTX2AudioVideoRotaryPosEmbed(dim=16, num_attention_heads=2)
    return rope(rope.prepare_video_coords(1, 1, 4, 4, torch.device("cpu")))


def _sana_wm_refiner_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(43, 1, IMG_TOKENS, 4, step=step),
        encoder_hidden_states=_text(43, 1, TXT_TOKENS, 16),
        timestep=_ts(1000.0 * t),
        video_rotary_emb=_sana_wm_refiner_rope(),
        encoder_attention_mask=torch.ones(1, TXT_TOKENS, dtype=torch.long),
    )


_register(
    "sana_wm_refiner",
    "SanaWMLTX2RefinerTransformer3DModel",
    _LTX2_CONFIG,
    _sana_wm_refiner_inputs,
    ("transformer_blocks",),
)


# Wan-Animate: 4 Wan blocks; a face adapter (its own ModuleList, indexed by block) adds the face motion after
# blocks 0 and 2, inside the chain. The motion encoder's `motion_network` always holds 5 linears (more than the
# 4 blocks here; the real model has 40). Latent (1, 2*2+4, 1+1, 8, 8) -> 32 tokens, pose latent one frame
# shorter; face video (1, 3, 1, 16, 16) through a tiny motion encoder. Timestep in [0, 1000].
def _wan_animate_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(44, 1, 8, 2, 8, 8, step=step),
        timestep=_ts(1000.0 * t),
        encoder_hidden_states=_text(44, 1, TXT_TOKENS, 16),
        encoder_hidden_states_image=_text(45, 1, 4, 8),
        pose_hidden_states=_randn(46, 1, 2, 1, 8, 8),
        face_pixel_values=_randn(47, 1, 3, 1, 16, 16),
    )


_register(
    "wan_animate",
    "WanAnimateTransformer3DModel",
    dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=8, latent_channels=2,
        out_channels=2, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=4, image_dim=8, rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8}, motion_encoder_size=16, motion_style_dim=8,
        motion_dim=4, motion_encoder_dim=8, face_encoder_hidden_dim=8, face_encoder_num_heads=2,
        inject_face_latents_blocks=2, motion_encoder_batch_size=1,
    ),
    _wan_animate_inputs,
    ("blocks",),
    note="motion_encoder.motion_network: 5 Linears, more list entries than blocks (the chain holds more nodes)",
)




# Kandinsky 5: its modulation layers are zero-initialised (build() re-draws them). 2 text blocks (a prompt
# encoder run before: prologue) then 4 visual blocks, the chain.
# Channels-last latent (1, F, H, W, C) = (1, 1, 8, 8, 4), patch (1, 2, 2). Timestep in [0, 1000].
def _kandinsky5_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(48, 1, 1, 8, 8, 4, step=step),
        encoder_hidden_states=_text(48, 1, TXT_TOKENS, 16),
        timestep=_ts(1000.0 * t),
        pooled_projections=_text(49, 1, 8),
        visual_rope_pos=[torch.arange(1), torch.arange(4), torch.arange(4)],
        text_rope_pos=torch.arange(TXT_TOKENS),
    )


_register(
    "kandinsky5",
    "Kandinsky5Transformer3DModel",
    dict(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=2, num_visual_blocks=4, axes_dims=(4, 6, 6),
    ),
    _kandinsky5_inputs,
    ("visual_transformer_blocks",),
    init=_redraw_zero_init,
)


# Kandinsky 6: per-modality text blocks (prologue) then 4 fused video+audio blocks, the chain. Channels-last
# latent (1, 1, 8, 8, 2*4+1) (visual_cond), patch (1, 2, 2); audio latent (1, 8, 4). Timestep in [0, 1000].
def _kandinsky6_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(50, 1, 1, 8, 8, 9, step=step),
        encoder_hidden_states=_text(50, 1, TXT_TOKENS, 16),
        pooled_projections=_text(51, 1, 8),
        timestep=_ts(1000.0 * t),
        audio_hidden_states=_randn(52, 1, 8, 4),  # fixed: only the video latent drifts
    )


_register(
    "kandinsky6",
    "Kandinsky6Transformer3DModel",
    dict(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=4, axes_dims=(4, 6, 6), in_audio_dim=4,
        out_audio_dim=4, text_token_padding=True, ca_rope=True, cross_gates=True, fix_modulation=True,
    ),
    _kandinsky6_inputs,
    ("visual_transformer_blocks",),
    note="no-op .to() of the rope in each block (looked carried, as large as the hidden stream)",
)


# LongCat-AudioDiT: 4 blocks with a long skip around the chain. Latent (1, 16, 8) audio frames; text
# (1, 7, 16) with two padding tokens. Timestep in [0, 1]. Its init zeroes the global adaLN and output
# projections (a random-weight model would output zeros): build() re-draws them.
def _longcat_inputs(step: int, t: float) -> dict:
    mask = torch.ones(1, TXT_TOKENS, dtype=torch.bool)
    mask[:, -2:] = False
    return dict(
        hidden_states=_latent(53, 1, IMG_TOKENS, 8, step=step),
        encoder_hidden_states=_text(53, 1, TXT_TOKENS, 16),
        encoder_attention_mask=mask,
        timestep=_ts(t),
    )


_register(
    "longcat_audio_dit",
    "LongCatAudioDiTTransformer",
    dict(dit_dim=32, dit_depth=4, dit_heads=2, dit_text_dim=16, latent_dim=8, ff_mult=2.0),
    _longcat_inputs,
    ("blocks",),
    init=_redraw_zero_init,
)


# ------------------------------------------------------------------------ not capturable (eager only)

# HiDream-I1: MoE routing loops over `bincount().cpu().numpy()` (data-dependent Python).
def _hidream_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(23, 1, 4, 8, 8, step=step),
        timesteps=_ts(1000.0 * t),
        encoder_hidden_states_t5=_text(23, 1, TXT_TOKENS, 8),
        encoder_hidden_states_llama3=_text(24, 4, 1, TXT_TOKENS, 4),  # one llama layer per block
        pooled_embeds=_text(25, 1, 8),
    )


_register(
    "hidream",
    "HiDreamImageTransformer2DModel",
    dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2,
        attention_head_dim=8, num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8,
        num_routed_experts=2, num_activated_experts=2, axes_dims_rope=(4, 2, 2),
        max_resolution=(32, 32), llama_layers=(0, 1, 2, 3),
    ),
    _hidream_inputs,
    ("double_stream_blocks", "single_stream_blocks"),
    capturable=False,
    note="MoE routing: bincount().cpu().numpy() loop (data-dependent Python)",
)


# Lumina2: `attention_mask.sum(1).tolist()` in the top-level forward (data-dependent Python).
def _lumina2_inputs(step: int, t: float) -> dict:
    return dict(
        hidden_states=_latent(26, 1, 4, 8, 8, step=step),
        timestep=_ts(t),
        encoder_hidden_states=_text(26, 1, TXT_TOKENS, 8),
        encoder_attention_mask=torch.ones(1, TXT_TOKENS, dtype=torch.bool),
    )


_register(
    "lumina2",
    "Lumina2Transformer2DModel",
    dict(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=4,
        num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1, multiple_of=2,
        axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128), cap_feat_dim=8,
    ),
    _lumina2_inputs,
    ("layers",),
    capturable=False,
    note="attention_mask.sum(1).tolist() in forward (data-dependent Python)",
)


# Bria FIBO 2 with a padded text mask (a batch of prompts of different lengths): the gist count is
# read with `encoder_attention_mask.sum(dim=1).tolist()` (data-dependent Python).
def _bria_fibo2_mask_inputs(step: int, t: float) -> dict:
    mask = torch.ones(1, TXT_TOKENS, dtype=torch.bool)
    mask[:, -2:] = False
    return dict(_bria_fibo2_inputs(step, t), encoder_attention_mask=mask)


_register(
    "bria_fibo2_mask",
    "BriaFibo2Transformer2DModel",
    _BRIA_FIBO2_CONFIG,
    _bria_fibo2_mask_inputs,
    ("layers",),
    capturable=False,
    warmup=True,
    note="encoder_attention_mask.sum(dim=1).tolist() in forward (data-dependent Python)",
)
