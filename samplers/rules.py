"""Combine rules: how one step's predictions become the guided prediction.

Each rule is a pure function on tensors (any device, any dtype; reductions per sample over every
non-batch dimension, in float32, cast back, saturating at the dtype's range), wrapped by a small frozen class that validates its
parameters at construction, says what the step plan needs from it (an unconditional branch, the
step's sigma) and keeps its per-run state outside itself (``new_state()``), so one rule object can
serve many runs. Everything works in *denoised* space (the host's pre/post-cfg space) unless the
paper defines another; then the conversion is explicit (``to_noise``, ``to_v``).
"""
from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, TypedDict

import torch

from .checks import ParameterError, number
from .schedule import Branch, Role

TINY = 1e-12


# ---------------------------------------------------------------------------- tensor helpers


def _dims(t: torch.Tensor) -> tuple:
    return tuple(range(1, t.ndim))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product, keeping dims for broadcasting."""
    return (a * b).sum(dim=_dims(a), keepdim=True)


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample tensor of shape [B] (or a scalar) against ``like``."""
    value = torch.as_tensor(value, device=like.device, dtype=like.dtype)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def up(t: torch.Tensor) -> torch.Tensor:
    """The precision the math runs in: float32, or float64 when the input already is."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def cast_back(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a result to ``dtype``, saturating at its largest finite value instead of inf."""
    if dtype == t.dtype or not dtype.is_floating_point:
        return t.to(dtype)
    limit = torch.finfo(dtype).max
    if limit < torch.finfo(t.dtype).max:
        t = t.clamp(-limit, limit)
    return t.to(dtype)


def project(v: torch.Tensor, onto: torch.Tensor):
    """Split ``v`` into its components parallel and orthogonal to ``onto``, per sample, in float32.

    A zero ``onto`` has no direction: the parallel part is then zero and ``v`` is all orthogonal.
    """
    v32, o32 = up(v), up(onto)
    norm2 = _dot(o32, o32)
    coef = torch.where(norm2 > TINY, _dot(v32, o32) / norm2.clamp_min(TINY), torch.zeros_like(norm2))
    parallel = coef * o32
    return cast_back(parallel, v.dtype), cast_back(v32 - parallel, v.dtype)


def to_noise(x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The noise direction ``x - D``: sigma * epsilon for eps models, sigma * velocity for flow models."""
    return x - denoised


def to_v(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Denoised prediction to v-prediction (Salimans & Ho 2022) for a k-diffusion input ``x``.

    The space in which Lin et al. (2023) rescale, and in which ComfyUI's RescaleCFG works.
    """
    s = _per_sample(sigma, x)
    return (x / (s * s + 1.0) - denoised) * (s * s + 1.0).sqrt() / s


def from_v(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = _per_sample(sigma, x)
    return x / (s * s + 1.0) - v * s / (s * s + 1.0).sqrt()


# ---------------------------------------------------------------------------- pure rules


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
    reference: torch.Tensor | None,
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


def perp_neg(
    pos: torch.Tensor,
    uncond: torch.Tensor,
    negatives: Sequence[torch.Tensor],
    weights: Sequence[float],
    scale: float,
) -> torch.Tensor:
    """Perp-Neg (Armandpour et al. 2023, eq. 9): negatives act only perpendicular to the positive.

    ``D = D_u + scale * (D_pos - D_u) - sum_i w_i * perp(D_neg_i - D_u, D_pos - D_u)``, where
    ``perp`` removes the component along the positive direction *per sample* (ComfyUI's
    ``perp_neg`` projects over the whole batch at once, which mixes samples). A zero positive
    direction leaves each negative direction whole.
    """
    pos_dir = pos - uncond
    out = uncond + pos_dir * scale
    for neg, weight in zip(negatives, weights):
        if weight != 0.0:
            _, perp = project(neg - uncond, pos_dir)
            out = out - perp * weight
    return out


def apg(
    pos: torch.Tensor,
    neg: torch.Tensor,
    scale: float,
    eta: float,
    norm_threshold: float,
    momentum: float,
    running: torch.Tensor | None,
):
    """Adaptive Projected Guidance (Sadat et al. 2024, Algorithm 1), in denoised space.

    ``diff = D_pos - D_neg``; with momentum ``beta``, ``diff <- diff + beta * running`` (the paper
    uses beta = -0.5); its per-sample norm is capped at ``norm_threshold`` (r); it is split against
    ``D_pos`` into parallel and orthogonal parts and ``D = D_pos + (scale - 1) * (orth + eta * par)``.
    At eta = 1, r = 0 (off) and no momentum this is plain CFG. Returns ``(D, running)``.
    """
    diff = up(pos) - up(neg)
    if momentum != 0.0:
        diff = diff if running is None else diff + momentum * running
        running = diff
    if norm_threshold > 0.0:
        norm = diff.norm(p=2, dim=_dims(diff), keepdim=True)
        diff = diff * torch.clamp(norm_threshold / norm.clamp_min(TINY), max=1.0)
    parallel, orthogonal = project(diff, up(pos))
    update = orthogonal + parallel * eta
    return cast_back(up(pos) + update * (scale - 1.0), pos.dtype), running


def rescale(guided: torch.Tensor, pos: torch.Tensor, phi: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023, eq. 15-16): match the guided output's per-sample std to the positive's.

    ``phi * guided * std(pos) / std(guided) + (1 - phi) * guided``, std over every non-batch
    dimension (unbiased, as the paper's code and ComfyUI compute it). Apply it in the space the
    model predicts in (the pack uses v-prediction space, as ComfyUI's RescaleCFG does).
    """
    g32, p32 = up(guided), up(pos)
    std_pos = p32.std(dim=_dims(p32), keepdim=True)
    std_cfg = g32.std(dim=_dims(g32), keepdim=True)
    ratio = torch.where(std_cfg > TINY, std_pos / std_cfg.clamp_min(TINY), torch.ones_like(std_cfg))
    return cast_back(phi * g32 * ratio + (1.0 - phi) * g32, guided.dtype)


def cfg_zero_star(pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG-Zero* (Fan et al. 2025, eq. 8): CFG against the negative scaled by the optimal ``s*``.

    ``s* = <pos, neg> / |neg|^2`` per sample (float32, +1e-8 as the authors' code), then
    ``s* neg + scale * (pos - s* neg)``. Defined on flow-matching velocities; apply it in the
    noise direction ``x - D`` (sigma * velocity for flow models, where ``s*`` is the same).
    """
    p32, n32 = up(pos), up(neg)
    s_star = _dot(p32, n32) / (_dot(n32, n32) + 1e-8)
    scaled = n32 * s_star
    return cast_back(scaled + (p32 - scaled) * scale, pos.dtype)


def dng_posterior(
    p: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    x_prev: torch.Tensor,
    sigma_prev: torch.Tensor,
    base_prev: torch.Tensor,
    neg_prev: torch.Tensor,
    temperature: float,
    offset: float,
    p_min: float,
    p_max: float,
    flow: bool = False,
) -> torch.Tensor:
    """One step of Dynamic Negative Guidance's posterior tracking (Koulischer et al. 2025, sec. 3.3).

    The sample moved from ``x_prev`` (at ``sigma_prev``) to ``x`` (at ``sigma``) by an ancestral
    (DDPM) step: mean ``x_prev + (sigma_down - sigma_prev) * (x_prev - D) / sigma_prev`` and
    variance ``sigma_up^2 = sigma^2 (sigma_prev^2 - sigma^2) / sigma_prev^2``, ``sigma_down^2 =
    sigma^2 - sigma_up^2`` (k-diffusion's ``get_ancestral_step``), with ``D`` the base prediction
    under the base model and the negative's under the negative concept. Both are measured in
    variance-preserving scale (divided by ``1 + sigma^2``), the space of the authors' DDPM code.
    The tracking needs the sampler's noise, as the paper's DDPM sampler has: a deterministic
    sampler lands on the base mean, so the evidence always favours the base. Then, per sample,
    ``p <- clamp(p * exp((-temperature * delta + offset) / (2 var)), p_min, p_max)`` with
    ``delta = |x - mu_neg|^2 - |x - mu_base|^2`` (temperature 1, offset 0: Bayes' rule with the
    Gaussian likelihood ratio). A step that does not lower sigma leaves ``p`` unchanged.

    With ``flow`` the step is k-diffusion's rectified-flow ancestral step (ComfyUI's
    ``sample_euler_ancestral_RF``, eta 1): ``sigma_down = sigma^2 / sigma_prev``, mean
    ``a * (x_prev + (sigma_down - sigma_prev) * (x_prev - D) / sigma_prev)`` with ``a = (1 - sigma) /
    (1 - sigma_down)``, variance ``sigma^2 - (a * sigma_down)^2``; flow latents are already in
    variance-preserving scale.
    """
    x32 = up(x)
    s, s_prev = _per_sample(sigma, x32), _per_sample(sigma_prev, x32)
    if flow:
        sigma_down = s * s / s_prev.clamp_min(TINY)
        alpha = (1.0 - s) / (1.0 - sigma_down).clamp_min(TINY)
        var_up = (s * s - (alpha * sigma_down) ** 2).clamp_min(0.0)
        vp = 1.0
    else:
        var_up = s * s * (s_prev * s_prev - s * s) / (s_prev * s_prev).clamp_min(TINY)
        sigma_down = (s * s - var_up).clamp_min(0.0).sqrt()
        alpha = 1.0
        vp = 1.0 + s * s
    ratio = sigma_down / s_prev.clamp_min(TINY)
    keep = up(x_prev) * (alpha * ratio)  # per-sample scalars first: no extra pass over the latent
    mu_base = keep + up(base_prev) * (alpha * (1.0 - ratio))
    mu_neg = keep + up(neg_prev) * (alpha * (1.0 - ratio))
    var = var_up / vp
    delta = (_dot(x32 - mu_neg, x32 - mu_neg) - _dot(x32 - mu_base, x32 - mu_base)) / vp
    exponent = (-temperature * delta + offset) / (2.0 * var.clamp_min(TINY))
    updated = (up(p).reshape(delta.shape) * exponent.clamp(max=80.0).exp()).clamp(p_min, p_max)
    moved = var > TINY
    return torch.where(moved, updated, up(p).reshape(delta.shape)).reshape(-1)


def dng(base: torch.Tensor, neg: torch.Tensor, p: torch.Tensor, scale: float) -> torch.Tensor:
    """Dynamic negative guidance's combine (Koulischer et al. 2025, eq. 10):
    ``D_base - scale * p / (1 - p) * (D_neg - D_base)``, ``p`` the per-sample posterior of the negative."""
    b32 = up(base)
    odds = _per_sample(up(p) / (1.0 - up(p)), b32)
    return cast_back(b32 - (up(neg) - b32) * odds * scale, base.dtype)


# ---------------------------------------------------------------------------- rule objects


@dataclass
class StepInputs:
    """What a rule sees at one step (denoised space), the plan already applied."""

    x: torch.Tensor
    sigma: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor
    scale: float
    uncond: torch.Tensor | None = None
    extras: Sequence[torch.Tensor] = ()
    extra_weights: Sequence[float] = ()
    reference: torch.Tensor | None = None
    sample_sigmas: torch.Tensor | None = None
    negative_role: Role = "primary"
    flow: bool = False  # a flow-matching model (SD3, Flux, Wan): x = (1 - sigma) x0 + sigma noise


Fit = Literal["ok", "never", "everywhere"]
"""How a rule's sigma thresholds meet a model's sigma range (see ``Rule.fit``)."""


class APGState(TypedDict):
    """APG's momentum over one run: the last (momentum-updated) guidance difference."""

    running: torch.Tensor | None


class DynamicState(TypedDict):
    """Dynamic negative guidance over one run: the per-sample posterior and the last step's inputs."""

    p: torch.Tensor | None
    prev: tuple | None


class CacheState(TypedDict):
    """A cached negative over one run: the inner rule's state, each branch's cached difference (``diff``, a
    tensor or a (low, high) pair), the evaluation it was cached at (``at``), where each extra's conditioning
    reached then (``cover``), the per-sample lengths of its last two measured ``D_pos - D_b`` (``norms``), the current
    evaluation (``now``), where the cadence starts (``start``), the previous evaluation's sigma (``sigma``) and the
    last evaluation it did not rebuild with its sigma (``kept``)."""

    inner: RunState
    diff: dict
    at: dict
    cover: dict
    norms: dict
    now: int
    start: int | None
    sigma: float | None
    kept: tuple


RunState = APGState | DynamicState | CacheState | None
"""What a rule keeps between the steps of one run; made by ``Rule.new_state()``, never kept on the rule."""


@dataclass(frozen=True, kw_only=True)
class Rule(abc.ABC):
    """What every combine rule tells the engine, and its combine.

    Class attributes say what the step plan needs: ``needs_uncond`` (an unconditional branch on every
    guided step), ``reads_sigma`` (decisions depend on the step's sigma), ``owns_combine`` (the rule
    replaces the CFG term, so it cannot share it with another node's cfg function) and
    ``caches_negatives`` (it rebuilds branches instead of predicting them: see ``CachedNegative``).
    """

    name: ClassVar[str]
    needs_uncond: ClassVar[bool] = False
    reads_sigma: ClassVar[bool] = False
    owns_combine: ClassVar[bool] = False
    caches_negatives: ClassVar[bool] = False

    def new_state(self) -> RunState:
        return None

    def skips(self, sigma: float | None, call_index: int) -> bool:
        """Whether this rule itself turns guidance off at this model evaluation (its inner rules aside)."""
        return False

    def fit(self, sigma_min: float, sigma_max: float) -> Fit:
        """How the rule's sigma thresholds meet a model's sigma range: "ok", "never" (guidance off at every
        sigma of the model) or "everywhere" (the rule's skipping covers the whole range)."""
        return "ok"

    @abc.abstractmethod
    def combine(self, s: StepInputs, state: RunState) -> torch.Tensor:
        """The guided prediction of one model evaluation (denoised space); called on every evaluation, those
        without guidance included (``s.negative_role == "positive"``), so that state follows the run."""


def main_term(s: StepInputs, guided) -> torch.Tensor:
    """``guided()``, the rule's main term, where a negative plays in it; ``D_pos`` exactly where none does."""
    return s.pos if s.negative_role == "positive" else guided()


def plain_combine(s: StepInputs) -> torch.Tensor:
    """CFG on the main pair, then Composable Diffusion's NOT terms for the extra negatives."""
    return composable_not(main_term(s, lambda: cfg(s.pos, s.neg, s.scale)), s.extras, s.extra_weights, s.reference)


@dataclass(frozen=True, kw_only=True)
class CFG(Rule):
    """Plain CFG with Composable-Diffusion NOT terms for extra negatives (the default rule)."""

    name = "CFG"

    def combine(self, s: StepInputs, state: RunState) -> torch.Tensor:
        return plain_combine(s)


@dataclass(frozen=True, kw_only=True)
class PerpNeg(Rule):
    """Perp-Neg (Armandpour et al. 2023). Needs the unconditional branch (the ``unconditional``
    input, an empty prompt); the main negative's weight is ``cfg * neg_scale`` as in ComfyUI's
    PerpNegGuider, each extra negative's its own weight."""

    neg_scale: float = 1.0
    name = "Perp-Neg"
    needs_uncond = True
    owns_combine = True

    def __post_init__(self):
        number("neg_scale", self.neg_scale, 0.0, 100.0)

    def combine(self, s: StepInputs, state: RunState) -> torch.Tensor:
        if s.uncond is None:  # a skipped evaluation predicts the positive alone
            return composable_not(s.pos, s.extras, s.extra_weights, s.reference)
        main = [] if s.negative_role == "positive" else [s.neg]
        weights = [s.scale * self.neg_scale] * len(main) + list(s.extra_weights)
        return perp_neg(s.pos, s.uncond, [*main, *s.extras], weights, s.scale)


@dataclass(frozen=True, kw_only=True)
class APG(Rule):
    """Adaptive Projected Guidance (Sadat et al. 2024) on the main pair; extras add NOT terms.

    Defaults follow the paper: eta = 0 (drop the parallel part), momentum beta = -0.5, and the
    norm threshold r = 15 (diffusers' default; the paper tunes r per model). Momentum is updated
    at every model evaluation of one run whose main term has a negative, carried unchanged over those
    without one (as diffusers' guider keeps its buffer while guidance is off), and starts empty at the next run."""

    eta: float = 0.0
    norm_threshold: float = 15.0
    momentum: float = -0.5
    name = "APG"
    owns_combine = True

    def __post_init__(self):
        number("eta", self.eta, -10.0, 10.0)
        number("norm_threshold", self.norm_threshold, 0.0, 1000.0)
        number("momentum", self.momentum, -1.0, 1.0)

    def new_state(self) -> APGState:
        return {"running": None}

    def combine(self, s: StepInputs, state: APGState) -> torch.Tensor:
        guided = s.pos
        if s.negative_role != "positive":
            guided, state["running"] = apg(s.pos, s.neg, s.scale, self.eta, self.norm_threshold, self.momentum,
                                           state["running"])
        return composable_not(guided, s.extras, s.extra_weights, s.reference)


@dataclass(frozen=True, kw_only=True)
class Rescale(Rule):
    """CFG rescale (Lin et al. 2023), phi = 0.7 as the paper recommends, in the space of a model's prediction.

    v-prediction space for the eps and v families, as ComfyUI's RescaleCFG computes it; the
    velocity for flow models, as diffusers rescales their prediction. ComfyUI's RescaleCFG uses
    the v formula on flow models too, where ``x / (1 + sigma^2)`` is not the clean-image scale."""

    phi: float = 0.7
    name = "CFG rescale"
    owns_combine = True

    def __post_init__(self):
        number("phi", self.phi, 0.0, 1.0)

    def combine(self, s: StepInputs, state: RunState) -> torch.Tensor:
        if s.negative_role == "positive" and not s.extras:
            return s.pos
        guided = plain_combine(s)
        if s.flow:  # the model's own prediction, the velocity, is (x - D) / sigma; std ratios ignore the 1/sigma
            return s.x - rescale(to_noise(s.x, guided), to_noise(s.x, s.pos), self.phi)
        v = rescale(to_v(s.x, guided, s.sigma), to_v(s.x, s.pos, s.sigma), self.phi)
        return from_v(s.x, v, s.sigma)


@dataclass(frozen=True, kw_only=True)
class CFGZeroStar(Rule):
    """CFG-Zero* (Fan et al. 2025): optimised scale in the noise direction ``x - D`` and zero-init.

    The first ``zero_init_steps`` steps of the schedule return ``D = x`` (zero velocity: the
    sampler does not move), as the authors' code does for step 0 by default, whether or not a negative
    acts on those steps. On eps models the noise direction is sigma * epsilon and the same formula
    applies to epsilon."""

    zero_init_steps: int = 1
    name = "CFG-Zero*"
    owns_combine = True

    def __post_init__(self):
        number("zero_init_steps", self.zero_init_steps, 0, 1000, whole=True)

    def combine(self, s: StepInputs, state: RunState) -> torch.Tensor:
        main = main_term(s, lambda: s.x - cfg_zero_star(to_noise(s.x, s.pos), to_noise(s.x, s.neg), s.scale))
        guided = composable_not(main, s.extras, s.extra_weights, s.reference)
        if self.zero_init_steps == 0 or s.sample_sigmas is None or len(s.sample_sigmas) < 2:
            return guided
        last = s.sample_sigmas[min(self.zero_init_steps, len(s.sample_sigmas) - 1) - 1]
        zero = _per_sample(s.sigma, s.x) >= last.to(s.x.dtype)
        return torch.where(zero, s.x, guided)


@dataclass(frozen=True, kw_only=True)
class _Wrapping(Rule):
    """A rule around an ``inner`` one (plain CFG if none), which does the combine and keeps its state."""

    inner: Rule | None = None

    @property
    def _rule(self) -> Rule:
        return self.inner if self.inner is not None else CFG()

    @property
    def needs_uncond(self):
        return self._rule.needs_uncond

    @property
    def owns_combine(self):
        return self._rule.owns_combine

    def new_state(self) -> RunState:
        return self._rule.new_state()

    def combine(self, s: StepInputs, state: RunState) -> torch.Tensor:
        return self._rule.combine(s, state)


def _check_inner(inner: Rule | None, why: str) -> None:
    if inner is not None and inner.caches_negatives:
        raise ParameterError("inner", why)


@dataclass(frozen=True, kw_only=True)
class _Skipping(_Wrapping):
    """A rule that turns guidance off on some steps and leaves the combine to ``inner``."""

    reads_sigma = True

    def __post_init__(self):
        _check_inner(self.inner, "must not be a cached negative: connect the skipping rule into the cached "
                     "negative's rule input instead, so the cache sees every evaluation")


@dataclass(frozen=True, kw_only=True)
class MinSigma(_Skipping):
    """AUTOMATIC1111's "negative guidance minimum sigma": below ``min_sigma`` the negative branches
    are skipped on every other model evaluation (A1111 counts evaluations, skipping odd ones), or on
    all of them; a skipped step is the positive prediction alone and costs one branch."""

    min_sigma: float = 0.0
    all_steps: bool = False
    name = "Negative guidance minimum sigma"

    def __post_init__(self):
        number("min_sigma", self.min_sigma, 0.0, 1e4)
        super().__post_init__()

    def skips(self, sigma: float | None, call_index: int) -> bool:
        if self.min_sigma <= 0.0 or sigma is None or not sigma < self.min_sigma:
            return False
        return self.all_steps or call_index % 2 == 1

    def fit(self, sigma_min: float, sigma_max: float) -> Fit:
        if self.min_sigma <= 0.0 or self.min_sigma < sigma_max:
            return "ok"
        return "never" if self.all_steps else "everywhere"


@dataclass(frozen=True, kw_only=True)
class GuidanceInterval(_Skipping):
    """Guidance interval (Kynkäänniemi et al. 2024): guidance only for sigma in (sigma_low, sigma_high];
    elsewhere the positive prediction alone, one branch. The paper's SDXL interval is (0.28, 5.42]."""

    sigma_low: float = 0.28
    sigma_high: float = 5.42
    name = "Guidance interval"

    def __post_init__(self):
        number("sigma_low", self.sigma_low, 0.0, 1e4)
        number("sigma_high", self.sigma_high, 0.0, 1e4)
        super().__post_init__()
        if self.sigma_low >= self.sigma_high:
            raise ParameterError("sigma_low", f"must be below sigma_high ({self.sigma_high})", repr(self.sigma_low))

    def skips(self, sigma: float | None, call_index: int) -> bool:
        return sigma is not None and not (self.sigma_low < sigma <= self.sigma_high)

    def fit(self, sigma_min: float, sigma_max: float) -> Fit:
        return "never" if self.sigma_high < sigma_min or self.sigma_low >= sigma_max else "ok"


@dataclass(frozen=True, kw_only=True)
class CachedNegative(_Wrapping):
    """A cached negative (the CFG-cache of FasterCache, Lv et al. 2024), bounded and adaptive to the step size;
    docs/internals.md item 6 states when an evaluation rebuilds, docs/rules.md why the defaults are these.

    Rebuilt negatives come from their cached difference to the positive, ``d = (D_pos - D_neg) / sigma^sigma_power``,
    grown by ``growth`` per evaluation, and while sigma stays within ``max_log_sigma_drop`` (in ln sigma) of the
    last evaluation that did not rebuild them."""

    every: int = 3
    growth: float = 1.0
    full_start: int = 2
    bands: bool = False
    cutoff: float = 0.25
    high_growth: float = 1.0
    bounded: bool = True
    from_percent: float = 0.0
    from_sigma: float = math.inf
    sigma_power: float = 0.5
    max_log_sigma_drop: float = 0.3
    name = "Cached negative"
    caches_negatives = True

    def __post_init__(self):
        number("every", self.every, 1, 1000, whole=True)
        number("full_start", self.full_start, 0, 1000, whole=True)
        number("growth", self.growth, 0.0, 10.0)
        number("cutoff", self.cutoff, 0.0, 1.0)
        number("high_growth", self.high_growth, 0.0, 10.0)
        number("from_percent", self.from_percent, 0.0, 1.0)
        number("sigma_power", self.sigma_power, 0.0, 2.0)
        if self.max_log_sigma_drop != math.inf:
            number("max_log_sigma_drop", self.max_log_sigma_drop, 0.0, None, hint=" (inf: the fixed cadence)")
        if not (self.from_sigma > 0.0):
            raise ParameterError("from_sigma", "must be above 0 (inf: cache from the start)", repr(self.from_sigma))
        _check_inner(self.inner, "must not be another cached negative")

    @property
    def reads_sigma(self) -> bool:
        return math.isfinite(self.from_sigma) or self.adaptive

    @property
    def adaptive(self) -> bool:
        return math.isfinite(self.max_log_sigma_drop)

    def reuses(self, call_index: int, sigma: float | None, state: CacheState) -> bool:
        """Whether this model evaluation rebuilds the negatives instead of predicting them (docs/internals.md
        item 6); ``state`` keeps where the cadence started and the last evaluation it did not rebuild."""
        previous, state["sigma"] = state["sigma"], sigma
        rebuilds = self._rebuilds(call_index, sigma, previous, state)
        if not rebuilds:
            state["kept"] = (call_index, sigma)
        return rebuilds

    def _rebuilds(self, n: int, sigma: float | None, previous: float | None, state: CacheState) -> bool:
        if self.every <= 1 or n < self.full_start:
            return False
        if state["start"] is None and (sigma is None or sigma <= self.from_sigma):
            state["start"] = n
        last, at = state["kept"]
        if state["start"] is None or n == state["start"] or n - max(last, state["start"]) >= self.every:
            return False
        if not self.adaptive:
            return True
        return (sigma is not None and previous is not None and 0.0 < sigma < previous
                and at <= sigma * math.exp(self.max_log_sigma_drop))

    def new_state(self) -> CacheState:
        return {"inner": self._rule.new_state(), "diff": {}, "at": {}, "cover": {}, "norms": {}, "now": 0,
                "start": None, "sigma": None, "kept": (-1, math.inf)}

    def combine(self, s: StepInputs, state: CacheState) -> torch.Tensor:
        return self._rule.combine(s, state["inner"])

    def remember(self, state: CacheState, key: Branch, pos: torch.Tensor, branch: torch.Tensor,
                 sigma: torch.Tensor) -> None:
        """Keep a predicted branch's difference to the positive, and the lengths of the last two in denoised space."""
        delta = up(pos) - up(branch)
        diff = delta / self._unit(sigma, pos)
        state["diff"][key] = split_bands(diff, self.cutoff) if self.bands else diff
        state["at"][key] = state["now"]
        length = sample_norm(delta)
        state["norms"][key] = (state["norms"].get(key, (length, length))[1], length)

    def rebuild(self, state: CacheState, key: Branch, pos: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """A branch from the positive and its cached difference: ``D = D_pos - sigma^p * growth^j * d``; when
        ``bounded``, ``D_pos - D`` is shortened per sample to the longer of the last two measured."""
        since = state["now"] - state["at"][key]
        cached = state["diff"][key]
        if self.bands:
            low, high = cached
            diff = low * self.growth ** since + high * self.high_growth ** since
        else:
            diff = cached * self.growth ** since
        diff = self._unit(sigma, pos) * diff
        if self.bounded:
            bound = torch.maximum(*state["norms"][key])
            diff = diff * _per_sample((bound / sample_norm(diff).clamp_min(1e-30)).clamp(max=1.0), diff)
        return cast_back(up(pos) - diff, pos.dtype)

    def _unit(self, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _per_sample(up(sigma), up(like)) ** self.sigma_power


FULL_CFG_SAMPLERS: dict[str, str] = {
    "dpm_2": "a negative rebuilt at its midpoint evaluation changes up to 8% of full CFG's pictures on 10 steps",
    "dpm_2_ancestral": "its pictures follow every evaluation's negative: rebuilt, up to 62% of them change",
    "dpm_adaptive": "a negative rebuilt inside its step-size control puts up to 51% more pictures off the data",
    "dpm_fast": "a negative rebuilt between its higher-order evaluations puts up to 82% more pictures off the data",
    "lcm": "it denoises fully and noises again each step: rebuilt, up to 3.7% more pictures keep a mustache at cfg 8",
    "dpmpp_3m_sde": "its third-order history carries every evaluation's negative: rebuilt, up to 7.6% of the pictures "
                    "change (karras, 30 steps)",
    "dpmpp_3m_sde_gpu": "the same sampler as dpmpp_3m_sde, its Brownian tree on the latent's device",
}
"""The host's samplers a cached negative cannot serve at its quality criteria, with why (docs/benchmarks.md, "The
cached negative on every sampler"); on them it runs full CFG and says so in the log."""


def sample_norm(t: torch.Tensor) -> torch.Tensor:
    """The L2 length of each sample (over every dimension but the first)."""
    return t.flatten(1).norm(dim=1)


def split_bands(t: torch.Tensor, cutoff: float) -> tuple:
    """(low, high) spatial-frequency parts of ``t`` over its last two dimensions; they sum to ``t``."""
    if t.ndim < 3 or min(t.shape[-2:]) < 2:
        raise ValueError("the frequency split needs latents with two spatial dimensions")
    spectrum = torch.fft.rfft2(t.float())
    fy = torch.fft.fftfreq(t.shape[-2], device=t.device).abs()[:, None]
    fx = torch.fft.rfftfreq(t.shape[-1], device=t.device)[None, :]
    keep = (torch.maximum(fy, fx) <= cutoff * 0.5).to(spectrum.dtype)
    low = torch.fft.irfft2(spectrum * keep, s=t.shape[-2:]).to(t.dtype)
    return low, t - low


@dataclass(frozen=True)
class Nesting:
    """A rule with its inner rules laid flat: every skipping rule on the way in, the cached negative (at most one,
    outermost) and the innermost rule, which combines. See docs/internals.md, "Rules inside rules"."""

    skipping: tuple[Rule, ...]
    cache: CachedNegative | None
    combiner: Rule

    @property
    def reads_sigma(self) -> bool:
        cache = self.cache is not None and self.cache.reads_sigma
        return cache or any(r.reads_sigma for r in self.skipping) or self.combiner.reads_sigma

    def skipped(self, sigma: float | None, call_index: int) -> bool:
        """Whether any skipping rule of the nesting turns this model evaluation's guidance off."""
        return any(r.skips(sigma, call_index) for r in self.skipping)

    def fit(self, sigma_min: float, sigma_max: float) -> Fit:
        """"never" if one skipping rule never guides on the model, else "everywhere" if one skips the whole range."""
        fits = {r.fit(sigma_min, sigma_max) for r in self.skipping}
        return "never" if "never" in fits else ("everywhere" if "everywhere" in fits else "ok")


def nest(rule: Rule) -> Nesting:
    """Lay a rule and its inner rules flat (the one place nesting is resolved)."""
    skipping, cache = [], None
    while isinstance(rule, _Wrapping):
        if rule.caches_negatives:
            cache = rule
        else:
            skipping.append(rule)
        rule = rule._rule
    return Nesting(tuple(skipping), cache, rule)


@dataclass(frozen=True, kw_only=True)
class DynamicNegative(Rule):
    """Dynamic Negative Guidance (Koulischer et al., ICLR 2025) with a positive prompt.

    The paper removes a class from an *unconditional* model: the base prediction is the
    unconditional one and the negative weight is ``scale * p / (1 - p)``, ``p`` the running
    posterior that the sample shows the negative concept. With a positive prompt the pack takes as
    base the positive's CFG against the empty prompt, ``D_u + cfg * (D_pos - D_u)`` (so it needs
    the ``unconditional`` input), and tracks ``p`` of the main negative against that base; extra
    negatives add plain NOT terms. Defaults: scale 20 and prior 0.01, within the values reported
    for the paper's Stable Diffusion runs; temperature 1 and offset 0 (plain Bayes' rule) and p in
    [1e-6, 0.99], the authors' code defaults. ``prior`` is the share of samples that show the
    concept without the negative: the posterior is only calibrated when it is. On an evaluation without the
    main negative the posterior is kept and its tracking restarts at the next one that has it."""

    scale: float = 20.0
    prior: float = 0.01
    temperature: float = 1.0
    offset: float = 0.0
    p_min: float = 1e-6
    p_max: float = 0.99
    name = "Dynamic negative guidance"
    needs_uncond = True
    owns_combine = True

    def __post_init__(self):
        number("scale", self.scale, 0.0, 1000.0)
        number("temperature", self.temperature, 0.0, 100.0)
        number("offset", self.offset, -1e3, 1e3)
        number("p_min", self.p_min, 0.0, 1.0)
        number("p_max", self.p_max, 0.0, 0.999999)
        if self.p_min > self.p_max:  # before prior, whose range they make
            raise ParameterError("p_min", f"must not exceed p_max ({self.p_max})", repr(self.p_min))
        number("prior", self.prior, self.p_min, self.p_max)

    def new_state(self) -> DynamicState:
        return {"p": None, "prev": None}

    def combine(self, s: StepInputs, state: DynamicState) -> torch.Tensor:
        base = s.pos if s.uncond is None else cfg(s.pos, s.uncond, s.scale)
        if s.negative_role != "primary":  # no evidence on this evaluation; the next transition starts afresh
            state["prev"] = None
            return composable_not(base, s.extras, s.extra_weights, s.reference)
        p = state["p"]
        if p is None or p.shape[0] != s.x.shape[0]:
            p = torch.full((s.x.shape[0],), self.prior, device=s.x.device, dtype=torch.float32)
        if state["prev"] is not None:
            x_prev, sigma_prev, base_prev, neg_prev = state["prev"]
            p = dng_posterior(p, s.x, s.sigma, x_prev, sigma_prev, base_prev, neg_prev,
                              self.temperature, self.offset, self.p_min, self.p_max, flow=s.flow)
        state["p"], state["prev"] = p, (s.x.clone(), s.sigma, base, s.neg)
        guided = dng(base, s.neg, p, self.scale)
        return composable_not(guided, s.extras, s.extra_weights, s.reference)
