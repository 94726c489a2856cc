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

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import rules
from .checks import number
from .schedule import Role, SigmaWindow, StepPlan, plan_step


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

    def __post_init__(self):
        if self.rule.needs_uncond and not self.has_uncond:
            raise ValueError(f"the {self.rule.name} rule needs an unconditional (empty prompt) conditioning")

    @property
    def needs_sigma(self) -> bool:
        """Whether a step's plan depends on its sigma (False: no window, no sigma read at all)."""
        return (
            self.rule.reads_sigma
            or not self.primary_window.always
            or any(not e.window.always for e in self.extras if e.weight != 0.0)
        )

    def plan(
        self,
        sigma: float | None,
        *,
        has_primary: bool = True,
        primary_term_needed: bool = True,
        keep_primary: bool = False,
        call_index: int = 0,
        state: rules.RunState = None,
    ) -> StepPlan:
        """The step's plan; ``call_index`` counts model evaluations since the run started. With a
        cached negative (and its run ``state``), the branches it can rebuild are marked reused."""
        plan = plan_step(
            sigma,
            self.primary_window,
            [e.window for e in self.extras],
            skip=[e.weight == 0.0 for e in self.extras],
            guidance_off=self.rule.guidance_off(sigma, call_index),
            force_uncond=self.rule.needs_uncond,
            has_primary=has_primary,
            has_uncond=self.has_uncond,
            primary_term_needed=primary_term_needed,
            keep_primary=keep_primary,
        )
        if not self.rule.caches_negatives or state is None:
            return plan
        state["now"] = call_index
        if not self.rule.reuses(call_index):
            return plan
        return dataclasses.replace(plan, reused=tuple(k for k in plan.needed if k in state["diff"]))

    def complete(self, plan: StepPlan, state: rules.RunState, pos: torch.Tensor, sigma: torch.Tensor, primary=None, uncond=None,
                 extras: Sequence[torch.Tensor] = ()) -> tuple:
        """The predictions a step's combine needs, from those the model made (``extras`` for
        ``plan.predict_extras``): a cached negative rebuilds the reused ones and remembers the rest.
        Returns ``(primary, uncond, extras)``, the extras for ``plan.extras``."""
        made = dict(zip(plan.predict_extras, extras))
        if not self.rule.caches_negatives or state is None:
            return primary, uncond, [made[i] for i in plan.extras]
        rule = self.rule
        values = {"primary": primary, "uncond": uncond, **made}
        for key in plan.needed:
            if key in plan.reused:
                values[key] = rule.rebuild(state, key, pos, sigma)
            else:
                rule.remember(state, key, pos, values[key], sigma)
        return values.get("primary"), values.get("uncond"), [values[i] for i in plan.extras]


def _pick(role: Role | None, pos, primary, uncond) -> torch.Tensor:
    chosen = {"primary": primary, "uncond": uncond, "positive": pos}[role]
    if chosen is None:
        raise ValueError(f"the step plan uses the {role} prediction but it was not computed")
    return chosen


def outside_as_reference(prediction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """An extra negative's prediction with its reference where the host predicted nothing.

    Where no entry of a conditioning reaches (a mask or an area that leaves part of the latent out)
    the host's prediction is exactly zero in every channel; a NOT term measured from zero would push
    that region by ``w * D_ref``. There the negative is taken to say nothing: its term is zero.
    """
    covered = (prediction != 0).any(dim=1, keepdim=True)
    return torch.where(covered, prediction, reference)


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
    if plan.negative == "positive" and not plan.extras:
        return pos
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
