"""What a node asks of the engine, and how the request becomes the engine's spec for one run.

A ``GuidanceRequest`` holds the entry points' shared inputs in host terms (conditionings,
percent windows). It is validated when the node runs; when sampling starts, ``resolve_spec``
turns its percents into sigmas with the model's own schedule.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import comfy.model_sampling

from ..samplers import rules
from ..samplers.engine import ExtraNegative, GuidanceSpec
from ..samplers.schedule import SigmaWindow, is_full_window
from ..samplers.trace import Trace
from .validation import (
    InputError,
    check_chain,
    check_number,
    check_rule,
    check_same_width,
    check_window,
    conditioning_width,
)


@dataclass(frozen=True, eq=False)
class NegativeEntry:
    """One extra negative of a chain: a conditioning, its weight and its percent window."""

    conditioning: list
    weight: float
    start_percent: float = 0.0
    end_percent: float = 1.0


@dataclass(frozen=True, eq=False)
class GuidanceRequest:
    """What a node asks of the engine, still in host terms (conditionings, percents)."""

    node: str
    extras: tuple[NegativeEntry, ...] = ()
    negative_start_percent: float = 0.0
    negative_end_percent: float = 1.0
    unconditional: list | None = None
    rule: rules.Rule | None = None
    trace: Trace | None = None

    @property
    def is_plain_cfg(self) -> bool:
        """Nothing beyond the host's CFG: no active extra, the whole schedule, no rule, no trace."""
        active = [e for e in self.extras if e.weight != 0.0]
        plain_rule = self.rule is None or type(self.rule) is rules.CFG
        window = is_full_window(self.negative_start_percent, self.negative_end_percent)
        return not active and plain_rule and window and self.trace is None

    def named_prompts(self) -> list:
        """``(input name, conditioning)`` of the extra negatives and the unconditional prompt."""
        named = [(f"negatives[{i}]", e.conditioning) for i, e in enumerate(self.extras)]
        if self.unconditional is not None:
            named.append(("unconditional", self.unconditional))
        return named


def check_entry(node: str, conditioning, weight, start_percent, end_percent, name: str = "conditioning",
                prefix: str = "") -> None:
    """One extra negative's inputs: a conditioning (input ``name``), a finite weight, a window (``prefix`` + input)."""
    conditioning_width(conditioning, node, name)
    check_number(node, f"{prefix}weight", weight)
    check_window(node, start_percent, end_percent, prefix)


def build_request(node: str, negatives=None, negative_start_percent=0.0, negative_end_percent=1.0,
                  unconditional=None, positive=None, negative=None, rule=None, trace=None) -> GuidanceRequest:
    """Validate the entry points' shared inputs and turn them into a request, before any sampling; with
    ``positive`` known, the widths too. Nothing is mutated."""
    check_window(node, negative_start_percent, negative_end_percent, "negative_")
    extras = check_chain(node, negatives, NegativeEntry)
    for i, e in enumerate(extras):
        check_entry(node, e.conditioning, e.weight, e.start_percent, e.end_percent, f"negatives[{i}]", f"negatives[{i}].")
    if unconditional is not None:
        conditioning_width(unconditional, node, "unconditional")
    check_rule(node, rule)
    if rule is not None and rule.needs_uncond and unconditional is None:
        raise InputError(
            node, "unconditional",
            f"is required by the {rule.name} rule: connect an empty-prompt conditioning (CLIPTextEncode with no text)",
        )
    request = GuidanceRequest(node, extras, negative_start_percent, negative_end_percent, unconditional, rule, trace)
    if positive is not None:
        if negative is not None:
            check_same_width(node, positive, "positive", negative, "negative")
        for name, conditioning in request.named_prompts():
            check_same_width(node, positive, "positive", conditioning, name)
    return request


def sigma_window(model_sampling, start_percent: float, end_percent: float) -> SigmaWindow:
    """A percent window in the model's sigmas (``percent_to_sigma``); 0 and 1 are open ends on every family."""
    start = math.inf if start_percent <= 0.0 else float(model_sampling.percent_to_sigma(start_percent))
    end = -math.inf if end_percent >= 1.0 else float(model_sampling.percent_to_sigma(end_percent))
    return SigmaWindow(start, end)


def resolve_spec(request: GuidanceRequest, model_sampling) -> GuidanceSpec:
    """The engine's spec for one run: percent windows to sigma windows, with the model's own schedule."""
    extras = tuple(
        ExtraNegative(e.weight, sigma_window(model_sampling, e.start_percent, e.end_percent))
        for e in request.extras
    )
    rule = request.rule if request.rule is not None else rules.CFG()
    if isinstance(rule, rules.CachedNegative) and rule.from_percent > 0.0:
        rule = dataclasses.replace(rule, from_sigma=float(model_sampling.percent_to_sigma(rule.from_percent)))
    return GuidanceSpec(
        primary_window=sigma_window(model_sampling, request.negative_start_percent, request.negative_end_percent),
        extras=extras,
        has_uncond=request.unconditional is not None,
        rule=rule,
        flow=isinstance(model_sampling, comfy.model_sampling.CONST),
    )
