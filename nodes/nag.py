"""NegativeAttentionGuidance: Normalized Attention Guidance (NAG) through the host's attention patches.

Two ``transformer_options`` patches, installed on a clone with ``set_model_attn2_patch`` and
``set_model_attn2_output_patch`` (no forward method is replaced):

- ``attn2_patch`` (before each cross-attention): appends, for the positive rows of the batch, a copy
  of their hidden states paired with the negative context, so one attention call computes ``Z+``
  and ``Z-`` (token lengths are aligned by repetition, as the host aligns conditionings: repeating
  every key and value leaves attention unchanged);
- ``attn2_output_patch`` (after it, after the output projection): combines them with
  ``samplers.nag.nag`` and returns the batch at its original size.

These hooks exist in the host's ``BasicTransformerBlock``, which the UNet families (SD1.x, SD2.x,
SDXL) use; other families are refused with a clear error.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from comfy_api.latest import io

from ..samplers.nag import NORMS, check_parameters, nag
from ..samplers.schedule import SigmaWindow
from . import _host
from .guidance import CATEGORY

NODE = "NegativeAttentionGuidance"


def _align_tokens(a: torch.Tensor, b: torch.Tensor):
    """Repeat the token dimension of both to their least common multiple (attention is unchanged)."""
    la, lb = a.shape[1], b.shape[1]
    if la == lb:
        return a, b
    lcm = math.lcm(la, lb)
    return a.repeat(1, lcm // la, 1), b.repeat(1, lcm // lb, 1)


class NagPatch:
    """The pair of attention patches of one NAG node; state lives only between the two calls of a block."""

    def __init__(self, negative: torch.Tensor, scale: float, tau: float, alpha: float, norm: str,
                 window: SigmaWindow):
        self.negative = negative
        self.scale, self.tau, self.alpha, self.norm = scale, tau, alpha, norm
        self.window = window
        self.pending = None
        self._sigma_key, self._sigma_active = None, True

    def _active(self, extra_options) -> bool:
        if self.window.always:
            return True
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return True
        if sigmas is not self._sigma_key:  # one scalar read per model call, not per block
            self._sigma_key, self._sigma_active = sigmas, self.window.contains(float(sigmas.reshape(-1)[0]))
        return self._sigma_active

    @staticmethod
    def _positive_rows(extra_options, batch: int) -> torch.Tensor:
        chunks = extra_options.get("cond_or_uncond") or [0]
        per = batch // len(chunks)
        rows = [c * per + r for c, kind in enumerate(chunks) if kind == 0 for r in range(per)]
        return torch.tensor(rows, dtype=torch.long)

    def attn2_patch(self, n, context, value, extra_options):
        self.pending = None
        if not self._active(extra_options):
            return n, context, value
        rows = self._positive_rows(extra_options, n.shape[0])
        if len(rows) == 0:
            return n, context, value
        rows = rows.to(n.device)
        neg = self.negative.to(device=context.device, dtype=context.dtype)
        neg = neg.expand(len(rows), -1, -1) if neg.shape[0] == 1 else neg.repeat(math.ceil(len(rows) / neg.shape[0]), 1, 1)[:len(rows)]
        ctx, neg_ctx = _align_tokens(context, neg)
        val = ctx if value is None or value is context else _align_tokens(value, neg)[0]
        self.pending = (rows, n.shape[0])
        return torch.cat([n, n[rows]]), torch.cat([ctx, neg_ctx]), torch.cat([val, neg_ctx])

    def attn2_output_patch(self, n, extra_options):
        if self.pending is None:
            return n
        rows, batch = self.pending
        self.pending = None
        out = n[:batch].clone()
        out[rows] = nag(n[:batch][rows], n[batch:], self.scale, self.tau, self.alpha, self.norm)
        return out


def _check_family(model) -> None:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = model.get_model_object("diffusion_model")
    if not isinstance(unet, UNetModel):
        raise _host.InputError(
            NODE, "model",
            "must be a UNet model (SD1.x, SD2.x, SDXL): NAG reaches cross-attention through the host's attn2 "
            "patches, which DiT families (Flux, SD3, video models) do not call", type(unet).__name__,
        )


def apply_nag(model, negative, scale: float, tau: float, alpha: float, norm: str, start_percent: float,
              end_percent: float):
    """Validate and return a clone of ``model`` with the NAG patches (``model`` itself at scale 1)."""
    try:
        check_parameters(scale, tau, alpha)
    except ValueError as e:
        name, rest = str(e).split(" ", 1)
        raise _host.InputError(NODE, name, rest) from None
    if norm not in NORMS:
        raise _host.InputError(NODE, "norm", f"must be one of {sorted(NORMS)}", norm)
    _host.check_window(NODE, start_percent, end_percent)
    _host.conditioning_width(negative, NODE, "negative")
    if len(negative) != 1:
        raise _host.InputError(NODE, "negative", "must be a single-entry conditioning (one prompt)", len(negative))
    _host.check_model(NODE, model)
    _check_family(model)
    _host.check_prompts_fit_model(NODE, model, [("negative", negative)], pooled=False)
    if scale == 1.0:
        return model  # Z~ = Z+: NAG is the identity
    patch = NagPatch(negative[0][0].detach(), float(scale), float(tau), float(alpha), norm,
                     _host._sigma_window(model.get_model_object("model_sampling"), start_percent, end_percent))
    m = model.clone()
    m.set_model_attn2_patch(patch.attn2_patch)
    m.set_model_attn2_output_patch(patch.attn2_output_patch)
    return m


class NegativeAttentionGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Negative Attention Guidance (NAG)",
            category=CATEGORY,
            description="Normalized Attention Guidance (Chen et al. 2025): the negative prompt acts inside every "
            "cross-attention, in the same forward as the positive, so it works at cfg 1 on distilled and few-step "
            "UNet models (SDXL-Turbo/Lightning, LCM). With cfg > 1 it adds to the usual negative prompt.",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x, SD2.x, SDXL); it is cloned, never changed."),
                io.Conditioning.Input("negative", tooltip="The negative prompt, encoded (one prompt)."),
                io.Float.Input("scale", default=5.0, min=1.0, max=100.0, step=0.1,
                               tooltip="s in Z~ = s Z+ - (s - 1) Z- (1..100); 1 = off."),
                io.Float.Input("tau", default=2.5, min=1.0, max=100.0, step=0.1,
                               tooltip="Bound on |Z~| / |Z+| per token (1..100)."),
                io.Float.Input("alpha", default=0.25, min=0.0, max=1.0, step=0.01,
                               tooltip="Blend of the bounded result with Z+ (0..1); 0 = off."),
                io.Combo.Input("norm", options=list(NORMS), default="L2",
                               tooltip="Token norm for the bound: L2 (the official code) or L1 (the ComfyUI port)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where NAG starts acting (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where NAG stops acting (1 = last step)."),
            ],
            outputs=[io.Model.Output(tooltip="The patched clone of the model.")],
        )

    @classmethod
    def execute(cls, model, negative, scale, tau, alpha, norm, start_percent, end_percent) -> io.NodeOutput:
        return io.NodeOutput(apply_nag(model, negative, scale, tau, alpha, norm, start_percent, end_percent))


NODES = [NegativeAttentionGuidance]
