"""Random combinations for the step reference (``step_reference.py``): hypothesis strategies over every input of
a step, the same combination as the pack's objects, and deterministic per-branch models with known output."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from hypothesis import event
from hypothesis import strategies as st
from step_reference import ALWAYS, Combo, ExtraDesc, RuleDesc, flatten

from negative_guidance_pack.samplers import engine, rules
from negative_guidance_pack.samplers.schedule import SigmaWindow

RULE_CLASSES = {
    "cfg": rules.CFG, "perp_neg": rules.PerpNeg, "apg": rules.APG, "rescale": rules.Rescale,
    "cfg_zero_star": rules.CFGZeroStar, "dynamic": rules.DynamicNegative, "min_sigma": rules.MinSigma,
    "interval": rules.GuidanceInterval, "cached": rules.CachedNegative,
}
COMBINERS = ("cfg", "perp_neg", "apg", "rescale", "cfg_zero_star", "dynamic")


def to_rule(desc: RuleDesc) -> rules.Rule:
    """The pack's rule object for a description."""
    params = dict(desc.params)
    if desc.inner is not None:
        params["inner"] = to_rule(desc.inner)
    return RULE_CLASSES[desc.kind](**params)


def to_spec(combo: Combo) -> engine.GuidanceSpec:
    return engine.GuidanceSpec(
        primary_window=SigmaWindow(*combo.window),
        extras=tuple(engine.ExtraNegative(e.weight, SigmaWindow(*e.window)) for e in combo.extras),
        has_uncond=combo.uncond, rule=to_rule(combo.rule), flow=combo.flow,
        sampler_negative=combo.sampler_negative,
    )


class EngineRun:
    """The engine driven as the host glue drives it: plan, predict the planned branches, complete, combine."""

    def __init__(self, combo: Combo, spec: engine.GuidanceSpec | None = None):
        self.combo, self.spec = combo, spec or to_spec(combo)
        self.state = self.spec.rule.new_state()
        self.n = 0

    def evaluate(self, x, sigma: float, sample_sigmas, predict):
        spec = self.spec
        asked = frozenset({"primary"}) if self.combo.asked else frozenset()
        plan = spec.plan(sigma if spec.needs_sigma else None, scale=self.combo.scale, call_index=self.n,
                         state=self.state, asked=asked)
        s = torch.full((x.shape[0],), sigma, dtype=x.dtype)
        pos = predict("positive")
        made = {b: predict(b) for b in plan.having("predicted")}
        primary, uncond, extras = spec.complete(plan, self.state, pos, s, made, self.n)
        out = engine.combine_step(spec, plan, self.state, scale=self.combo.scale, pos=pos, primary=primary,
                                  uncond=uncond, extras=extras, x=x, sigma=s, sample_sigmas=sample_sigmas)
        self.n += 1
        return out, sorted(plan.having("predicted"), key=str)


@dataclass
class Case:
    """A combination and the run it is evaluated on."""

    combo: Combo
    sigmas: list  # the sigma of each model evaluation, in order
    schedule: list  # the sampler's schedule (sample_sigmas), ending in 0
    shape: tuple = (2, 3, 4, 4)
    dtype: torch.dtype = torch.float64
    seed: int = 0
    notes: list = field(default_factory=list)


class Models:
    """A deterministic prediction per branch: smooth in x and sigma, different per branch, exactly zero where a
    masked extra's conditioning does not reach (as the host predicts there)."""

    def __init__(self, case: Case):
        gen = torch.Generator().manual_seed(case.seed)
        self.case = case
        keys = ["positive", "primary", "uncond", *range(len(case.combo.extras))]
        self.params = {k: [torch.randn(case.shape[1:], generator=gen, dtype=torch.float64) for _ in range(3)]
                       for k in keys}

    def predict(self, x: torch.Tensor, sigma: float):
        def one(branch):
            a, b, c = self.params[branch]
            out = (torch.tanh(x.double() * a / (1 + sigma) + b) + c * 0.3).to(x.dtype)
            if isinstance(branch, int) and self.case.combo.extras[branch].mask is not None:
                out = out * self.case.combo.extras[branch].mask.to(out.dtype)
            return out
        return one


def xs(case: Case):
    gen = torch.Generator().manual_seed(case.seed + 1)
    return [(torch.randn(case.shape, generator=gen, dtype=torch.float64) * max(s, 0.05)).to(case.dtype)
            for s in case.sigmas]


# ---------------------------------------------------------------------------- strategies


def _window(draw, sigmas):
    if draw(st.booleans()):
        return ALWAYS
    lo, hi = sorted(draw(st.sampled_from(sigmas + [0.0, math.inf])) for _ in range(2))
    return (hi if hi != 0.0 else math.inf, lo if lo != math.inf else -math.inf)


def _combiner(draw, kind, flow):
    f = lambda lo, hi: draw(st.floats(lo, hi, allow_nan=False))  # noqa: E731
    return RuleDesc(kind, {
        "cfg": lambda: {},
        "perp_neg": lambda: {"neg_scale": f(0.0, 2.0)},
        "apg": lambda: {"eta": f(-1.0, 1.0), "norm_threshold": draw(st.sampled_from([0.0, 0.5, 15.0])),
                        "momentum": f(-0.9, 0.9)},
        "rescale": lambda: {"phi": f(0.0, 1.0)},
        "cfg_zero_star": lambda: {"zero_init_steps": draw(st.integers(0, 3))},
        "dynamic": lambda: {"scale": f(0.0, 30.0), "prior": f(0.01, 0.3), "temperature": f(0.5, 2.0),
                            "offset": f(-1.0, 1.0)},
    }[kind]())


def _rule(draw, sigmas, flow):
    rule = _combiner(draw, draw(st.sampled_from(COMBINERS)), flow)
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.booleans()):
            rule = RuleDesc("min_sigma", {"min_sigma": draw(st.sampled_from(sigmas)),
                                          "all_steps": draw(st.booleans())}, rule)
        else:
            low, high = sorted(draw(st.sampled_from([0.0] + sigmas)) for _ in range(2))
            rule = RuleDesc("interval", {"sigma_low": low, "sigma_high": high if high > low else low + 1.0}, rule)
    if draw(st.booleans()):
        rule = RuleDesc("cached", {"every": draw(st.integers(1, 4)), "full_start": draw(st.integers(0, 3)),
                                   "growth": draw(st.floats(0.8, 1.3)), "bands": draw(st.booleans()),
                                   "cutoff": draw(st.sampled_from([0.25, 0.5])),
                                   "high_growth": draw(st.floats(0.8, 1.3)), "bounded": draw(st.booleans()),
                                   "sigma_power": draw(st.sampled_from([1.0, 0.0, 0.5])),
                                   "from_sigma": draw(st.sampled_from([math.inf] + sigmas)),
                                   "max_log_sigma_drop": draw(st.sampled_from([math.inf, 0.3, 1.0, 3.0]))}, rule)
    return rule


def _schedule(draw, flow):
    steps = draw(st.integers(2, 6))
    top = 1.0 if flow else draw(st.sampled_from([14.6, 8.0]))
    low = 0.02 if flow else 0.1
    schedule = [round(top * (low / top) ** (i / (steps - 1)), 6) for i in range(steps)] + [0.0]
    second_order = draw(st.booleans())
    sigmas = []
    for s, nxt in zip(schedule[:-1], schedule[1:]):
        sigmas.append(s)
        if second_order and nxt > 0:
            sigmas.append(nxt)
    return schedule, sigmas, second_order


@st.composite
def cases(draw, dtype=None):
    flow = draw(st.booleans())
    schedule, sigmas, second_order = _schedule(draw, flow)
    points = sorted(set(schedule[:-1]))
    rule = _rule(draw, points, flow)
    _, _, combiner = flatten(rule)
    h, w = draw(st.sampled_from([(2, 2), (4, 4), (3, 5)]))
    extras = []
    for _ in range(draw(st.integers(0, 2))):
        mask = None
        if draw(st.booleans()):
            mask = torch.zeros(h, w, dtype=torch.bool)
            mask[:, : draw(st.integers(0, w - 1)) + 1] = True
        weight = draw(st.sampled_from([0.0, 1.0, -0.5, 0.0, 2.5]))  # a zero weight, in a fifth of the draws or more
        extras.append(ExtraDesc(weight, _window(draw, points), mask))
    combo = Combo(
        scale=draw(st.sampled_from([1.0, 0.0, 2.5, 7.0])), rule=rule, window=_window(draw, points),
        sampler_negative=draw(st.sampled_from([True, True, True, False])),
        uncond=draw(st.booleans()) or combiner.kind in ("perp_neg", "dynamic"),
        extras=extras, asked=draw(st.booleans()), flow=flow,
    )
    case = Case(combo, sigmas, schedule, shape=(draw(st.integers(1, 3)), draw(st.integers(1, 4)), h, w),
                dtype=dtype or draw(st.sampled_from([torch.float64, torch.float32])), seed=draw(st.integers(0, 2**16)))
    case.notes = features(case, second_order)
    for name in case.notes:
        event(name)
    return case


def features(case: Case, second_order: bool) -> list:
    """The features a case draws (for hypothesis' statistics: every one in at least a fifth of the examples)."""
    c = case.combo
    skipping, cache, combiner = flatten(c.rule)
    out = [f"combiner {combiner.kind}"]
    out += ["a stateful combiner (APG, dynamic, CFG-Zero*)"] if combiner.kind in ("apg", "dynamic", "cfg_zero_star") else []
    out += ["main window"] if c.window != ALWAYS else []
    out += ["extras"] if c.extras else []
    out += ["an extra's window"] if any(e.window != ALWAYS for e in c.extras) else []
    out += ["a masked extra"] if any(e.mask is not None for e in c.extras) else []
    out += ["a zero weight"] if any(e.weight == 0 for e in c.extras) else []
    out += ["unconditional"] if c.uncond else []
    out += ["skipping rule"] if skipping else []
    out += ["skipping in skipping"] if len(skipping) > 1 else []
    out += ["cached negative"] if cache is not None else []
    out += ["skipping in the cached negative"] if cache is not None and skipping else []
    out += ["adaptive cached negative"] if cache is not None and math.isfinite(cache.params["max_log_sigma_drop"]) else []
    out += ["cfg 1"] if math.isclose(c.scale, 1.0) else []
    out += ["no sampler negative"] if not c.sampler_negative else []
    out += ["flow model"] if c.flow else []
    out += ["second order"] if second_order else []
    out += ["float32"] if case.dtype == torch.float32 else []
    return out
