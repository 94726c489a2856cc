"""Tiny random host models and helpers, shared by the benchmarks, the demo and the host tests.

Imports ComfyUI lazily: call these only once the host is importable (``COMFYUI_PATH`` on sys.path).
"""
from __future__ import annotations

import contextlib

import torch

UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [1],
    "transformer_depth": [1], "transformer_depth_output": [1, 1], "channel_mult": [1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False, "adm_in_channels": None,
}


def make_tiny_sd15(seed: int = 0, dtype=torch.float32, device: str = "cpu"):
    """A ModelPatcher around a random SD1.5-shaped UNet: 320 channels, context 768, one level."""
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device), offload_device=torch.device("cpu"))


def cond(seed: int, width: int = 768, tokens: int = 77, batch: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, width, generator=gen), {}]]


def latent(batch: int = 1, size: int = 8):
    return {"samples": torch.zeros(batch, 4, size, size)}


@contextlib.contextmanager
def count_forwards(model_patcher):
    """Record the batch size of every forward of the diffusion model (a torch hook, no patching)."""
    rows = []
    unet = model_patcher.model.diffusion_model
    handle = unet.register_forward_pre_hook(lambda module, args: rows.append(int(args[0].shape[0])))
    try:
        yield rows
    finally:
        handle.remove()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / mean|b|: the relative error the issue's 1e-5 bound is about."""
    return float((a - b).abs().max() / b.abs().mean().clamp_min(1e-12))
