"""Tiny random models of the host's model families, with matching conditionings and latents.

Each family is built by the host's own ``supported_models`` class, so its model sampling (eps or
flow, shift), latent format, extra conditionings (SDXL's ADM vector, SD3's and Flux's pooled
vector, Flux's guidance embedding) and forward are the host's; only depth and width are cut so a
step takes milliseconds on a CPU. Weights are random, made here. Imports ComfyUI lazily.

Families: ``sd15`` (UNet, eps), ``sdxl`` (UNet with ADM, eps), ``sd3`` (MMDiT, flow, 16
channels), ``flux`` (double/single-stream DiT, flow, guidance embedding) and ``wan`` (Wan 2.1
text-to-video DiT, flow, 5-D latents ``[batch, 16, frames, height, width]``).
"""
from __future__ import annotations

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


@dataclass(frozen=True)
class Family:
    """What a test needs to sample one family: its model config, context and pooled widths, latent shape."""

    name: str
    config_class: str
    unet_config: dict = field(repr=False)
    context_width: int
    pooled_width: int = 0
    channels: int = 4
    frames: int = 0
    flow: bool = False
    unet: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def model(self, seed: int = 0, dtype=torch.float32):
        """A ModelPatcher around a random model of this family, built by the host's own config class."""
        return make_random_model(self.config_class, self.unet_config, seed, dtype)

    def cond(self, seed: int, tokens: int = 77, batch: int = 1, **extra) -> list:
        """A random CONDITIONING carrying what this family's text encoders give (pooled vector, guidance)."""
        gen = torch.Generator().manual_seed(seed)
        values = dict(self.extra)
        if self.pooled_width:
            values["pooled_output"] = torch.randn(batch, self.pooled_width, generator=gen)
        values.update(extra)
        return [[torch.randn(batch, tokens, self.context_width, generator=gen), values]]

    def latent(self, batch: int = 1, size: int = 8) -> dict:
        shape = (batch, self.channels) + ((self.frames,) if self.frames else ()) + (size, size)
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
