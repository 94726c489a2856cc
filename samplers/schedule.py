"""Step windows and the per-step plan of which branches the model must predict.

A window is given in percent of the schedule, as ComfyUI's ``ConditioningSetTimestepRange``
does: ``start_percent=0`` is the first (noisiest) step, ``end_percent=1`` the last. The host
glue turns percents into sigmas with the model's own ``percent_to_sigma``; from then on a window
is a closed sigma interval ``[sigma_end, sigma_start]`` and the rule for "active" is the host's
(a conditioning is skipped when ``sigma > sigma_start`` or ``sigma < sigma_end``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from .checks import ParameterError, number

Role = Literal["primary", "uncond", "positive"]
"""Which prediction plays the primary negative (or the extra negatives' reference) at a step: the
sampler's negative, the unconditional branch, or the positive itself (no guidance from that term)."""
ROLES = get_args(Role)
Branch = Literal["primary", "uncond"] | int
"""A branch besides the positive: the primary negative, the unconditional one, or an extra's index."""
Status = Literal["predicted", "rebuilt", "absent"]
STATUSES = get_args(Status)


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
    """Which branches one model evaluation has, and what plays each role in the combine.

    ``status`` gives every branch besides the positive (``"primary"``, ``"uncond"``, each extra's index)
    one status: ``"predicted"`` by the model, ``"rebuilt"`` from a cache (``rules.CachedNegative``), or
    ``"absent"``. ``negative`` names what plays the main negative: ``"primary"`` (the sampler's negative),
    ``"uncond"`` (the unconditional prompt, outside the main window) or ``"positive"`` (no main term: the
    step moves along the positive). ``reference`` is the D_ref of the extras' NOT terms (``None`` when no
    extra is active). The meaning of each case is docs/internals.md, "What a step computes".
    """

    status: dict
    negative: Role
    reference: Role | None

    def __post_init__(self):
        if self.negative not in ROLES or (self.reference is not None and self.reference not in ROLES):
            raise ValueError(f"a step plan's roles are {ROLES}, got {self.negative!r} and {self.reference!r}")
        if any(v not in STATUSES for v in self.status.values()):
            raise ValueError(f"a branch's status is one of {STATUSES}, got {self.status}")
        for role in (self.negative, self.reference):
            if role not in (None, "positive") and self.of(role) == "absent":
                raise ValueError(f"the plan gives the {role} branch a role but does not have it")
        if self.extras and self.reference is None:
            raise ValueError("active extra negatives need a reference")

    def of(self, branch: Branch) -> Status:
        return self.status.get(branch, "absent")

    def having(self, *statuses: Status) -> tuple:
        return tuple(k for k, v in self.status.items() if v in statuses)

    @property
    def needed(self) -> tuple:
        """Every branch the combine uses besides the positive, predicted or rebuilt."""
        return self.having("predicted", "rebuilt")

    @property
    def extras(self) -> tuple[int, ...]:
        """The active extra negatives, in the spec's order."""
        return tuple(k for k in self.needed if isinstance(k, int))

    @property
    def branches(self) -> int:
        """Model branches this evaluation costs, the positive included (a rebuilt branch costs none)."""
        return 1 + len(self.having("predicted"))
