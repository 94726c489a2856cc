"""Combine rules: how the step's predictions become one guided prediction.

Every function here works in *denoised* space (predictions of the clean image, as ComfyUI's
pre/post-cfg hooks see them), keeps the input dtype and device, and never reads a tensor back to
the host. Rules beyond plain CFG (Perp-Neg, APG, rescale, ...) join this module with the same
shape of signature.
"""
from __future__ import annotations

from typing import Sequence

import torch


def cfg(pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ``D_neg + scale * (D_pos - D_neg)``.

    Written exactly as ComfyUI's ``cfg_function`` writes it, so the result is bit-identical to
    the host's for the same tensors.
    """
    return neg + (pos - neg) * scale


def composable_not(
    guided: torch.Tensor,
    negatives: Sequence[torch.Tensor],
    weights: Sequence[float],
    reference: torch.Tensor,
) -> torch.Tensor:
    """Composable Diffusion's NOT terms (Liu et al. 2022, eq. 12), added to a guided prediction.

    ``guided - sum_i w_i * (D_neg_i - D_ref)``: each extra negative pushes the step away from its
    own prediction, measured from the reference prediction ``D_ref`` (the pack uses the
    unconditional branch when one is connected, else the primary negative). A positive weight
    removes the concept; a negative weight pulls towards it (Composable Diffusion's AND).
    An extra negative equal to the reference, or with weight 0, leaves ``guided`` unchanged.
    """
    if len(negatives) != len(weights):
        raise ValueError(f"composable_not: {len(negatives)} negatives but {len(weights)} weights")
    out = guided
    for pred, weight in zip(negatives, weights):
        if weight != 0.0:
            out = out - (pred - reference) * weight
    return out
