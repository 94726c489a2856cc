"""Step windows and the per-step plan of which branches the model must predict.

A window is given in percent of the schedule, as ComfyUI's ``ConditioningSetTimestepRange``
does: ``start_percent=0`` is the first (noisiest) step, ``end_percent=1`` the last. The host
glue turns percents into sigmas with the model's own ``percent_to_sigma``; from then on a window
is a closed sigma interval ``[sigma_end, sigma_start]`` and the rule for "active" is the host's
(a conditioning is skipped when ``sigma > sigma_start`` or ``sigma < sigma_end``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from .checks import ParameterError, number

Role = Literal["primary", "uncond", "positive"]
"""Which prediction plays the primary negative (or the extra negatives' reference) at a step: the
sampler's negative, the unconditional branch, or the positive itself (no guidance from that term)."""
ROLES = get_args(Role)
Branch = Literal["primary", "uncond"] | int
"""A branch besides the positive: the primary negative, the unconditional one, or an extra's index."""


@dataclass(frozen=True)
class SigmaWindow:
    """Closed sigma interval in which a negative is active; the default is every step."""

    sigma_start: float = math.inf
    sigma_end: float = -math.inf

    @property
    def always(self) -> bool:
        return self.sigma_start == math.inf and self.sigma_end == -math.inf

    def contains(self, sigma: float | None) -> bool:
        """True when ``sigma`` lies in the window (``None``, an unknown sigma, only fits the whole schedule)."""
        if self.always:
            return True
        if sigma is None:
            raise ValueError("a window that is not the whole schedule needs the step's sigma")
        return not (sigma > self.sigma_start or sigma < self.sigma_end)


def check_percent_window(start_percent: float, end_percent: float, what: str | None = None, prefix: str = "") -> None:
    """Raise ``ParameterError`` unless ``0 <= start <= end <= 1``, both finite; names are ``prefix`` +
    ``start_percent``/``end_percent``, and ``what`` (optional) says whose window it is."""
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        number(prefix + name, value, 0, 1, hint=" (a fraction of the schedule)", owner=what)
    if start_percent > end_percent:
        raise ParameterError(
            prefix + "start_percent",
            f"must not be after {prefix}end_percent ({end_percent}): the window runs from start (0 = first step) "
            "to end (1 = last step)", repr(start_percent), what,
        )


def is_full_window(start_percent: float, end_percent: float) -> bool:
    return start_percent <= 0.0 and end_percent >= 1.0


@dataclass(frozen=True)
class StepPlan:
    """Which branches one step predicts, and what plays each role in the combine.

    ``negative`` names the prediction used as the primary negative: ``"primary"`` (the sampler's
    negative), ``"uncond"`` (the unconditional fallback, outside the primary window) or
    ``"positive"`` (no guidance from the primary term: the step moves along the positive alone).
    ``reference`` is the D_ref of the extra negatives' NOT terms (``None`` when none is active).
    ``reused`` names the needed branches rebuilt from a cache instead of predicted (``"primary"``,
    ``"uncond"``, an extra's index); see ``rules.CachedNegative``.
    """

    primary: bool
    uncond: bool
    extras: tuple[int, ...]
    negative: Role
    reference: Role | None
    reused: tuple[Branch, ...] = ()

    def __post_init__(self):
        if self.negative not in ROLES or (self.reference is not None and self.reference not in ROLES):
            raise ValueError(f"a step plan's roles are {ROLES}, got {self.negative!r} and {self.reference!r}")

    @property
    def needed(self) -> tuple:
        """Every branch the combine needs besides the positive: ``"primary"``, ``"uncond"``, extra indices."""
        return (("primary",) if self.primary else ()) + (("uncond",) if self.uncond else ()) + self.extras

    @property
    def predict_primary(self) -> bool:
        return self.primary and "primary" not in self.reused

    @property
    def predict_uncond(self) -> bool:
        return self.uncond and "uncond" not in self.reused

    @property
    def predict_extras(self) -> tuple:
        return tuple(i for i in self.extras if i not in self.reused)

    @property
    def branches(self) -> int:
        """Model branches this step costs, the positive included (a reused branch costs none)."""
        return 1 + int(self.predict_primary) + int(self.predict_uncond) + len(self.predict_extras)


def plan_step(
    sigma: float | None,
    primary_window: SigmaWindow,
    extra_windows: Sequence[SigmaWindow],
    *,
    has_primary: bool = True,
    has_uncond: bool = False,
    primary_term_needed: bool = True,
    keep_primary: bool = False,
    skip: Sequence[bool] = (),
    guidance_off: bool = False,
    force_uncond: bool = False,
) -> StepPlan:
    """Decide, before the model is called, which branches a step needs.

    - The primary negative is predicted while its window is active and its term matters
      (``primary_term_needed`` is False at cfg == 1, where ``D_neg + 1*(D_pos - D_neg) = D_pos``),
      when it is the reference of an active extra negative, or when ``keep_primary`` says another
      node asked the host for it.
    - Outside the primary window the unconditional branch stands in for it when one is connected;
      otherwise the step has no primary guidance (never a zero prediction).
    - An extra negative is predicted only inside its own window (never when ``skip[i]``).
    - The reference of the extra negatives is the unconditional branch when connected, else the
      primary negative.
    - ``guidance_off`` (a rule's skipped step) predicts the positive alone; ``force_uncond`` (a
      rule that needs the unconditional branch, e.g. Perp-Neg) predicts it on every guided step.
    """
    if guidance_off:
        return StepPlan(primary=False, uncond=False, extras=(), negative="positive", reference=None)
    skip = tuple(skip) or (False,) * len(extra_windows)
    extras = tuple(i for i, w in enumerate(extra_windows) if not skip[i] and w.contains(sigma))
    primary_active = has_primary and primary_window.contains(sigma)

    reference = None
    if extras:
        reference = "uncond" if has_uncond else ("primary" if has_primary else "positive")

    primary = (primary_active and (primary_term_needed or keep_primary)) or reference == "primary"
    if primary_active and primary:
        negative = "primary"
    elif has_uncond and primary_term_needed and not primary_active:
        negative = "uncond"
    else:
        negative = "positive"
    uncond = negative == "uncond" or reference == "uncond" or (has_uncond and force_uncond)
    return StepPlan(primary=primary, uncond=uncond, extras=extras, negative=negative, reference=reference)
