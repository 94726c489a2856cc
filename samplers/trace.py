"""A per-step record of what the guidance did: small previews and a few statistics.

Recording is cheap by construction: per model evaluation it keeps three previews (positive,
primary negative, guided clean-image predictions) pooled to at most ``preview_size`` latent pixels
a side, of the first ``keep`` samples, in float16, copied to the CPU with ``non_blocking=True``;
and four statistics per evaluation computed on the device and stacked, read back once when the
run ends. No per-step host-device synchronisation is added (the copies complete by the time the
trace is read, after sampling).

Statistics, per evaluation, averaged over the kept samples (RMS over all non-batch dims):

- ``pos_norm``: RMS of the positive direction ``D_pos - x`` (where the positive steers),
- ``neg_norm``: RMS of the negative direction ``D_neg - x`` (0 where no negative was computed),
- ``cosine``: cosine between the two directions,
- ``neg_share``: RMS of the negative term ``D - D_pos`` over RMS of the whole step ``D - x``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checks import number

STATS = ("pos_norm", "neg_norm", "cosine", "neg_share")


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.float().pow(2).mean(dim=tuple(range(1, t.ndim))).sqrt()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.float().flatten(1), b.float().flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def step_stats(x, pos, neg, guided) -> torch.Tensor:
    """The four statistics of one evaluation, per sample, as a [B, 4] float32 tensor on the device."""
    pos_dir = pos - x
    step = guided - x
    if neg is None:
        zeros = torch.zeros(x.shape[0], device=x.device)
        return torch.stack([_rms(pos_dir), zeros, zeros, _rms(guided - pos) / _rms(step).clamp_min(1e-12)], 1)
    neg_dir = neg - x
    return torch.stack([
        _rms(pos_dir), _rms(neg_dir), _cosine(pos_dir, neg_dir), _rms(guided - pos) / _rms(step).clamp_min(1e-12),
    ], 1)


def preview(t: torch.Tensor, size: int, keep: int) -> torch.Tensor:
    """Pool a latent prediction to at most ``size`` pixels a side (video: its middle frame), float16, on the CPU."""
    t = t[:keep].detach()
    if t.ndim == 5:  # [B, C, T, H, W]
        t = t[:, :, t.shape[2] // 2]
    if t.ndim == 4 and max(t.shape[-2:]) > size:
        h, w = t.shape[-2:]
        scale = size / max(h, w)
        t = torch.nn.functional.adaptive_avg_pool2d(t.float(), (max(1, round(h * scale)), max(1, round(w * scale))))
    return t.to(torch.float16).to("cpu", non_blocking=True)


@dataclass
class TraceStep:
    """One model evaluation: its sigma, what was active, and its previews."""

    index: int
    sigma: torch.Tensor
    negative: str
    extras: int
    pos: torch.Tensor
    neg: torch.Tensor | None
    guided: torch.Tensor


@dataclass
class Trace:
    """The record of one sampling run (``record`` during the run, ``finish`` after it)."""

    preview_size: int = 64
    keep: int = 1
    rule: str = "CFG"
    steps: list = field(default_factory=list)
    stats: torch.Tensor | None = None  # [evaluations, 4], on the CPU once finished
    fingerprint: tuple | None = None
    meta: dict = field(default_factory=dict)
    _pending_stats: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        number("preview_size", self.preview_size, 4, 1024, whole=True)
        number("keep", self.keep, 1, 64, whole=True)

    def reset(self, rule: str = "CFG") -> None:
        """Start a new run with nothing recorded (a guider sampled twice records its last run)."""
        self.rule = rule
        self.steps, self.stats, self.fingerprint, self._pending_stats = [], None, None, []

    def record(self, x, sigma, pos, neg, guided, negative: str = "primary", extras: int = 0) -> None:
        """Record one evaluation (``neg`` is None where no negative was predicted)."""
        k = self.keep
        self._pending_stats.append(step_stats(x[:k], pos[:k], None if neg is None else neg[:k], guided[:k]).mean(0))
        self.steps.append(TraceStep(
            index=len(self.steps),
            sigma=sigma.reshape(-1)[:1].detach().to("cpu", non_blocking=True),
            negative=negative,
            extras=extras,
            pos=preview(pos, self.preview_size, k),
            neg=None if neg is None else preview(neg, self.preview_size, k),
            guided=preview(guided, self.preview_size, k),
        ))

    def finish(self, result: torch.Tensor | None = None) -> None:
        """Read everything back once (the only sync of the trace) and fingerprint the run's output."""
        if self._pending_stats:
            self.stats = torch.stack(self._pending_stats).to("cpu")
            self._pending_stats = []
        elif self.stats is None:
            self.stats = torch.zeros(0, len(STATS))
        if result is not None:
            self.fingerprint = fingerprint(result)

    @property
    def sigmas(self) -> list:
        return [float(s.sigma[0]) for s in self.steps]

    def memory_bytes(self) -> int:
        tensors = [t for s in self.steps for t in (s.pos, s.neg, s.guided) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors) + (0 if self.stats is None else self.stats.numel() * 4)


def fingerprint(latent: torch.Tensor) -> tuple:
    """Shape and a few sums of a latent: enough to tell which run produced it."""
    t = latent.detach().float()
    return tuple(t.shape), round(float(t.sum()), 3), round(float(t.abs().sum()), 3)


def bytes_per_evaluation(channels: int, latent_h: int, latent_w: int, preview_size: int = 64, keep: int = 1) -> int:
    """Memory a trace keeps per model evaluation: three float16 previews plus the statistics."""
    scale = min(1.0, preview_size / max(latent_h, latent_w))
    h, w = max(1, round(latent_h * scale)), max(1, round(latent_w * scale))
    return 3 * keep * channels * h * w * 2 + len(STATS) * 4
