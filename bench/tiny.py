"""Tiny random host models and helpers, shared by the benchmarks, the demo and the host tests.

Imports ComfyUI lazily: call these only once the host is imported (``comfy_host.import_host``).
"""
from __future__ import annotations

import contextlib
import math

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
    return make_random_model("SD15", UNET_CONFIG, seed, dtype, device)


def make_random_model(config_class: str, unet_config: dict, seed: int = 0, dtype=torch.float32, device: str = "cpu"):
    """A ModelPatcher around a random model built by the host's ``supported_models.<config_class>``."""
    import comfy.model_patcher
    import comfy.supported_models

    config = getattr(comfy.supported_models, config_class)(dict(unet_config))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
    _fill_fixed_buffers(model.diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device), offload_device=torch.device("cpu"))


def _fill_fixed_buffers(diffusion_model: torch.nn.Module) -> None:
    """Fill the buffers the host allocates with ``torch.empty`` and leaves to the checkpoint.

    SD3's MMDiT keeps its fixed sin-cos position table as such a buffer. Left empty it holds
    whatever memory it got: NaN on some machines, different finite garbage on others.
    """
    pos = getattr(diffusion_model, "pos_embed", None)
    if isinstance(pos, torch.Tensor) and not isinstance(pos, torch.nn.Parameter):
        from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

        grid = math.isqrt(pos.shape[1])
        table = torch.from_numpy(get_2d_sincos_pos_embed(pos.shape[2], grid)).reshape(pos.shape)
        with torch.no_grad():
            pos.copy_(table.to(pos.dtype))


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
    """max|a - b| / mean|b|: the relative error the host tests bound (1e-5 where the result is exact)."""
    return float((a - b).abs().max() / b.abs().mean().clamp_min(1e-12))


def _randomise(module: torch.nn.Module, gen: torch.Generator, std: float = 0.02) -> None:
    """Random matrices of std ``std``, unit norm scales, zero biases: a stable random network."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_((torch.randn(p.shape, generator=gen) * std).to(p.dtype))
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def random_sd15_clip(seed: int = 0):
    """The host's SD1.5 text encoder (full-size CLIP-L, SD1 tokenizer) with random weights."""
    import comfy.sd
    import comfy.supported_models

    clip = comfy.sd.CLIP(target=comfy.supported_models.SD15(dict(UNET_CONFIG)).clip_target(), embedding_directory=None)
    _randomise(clip.cond_stage_model, torch.Generator().manual_seed(seed))
    return clip


def write_tiny_sd15_checkpoint(path, seed: int = 0, dtype=torch.float16) -> None:
    """A .safetensors checkpoint that the host's CheckpointLoaderSimple detects as SD1.5.

    The UNet is the tiny one (SD1.5's 320 channels and context 768; depth, levels and res blocks
    are read from the weights); CLIP-L is full size, as detection requires; the VAE has TAESD's
    layout, which the host's VAE recognises and keeps small. All weights are random.
    """
    import comfy.supported_models
    import comfy.taesd.taesd
    import safetensors.torch

    config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    unet = make_tiny_sd15(seed).model.diffusion_model.state_dict()
    clip = config.process_clip_state_dict_for_saving(random_sd15_clip(seed).cond_stage_model.state_dict())
    vae = comfy.taesd.taesd.TAESD()
    _randomise(vae, torch.Generator().manual_seed(seed + 1))
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    sd.update(clip)
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    sd = {k: v.detach().to(dtype).contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}
    safetensors.torch.save_file(sd, str(path))
