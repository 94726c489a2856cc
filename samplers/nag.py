"""Normalized Attention Guidance (Chen et al. 2025): a negative prompt inside cross-attention.

For the attention outputs of one layer under the positive context, ``Z+``, and under the negative
context, ``Z-`` (same queries), NAG extrapolates, bounds the result's norm and blends it back:

    Z~ = s * Z+ - (s - 1) * Z-
    Z^ = Z~ * min(1, tau * |Z+| / |Z~|)          (per token: norms over the feature dimension)
    out = alpha * Z^ + (1 - alpha) * Z+

so a few-step or distilled model run at cfg 1 still moves away from the negative, in the same
forward as the positive. ``norm`` picks the token norm: ``"L2"`` (the default) or ``"L1"`` (what
the ComfyUI port uses); the ratio ``|Z~| / |Z+|`` is what ``tau`` bounds either way.
"""
from __future__ import annotations

import math

import torch

NORMS = {"L2": 2, "L1": 1}


def nag(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float, tau: float, alpha: float,
        norm: str = "L2") -> torch.Tensor:
    """The NAG combine of two attention outputs ``[batch, tokens, features]`` (any float dtype)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
    p = NORMS[norm]
    pos, neg = z_pos.float(), z_neg.float()
    guided = pos * scale - neg * (scale - 1.0)
    norm_pos = pos.norm(p=p, dim=-1, keepdim=True)
    norm_guided = guided.norm(p=p, dim=-1, keepdim=True)
    ratio = norm_guided / norm_pos.clamp_min(1e-12)
    bounded = torch.where(ratio > tau, guided * (tau / ratio.clamp_min(1e-12)), guided)
    return (bounded * alpha + pos * (1.0 - alpha)).to(z_pos.dtype)


def check_parameters(scale: float, tau: float, alpha: float) -> None:
    """Raise ``ValueError`` naming the first parameter out of range."""
    for name, value, low, high in (("scale", scale, 1.0, 100.0), ("tau", tau, 1.0, 100.0), ("alpha", alpha, 0.0, 1.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
