"""Checks that a node's inputs fit the model they will run with.

What only the model can tell: the context width its cross-attention takes (UNets), whether its
family reads every prompt's pooled vector (SDXL, SD3, Flux), its latents' shape, its sigma range
against a rule's thresholds, and, when sampling starts, the sampler's own prompts. Without these
the host stops inside the model's first forward with a shape error or ``KeyError: 'pooled_output'``.
"""
from __future__ import annotations

import logging

import torch

from ..samplers import rules
from .request import GuidanceRequest
from .validation import InputError, check_width, conditioning_width

log = logging.getLogger(__name__)


def needs_pooled(model) -> bool:
    """Whether the model's extra conditioning reads every prompt's ``pooled_output`` (SDXL, SD3, Flux).

    Asked of the host itself: its ``encode_adm`` raises ``KeyError('pooled_output')`` for exactly
    those families when called without one.
    """
    try:
        model.model.encode_adm()
    except KeyError as err:
        return err.args == ("pooled_output",)
    except (TypeError, AttributeError, ValueError, IndexError, RuntimeError):
        return False  # other families need other arguments to answer; they read no pooled vector
    return False


def model_context_width(model) -> int | None:
    """The embedding width a UNet's cross-attention takes; None for families whose config does not say it plainly."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    if not isinstance(model.get_model_object("diffusion_model"), UNetModel):
        return None
    width = getattr(getattr(model.model, "model_config", None), "unet_config", {}).get("context_dim")
    return width if isinstance(width, int) and width > 1 else None


def family_name(model) -> str:
    """The model's config class name (SD15, SDXL, Flux...), for messages."""
    return type(getattr(model.model, "model_config", None)).__name__


def check_context_width(node: str, name: str, got: int, want: int | None, model) -> None:
    """A prompt's embedding width against the context width ``want`` of ``model`` (None: nothing to check)."""
    if want is not None and got != want:
        raise InputError(node, name, f"must have this model's context width ({want}, {family_name(model)}): it was "
                         "encoded by another family's text encoder", got)


def check_prompts_fit_model(node: str, model, named, pooled: bool = True) -> None:
    """Each ``(name, conditioning)`` has what the model reads: its context width (UNets) and, where the
    family needs one, a ``pooled_output``.

    Entries may be raw ``[tensor, dict]`` pairs or the host's converted dicts.
    """
    want = model_context_width(model)
    pooled = pooled and needs_pooled(model)
    for name, conditioning in named:
        for entry in conditioning or ():
            values = entry if isinstance(entry, dict) else entry[1]
            tensor = values.get("cross_attn") if isinstance(entry, dict) else entry[0]
            if tensor is not None:
                check_context_width(node, name, int(tensor.shape[-1]), want, model)
            if pooled and values.get("pooled_output") is None and "unclip_conditioning" not in values:
                raise InputError(
                    node, name,
                    f"has no 'pooled_output', which this model ({family_name(model)}) needs for every prompt: encode "
                    "it with the model's own text encoder (CLIPTextEncode gives one), or ConditioningZeroOut an "
                    "encoded prompt",
                )


def check_latent(node: str, name: str, latent, model) -> None:
    """A LATENT dict whose samples have the model's channel count (an empty latent the host adapts itself)."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim < 3:
        raise InputError(node, name, "must be a LATENT: a dict with a 'samples' tensor of shape [batch, channels, ...]")
    latent_format = model.get_model_object("latent_format")
    dims = getattr(latent_format, "latent_dimensions", None)
    # the host itself turns a 4-D latent into a one-frame video (fix_empty_latent_channels)
    if dims is not None and samples.ndim != 2 + dims and not (dims == 3 and samples.ndim == 4):
        shape = {1: "[batch, channels, length] (audio)", 2: "[batch, channels, height, width] (images)",
                 3: "[batch, channels, frames, height, width] (video)"}.get(dims, f"{2 + dims} dimensions")
        raise InputError(node, name, f"has {samples.ndim} dimensions but this model's latents are {shape}: it was made "
                         "for another model family", list(samples.shape))
    want = getattr(latent_format, "latent_channels", None)
    if want is not None and samples.shape[1] != want and bool(torch.count_nonzero(samples) > 0):
        raise InputError(node, name, f"has {samples.shape[1]} channels but this model's latents have {want}: it was made "
                         "by another model family's VAE", samples.shape[1])
    if not bool(torch.isfinite(samples).all()):
        raise InputError(node, name, "contains NaN or infinite values")


def check_request_fits(request: GuidanceRequest, model) -> None:
    """A request's prompts against the model, and its rule's sigmas inside the model's range."""
    check_prompts_fit_model(request.node, model, request.named_prompts())
    if request.rule is None:
        return
    model_sampling = model.get_model_object("model_sampling")
    low, high = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    fit = rules.nest(request.rule).fit(low, high)
    where = f"this model's sigmas run from {high:.4g} down to {low:.4g}" + (
        " (a flow model: 1 down to 0)" if high <= 1.0 + 1e-6 else "")
    if fit == "never":
        raise InputError(request.node, "rule", f"({request.rule.name}) would never guide on this model: {where}; set "
                         "the rule's sigmas inside that range")
    if fit == "everywhere":
        log.warning("%s: the %s rule's threshold is at or above the largest sigma of this model (%s): it skips "
                    "over the whole run", request.node, request.rule.name, where)


def _check_finite_prompts(node: str, original_conds: dict) -> None:
    for name in ("positive", "negative"):
        for c in original_conds.get(name) or ():
            tensors = [c.get("cross_attn"), c.get("pooled_output")]
            if any(isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()) for t in tensors):
                raise InputError(node, name, f"(the sampler's {name} prompt) contains NaN or infinite values (a broken "
                                 "text encoder or LoRA upstream?)")


def _widths(converted_conds) -> set:
    return {int(c["cross_attn"].shape[-1]) for c in converted_conds or () if c.get("cross_attn") is not None}


def check_sampler_prompts(request: GuidanceRequest, model, original_conds: dict) -> None:
    """When sampling starts (the patch meets the sampler's prompts only then): the positive and negative
    are finite and fit the model, and the request's prompts have the positive's embedding width."""
    node = request.node
    _check_finite_prompts(node, original_conds)
    check_prompts_fit_model(node, model, [(name, original_conds.get(name)) for name in ("positive", "negative")])
    positive, negative = _widths(original_conds.get("positive")), _widths(original_conds.get("negative"))
    if len(positive) != 1:
        return
    (want,) = positive
    if negative and negative != positive:
        raise InputError(node, "negative", f"(the sampler's negative prompt) must have the positive prompt's "
                         f"embedding width ({want})", sorted(negative))
    for name, conditioning in request.named_prompts():
        check_width(node, name, conditioning_width(conditioning, node, name), want,
                    "the positive prompt's embedding width")
