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


def _builder(cls_name: str, config: dict, warmup: Callable[[], dict] | None = None, seed: int = 0):
    def build() -> torch.nn.Module:
        import diffusers

        cls = getattr(diffusers, cls_name)
        torch.manual_seed(seed)
        model = _finish(cls(**config))
        if warmup is not None:  # lazily built tables (rope caches): one eager forward before capture
            with torch.no_grad():
                model(**warmup(), return_dict=False)
        return model

    return build


def _register(name, cls_name, config, inputs, block_lists, capturable=True, warmup=False, note=""):
    ZOO[name] = ZooModel(
        name=name,
        cls_name=cls_name,
        build=_builder(cls_name, config, (lambda: inputs(0, 1.0)) if warmup else None),
        inputs=inputs,
        block_lists=tuple(block_lists),
        capturable=capturable,
        note=note,
    )


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
