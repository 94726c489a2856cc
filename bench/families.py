"""Tiny random models of the host's model families, with matching conditionings and latents.

Each family is built by the host's own ``supported_models`` class, so its model sampling (eps or
flow, shift), latent format, extra conditionings (SDXL's ADM vector, SD3's and Flux's pooled
vector, Flux's guidance embedding) and forward are the host's; only depth and width are cut so a
step takes milliseconds on a CPU. Weights are random, made here. Imports ComfyUI lazily.

``FAMILIES``: ``sd15`` (UNet, eps), ``sdxl`` (UNet with ADM, eps), ``sd3`` (MMDiT, flow, 16
channels), ``flux`` (double/single-stream DiT, flow, guidance embedding) and ``wan`` (Wan 2.1
text-to-video DiT, flow, 5-D latents ``[batch, 16, frames, height, width]``): every entry point and
rule runs on these. ``MORE_FAMILIES`` adds the rest of the host's text-conditioned families, for
attention-level guidance: SD3.5 (a second, image-only attention), Chroma, HiDream (llama tokens per
block), Wan I2V (CLIP image tokens), Wan VACE, Wan 2.2 5B, LTXV (text mask), HunyuanVideo (text
refiner), Qwen-Image and Lumina2. ``ALL_FAMILIES`` is both.
"""
from __future__ import annotations

import dataclasses
import importlib
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tiny import UNET_CONFIG, make_random_model

SDXL_UNET = dict(
    UNET_CONFIG, model_channels=64, num_head_channels=64, context_dim=2048, adm_in_channels=2816,
    num_classes="sequential", use_linear_in_transformer=True,
)
SD3_DIT = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
    "adm_in_channels": 2048, "pos_embed_scaling_factor": None, "pos_embed_max_size": 16, "num_patches": 256,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "x_block_self_attn_layers": [],
}
FLUX_DIT = {
    "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
    "context_in_dim": 4096, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}
WAN_DIT = {
    "image_model": "wan2.1", "model_type": "t2v", "dim": 128, "out_dim": 16, "num_heads": 1, "ffn_dim": 256,
    "num_layers": 1, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
    "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16,
}


SD35_DIT = dict(SD3_DIT, x_block_self_attn_layers=[0], qk_norm="rms")
CHROMA_DIT = {
    "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 4096, "hidden_size": 64,
    "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000,
    "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 64, "n_layers": 1,
}
HIDREAM_DIT = {
    "image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1,
    "num_single_layers": 1, "attention_head_dim": 32, "num_attention_heads": 2, "caption_channels": [4096, 4096],
    "text_emb_dim": 2048, "num_routed_experts": 2, "num_activated_experts": 2, "axes_dims_rope": [16, 8, 8],
    "max_resolution": [128, 128], "llama_layers": [0, 1],
}
WAN2_DIT = dict(WAN_DIT, num_heads=2)
LTXV_DIT = {
    "image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 32,
    "num_attention_heads": 2, "caption_channels": 4096, "num_layers": 1,
}
HUNYUAN_VIDEO_DIT = {
    "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
    "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 2, 2], "qkv_bias": True, "guidance_embed": True,
    "byt5": False, "meanflow": False,
}
QWEN_IMAGE_DIT = {
    "image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 1, "attention_head_dim": 32,
    "num_attention_heads": 2, "joint_attention_dim": 3584, "axes_dims_rope": [8, 12, 12], "patch_size": 2,
}
LUMINA2_DIT = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 2304, "n_layers": 1,
    "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "qk_norm": True, "axes_dims": [8, 12, 12],
    "axes_lens": [300, 512, 512],
}


def _text_mask(gen, tokens, batch):
    return {"attention_mask": torch.ones(batch, tokens, dtype=torch.long)}


def _llama(gen, tokens, batch, llama_tokens=6):
    return {"conditioning_llama3": torch.randn(batch, 2, llama_tokens, 4096, generator=gen)}


def _clip_vision(gen, tokens, batch, image_tokens=5):
    output = types.SimpleNamespace(penultimate_hidden_states=torch.randn(batch, image_tokens, 1280, generator=gen))
    return {"clip_vision_output": output}


PARAMS = {"flux": ("comfy.ldm.flux.model", "FluxParams"), "chroma": ("comfy.ldm.chroma.model", "ChromaParams"),
          "hunyuan_video": ("comfy.ldm.hunyuan_video.model", "HunyuanVideoParams")}
# What the host's model detection sets for a checkpoint that has none of these parts (comfy/model_detection.py)
LATER_FIELDS = {"txt_ids_dims": [], "vec_in_dim": None, "use_cond_type_embedding": False, "vision_in_dim": None,
                "meanflow_sum": False}


def for_this_host(config: dict) -> dict:
    """``config`` with the fields this host's params dataclass requires beyond the ones written here. Hosts after
    0.3.64 require more: ``FluxParams.txt_ids_dims`` (the 0.4 line on, so in 0.8.0), ``ChromaParams.txt_ids_dims``
    and ``vec_in_dim``, ``HunyuanVideoParams.use_cond_type_embedding``, ``vision_in_dim`` and ``meanflow_sum``
    (0.8.0); each is filled as the host's model detection fills it for a checkpoint without those parts."""
    where = PARAMS.get(config.get("image_model"))
    if where is None:
        return config
    params = getattr(importlib.import_module(where[0]), where[1])
    required = {f.name for f in dataclasses.fields(params)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return {**{k: v for k, v in LATER_FIELDS.items() if k in required - set(config)}, **config}


@dataclass(frozen=True)
class Family:
    """What a test needs to sample one family: its model config, context and pooled widths, latent shape."""

    name: str
    config_class: str
    unet_config: dict = field(repr=False)
    context_width: int
    pooled_width: int = 0
    channels: int = 4
    frames: int | None = None
    flow: bool = False
    unet: bool = False
    extra: dict = field(default_factory=dict, repr=False)
    per_prompt: Callable | None = field(default=None, repr=False)  # (generator, tokens, batch) -> more keys
    size: int = 8  # latent height and width the tests use

    def model(self, seed: int = 0, dtype=torch.float32, device: str = "cpu"):
        """A ModelPatcher around a random model of this family, built by the host's own config class."""
        return make_random_model(self.config_class, for_this_host(self.unet_config), seed, dtype, device)

    def cond(self, seed: int, tokens: int = 77, batch: int = 1, **extra) -> list:
        """A random CONDITIONING carrying what this family's text encoders give (pooled vector, guidance)."""
        gen = torch.Generator().manual_seed(seed)
        values = dict(self.extra)
        if self.pooled_width:
            values["pooled_output"] = torch.randn(batch, self.pooled_width, generator=gen)
        if self.per_prompt is not None:
            values.update(self.per_prompt(gen, tokens, batch))
        values.update(extra)
        return [[torch.randn(batch, tokens, self.context_width, generator=gen), values]]

    def latent(self, batch: int = 1, size: int | None = None) -> dict:
        size = size or self.size
        shape = (batch, self.channels) + ((self.frames,) if self.frames is not None else ()) + (size, size)
        return {"samples": torch.zeros(shape)}


FAMILIES = {
    f.name: f for f in (
        Family("sd15", "SD15", UNET_CONFIG, 768, unet=True),
        Family("sdxl", "SDXL", SDXL_UNET, 2048, pooled_width=1280, unet=True,
               extra={"width": 64, "height": 64}),
        Family("sd3", "SD3", SD3_DIT, 4096, pooled_width=2048, channels=16, flow=True),
        Family("flux", "Flux", FLUX_DIT, 4096, pooled_width=768, channels=16, flow=True, extra={"guidance": 3.5}),
        Family("wan", "WAN21_T2V", WAN_DIT, 4096, channels=16, frames=2, flow=True),
    )
}

MORE_FAMILIES = {
    f.name: f for f in (
        Family("sd35", "SD3", SD35_DIT, 4096, pooled_width=2048, channels=16, flow=True),
        Family("chroma", "Chroma", CHROMA_DIT, 4096, channels=16, flow=True, extra={"pooled_output": None}),
        Family("hidream", "HiDream", HIDREAM_DIT, 4096, pooled_width=2048, channels=16, flow=True, per_prompt=_llama),
        Family("wan_i2v", "WAN21_I2V", dict(WAN2_DIT, model_type="i2v", in_dim=36), 4096, channels=16, frames=2,
               flow=True, per_prompt=_clip_vision),
        Family("wan_vace", "WAN21_Vace", dict(WAN2_DIT, model_type="vace", vace_in_dim=96, vace_layers=1), 4096,
               channels=16, frames=2, flow=True),
        Family("wan22_5b", "WAN22_T2V", dict(WAN2_DIT, in_dim=48, out_dim=48), 4096, channels=48, frames=2, flow=True),
        Family("ltxv", "LTXV", LTXV_DIT, 4096, channels=128, frames=2, flow=True, per_prompt=_text_mask),
        Family("hunyuan_video", "HunyuanVideo", HUNYUAN_VIDEO_DIT, 4096, pooled_width=768, channels=16, frames=2,
               flow=True),
        Family("qwen_image", "QwenImage", QWEN_IMAGE_DIT, 3584, channels=16, frames=1, flow=True),
        Family("lumina2", "Lumina2", LUMINA2_DIT, 2304, channels=16, flow=True, per_prompt=_text_mask, size=10),
    )
}
ALL_FAMILIES = {**FAMILIES, **MORE_FAMILIES}
