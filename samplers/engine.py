"""The negative-guidance engine: one description of the negatives, one plan a step, one combine.

The host glue (``nodes/hooks.py``), the toy sampler and the benchmarks all call these functions;
nothing here knows ComfyUI. A step runs in three parts:

1. ``GuidanceSpec.plan(sigma, ...)`` says which branches to predict (``StepPlan``), before any
   model call, so a negative outside its window is never computed;
2. the caller predicts exactly those branches (ComfyUI: in one ``calc_cond_batch`` call);
3. ``combine_step(spec, plan, state, ...)`` combines them with the spec's rule (plain CFG by default):
   ``D = D_neg + scale * (D_pos - D_neg) - sum_i w_i * (D_neg_i - D_ref)``.

The first term is classifier-free guidance (Ho & Salimans 2022) with the primary negative in
place of the unconditional prediction, as every ComfyUI sampler does; the sum is Composable
Diffusion's NOT (Liu et al. 2022) over the extra negatives active at this step, measured from
``D_ref``: the unconditional prediction when an unconditional conditioning is connected, else the
primary negative's prediction (usually the empty or general-purpose negative prompt).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import rules
from .checks import number
from .schedule import Role, SigmaWindow, StepPlan


@dataclass(frozen=True)
class ExtraNegative:
    """One extra negative: its weight and the sigma window in which it is active.

    A weight of 0 makes it inactive everywhere: its branch is never predicted.
    """

    weight: float
    window: SigmaWindow = field(default_factory=SigmaWindow)

    def __post_init__(self):
        number("weight", self.weight, owner="extra negative")


@dataclass(frozen=True)
class GuidanceSpec:
    """Everything about the negatives of one sampling run that does not change between steps."""

    primary_window: SigmaWindow = field(default_factory=SigmaWindow)
    extras: tuple[ExtraNegative, ...] = ()
    has_uncond: bool = False
    rule: rules.Rule = field(default_factory=rules.CFG)
    flow: bool = False  # the model is a flow-matching one (rules that leave denoised space need to know)
    sampler_negative: bool = True  # the sampler has a negative prompt of its own

    def __post_init__(self):
        if self.rule.needs_uncond and not self.has_uncond:
            raise ValueError(f"the {self.rule.name} rule needs an unconditional (empty prompt) conditioning")

    @functools.cached_property
    def nesting(self) -> rules.Nesting:
        return rules.nest(self.rule)

    @property
    def needs_sigma(self) -> bool:
        """Whether a step's plan depends on its sigma (False: no window, no sigma read at all)."""
        return (
            self.nesting.reads_sigma
            or not self.primary_window.always
            or any(not e.window.always for e in self.extras if e.weight != 0.0)
        )

    def plan(self, sigma: float | None, *, scale: float, call_index: int = 0, state: rules.RunState = None,
             asked: frozenset = frozenset()) -> StepPlan:
        """The plan of model evaluation ``call_index`` of the run at ``sigma`` with guidance scale ``scale``
        (docs/internals.md, "What a step computes"). ``asked`` names the branches another node made the host
        predict (the sampler's negative at cfg 1); with a cached negative and its run ``state``, the branches it
        can rebuild are marked rebuilt."""
        cache = self.nesting.cache
        rebuilt = cache is not None and state is not None and cache.reuses(call_index, sigma, state)
        if self.nesting.skipped(sigma, call_index):
            return StepPlan(status={}, negative="positive", reference=None)
        extras = tuple(i for i, e in enumerate(self.extras) if e.weight != 0.0 and e.window.contains(sigma))
        primary_on = self.sampler_negative and self.primary_window.contains(sigma)
        main_term = not math.isclose(scale, 1.0)  # at cfg 1, D_neg + 1 * (D_pos - D_neg) is D_pos
        reference = None
        if extras:
            reference = "uncond" if self.has_uncond else ("primary" if self.sampler_negative else "positive")
        primary = (primary_on and (main_term or "primary" in asked)) or reference == "primary"
        if primary_on and primary:
            negative = "primary"
        elif self.has_uncond and main_term and not primary_on:
            negative = "uncond"
        else:
            negative = "positive"
        uncond = "uncond" in (negative, reference) or (self.has_uncond and self.rule.needs_uncond)
        needed = (("primary",) if primary else ()) + (("uncond",) if uncond else ()) + extras
        return StepPlan(
            status={k: "rebuilt" if rebuilt and k in state["diff"] else "predicted" for k in needed},
            negative=negative, reference=reference,
        )

    def complete(self, plan: StepPlan, state: rules.RunState, pos: torch.Tensor, sigma: torch.Tensor,
                 predicted: dict, call_index: int = 0) -> tuple:
        """The predictions a step's combine needs, from those the model made (``predicted``, by branch): a cached
        negative rebuilds the rebuilt ones and remembers the rest; an extra takes its reference where its
        conditioning does not reach (``covered``), on rebuilt evaluations where it last reached.
        Returns ``(primary, uncond, extras)``, the extras for ``plan.extras``."""
        values = dict(predicted)
        cover = {i: covered(values[i]) for i in plan.extras if plan.of(i) == "predicted"}
        cache = self.nesting.cache
        if cache is not None and state is not None:
            state["now"] = call_index
            for key in plan.needed:
                if plan.of(key) == "rebuilt":
                    values[key] = cache.rebuild(state, key, pos, sigma)
                    cover[key] = state["cover"].get(key) if isinstance(key, int) else None
                else:
                    cache.remember(state, key, pos, values[key], sigma)
                    if isinstance(key, int):
                        state["cover"][key] = cover[key]
        reference = _pick(plan.reference, pos, values.get("primary"), values.get("uncond")) if plan.extras else None
        extras = [values[i] if cover.get(i) is None else torch.where(cover[i], values[i], reference) for i in plan.extras]
        return values.get("primary"), values.get("uncond"), extras


def _pick(role: Role | None, pos, primary, uncond) -> torch.Tensor:
    chosen = {"primary": primary, "uncond": uncond, "positive": pos}[role]
    if chosen is None:
        raise ValueError(f"the step plan uses the {role} prediction but it was not computed")
    return chosen


def covered(prediction: torch.Tensor) -> torch.Tensor:
    """Where a conditioning reaches: the host predicts exactly zero in every channel where no entry of it does
    (a mask or an area that leaves part of the latent out). There an extra negative says nothing: it takes its
    reference's prediction, so its NOT term is zero."""
    return (prediction != 0).any(dim=1, keepdim=True)


def negative_for(plan: StepPlan, pos, primary=None, uncond=None) -> torch.Tensor:
    """The prediction that plays the primary negative at this step (never a zero stand-in)."""
    return _pick(plan.negative, pos, primary, uncond)


def combine_step(
    spec: GuidanceSpec,
    plan: StepPlan,
    state: rules.RunState,
    *,
    scale: float,
    pos: torch.Tensor,
    primary: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    extras: Sequence[torch.Tensor] = (),
    x: torch.Tensor | None = None,
    sigma: torch.Tensor | None = None,
    sample_sigmas: torch.Tensor | None = None,
    neg: torch.Tensor | None = None,
    primary_combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Combine one step's predictions into the guided prediction (denoised space).

    ``extras`` holds the predictions of the active extra negatives, in the order of
    ``plan.extras``. ``neg`` overrides the prediction the plan picks for the negative (the host
    passes the one its pre-cfg hooks returned). ``primary_combine(pos, neg)`` lets another node's
    CFG-like function own the main term; only the default rule accepts that. ``x``, ``sigma`` and
    ``sample_sigmas`` are needed by rules that work outside denoised space (rescale, CFG-Zero*).
    """
    if len(extras) != len(plan.extras):
        raise ValueError(f"the plan has {len(plan.extras)} active extra negatives, got {len(extras)} predictions")
    if neg is None:
        neg = negative_for(plan, pos, primary, uncond)
    weights = [spec.extras[i].weight for i in plan.extras]
    reference = _pick(plan.reference, pos, primary, uncond) if plan.extras else None
    if primary_combine is not None:
        if spec.rule.owns_combine:
            raise ValueError(f"the {spec.rule.name} rule owns the combine step; it cannot share it")
        return rules.composable_not(primary_combine(pos, neg), extras, weights, reference)
    inputs = rules.StepInputs(x=x, sigma=sigma, pos=pos, neg=neg, scale=scale, uncond=uncond, extras=extras,
                              extra_weights=weights, reference=reference, sample_sigmas=sample_sigmas,
                              negative_role=plan.negative, flow=spec.flow)
    return spec.rule.combine(inputs, state)
