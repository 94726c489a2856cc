"""The engine against the step reference (``step_reference.py``, written from docs/internals.md): every
combination of windows, extras (weight, window, mask), the unconditional, each rule and rules nested in rules,
the cached negative, cfg 1, first- and second-order schedules, per model evaluation, in float64 and float32."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from step_cases import Case, EngineRun, Models, cases, xs
from step_reference import Combo, ExtraDesc, Reference, RuleDesc

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
PROFILE = settings(max_examples=2000, derandomize=True, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KARRAS = [14.6, 10.0, 5.0, 3.0, 1.5, 1.0, 0.5, 0.0]


def check(case: Case) -> None:
    """Run the engine and the reference over the case's evaluations; every guided prediction and every set of
    predicted branches agree."""
    models = Models(case)
    ours, ref = EngineRun(case.combo), Reference(case.combo)
    schedule = torch.tensor(case.schedule, dtype=case.dtype)
    for n, (x, sigma) in enumerate(zip(xs(case), case.sigmas)):
        got, got_branches = ours.evaluate(x, sigma, schedule, models.predict(x, sigma))
        want, want_branches = ref.evaluate(x, sigma, schedule, models.predict(x, sigma))
        assert got_branches == want_branches, f"evaluation {n} (sigma {sigma}): predicted {got_branches}, " \
                                              f"the reference {want_branches}"
        scale = float(want.abs().max()) or 1.0
        rel = float((got.double() - want.double()).abs().max()) / scale
        assert rel <= TOLERANCE[case.dtype], f"evaluation {n} (sigma {sigma}): relative difference {rel:.3g}"


def left_half(h=4, w=4):
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[:, : w // 2] = True
    return mask


NESTED_SKIPPING = Case(
    Combo(5.0, RuleDesc("min_sigma", {"min_sigma": 0.8}, RuleDesc("interval", {"sigma_low": 2.0, "sigma_high": 9.0}))),
    sigmas=KARRAS[:-1], schedule=KARRAS)
APG_OUTSIDE_THE_WINDOW = Case(
    Combo(5.0, RuleDesc("apg", {"momentum": 0.5}), window=(math.inf, 4.0), extras=[ExtraDesc(1.0)]),
    sigmas=KARRAS[:-1], schedule=KARRAS)
MASKED_EXTRA_CACHED = Case(
    Combo(5.0, RuleDesc("cached", {"every": 3, "full_start": 1}), extras=[ExtraDesc(1.0, mask=left_half())]),
    sigmas=KARRAS[:-1], schedule=KARRAS)
CFG_ZERO_STAR_LATE_WINDOW = Case(
    Combo(5.0, RuleDesc("cfg_zero_star", {"zero_init_steps": 1}), window=(4.0, -math.inf)),
    sigmas=KARRAS[:-1], schedule=KARRAS)
DYNAMIC_ACROSS_A_GAP = Case(
    Combo(5.0, RuleDesc("min_sigma", {"min_sigma": 4.0},
                        RuleDesc("dynamic", {"scale": 5.0, "prior": 0.2, "temperature": 0.0, "offset": 0.01})),
          uncond=True),
    sigmas=KARRAS[:-1], schedule=KARRAS)


@PROFILE
@given(case=cases())
@example(case=NESTED_SKIPPING)
@example(case=APG_OUTSIDE_THE_WINDOW)
@example(case=MASKED_EXTRA_CACHED)
@example(case=CFG_ZERO_STAR_LATE_WINDOW)
@example(case=DYNAMIC_ACROSS_A_GAP)
def test_the_engine_computes_the_written_meaning_of_every_step(case):
    check(case)


def test_nested_skipping_rules_skip_where_either_skips():
    """Either order of minimum sigma and the guidance interval: above the interval and below it one branch."""
    inner, outer = NESTED_SKIPPING.combo.rule.inner, NESTED_SKIPPING.combo.rule
    flipped = Case(Combo(5.0, RuleDesc(inner.kind, inner.params, RuleDesc(outer.kind, outer.params))),
                   sigmas=KARRAS[:-1], schedule=KARRAS)
    for case in (NESTED_SKIPPING, flipped):
        run = EngineRun(case.combo)
        models = Models(case)
        branches = [len(run.evaluate(x, s, None, models.predict(x, s))[1]) for x, s in zip(xs(case), case.sigmas)]
        assert branches == [0, 0, 1, 1, 0, 0, 0]  # 14.6 and 10 above (2, 9], 1.5 .. 0.5 below it


WRAPPERS = {"min_sigma": {"min_sigma": 2.0}, "interval": {"sigma_low": 0.7, "sigma_high": 9.0},
            "cached": {"every": 2, "full_start": 1, "growth": 1.1}}
COMBINER_PARAMS = {"cfg": {}, "perp_neg": {}, "apg": {"momentum": 0.5}, "rescale": {}, "cfg_zero_star": {},
                   "dynamic": {"temperature": 0.0, "offset": 0.01}}
ALLOWED_PAIRS = [(outer, inner) for outer in WRAPPERS for inner in [*WRAPPERS, *COMBINER_PARAMS]
                 if inner != "cached"]


@pytest.mark.parametrize("outer,inner", ALLOWED_PAIRS)
def test_every_allowed_nesting_of_two_rules_is_the_reference(outer, inner):
    params = {**WRAPPERS, **COMBINER_PARAMS}
    rule = RuleDesc(outer, params[outer], RuleDesc(inner, params[inner]))
    for dtype in (torch.float64, torch.float32):
        check(Case(Combo(4.0, rule, window=(8.0, 1.0), uncond=True, extras=[ExtraDesc(1.5, (12.0, 0.4), left_half())]),
                   sigmas=[14.6, 10.0, 10.0, 5.0, 5.0, 3.0, 1.5, 1.5, 1.0, 0.5], schedule=KARRAS, dtype=dtype))
