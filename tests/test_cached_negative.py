"""The cached negative on the toy model and in the engine: full CFG at k = 1, the planned reuse, the
rebuild from the noise-space difference, the frequency split, per-run state and per-sample math."""
from __future__ import annotations

import math

import pytest
import torch

from negative_guidance_pack.samplers import engine, rules, toy


def run(rule, sampler="euler", cfg=3.0, n=200, **kw):
    r = toy.ToyRun("man", "mustache", cfg, rule, **kw)
    return toy.sample(r, n=n, steps=12, sampler=sampler, seed=0), r


@pytest.mark.parametrize("sampler", toy.SAMPLERS)
def test_every_one_is_full_cfg_bit_for_bit_on_the_toy(sampler):
    full, _ = run(rules.CFG(), sampler)
    cached, r = run(rules.CachedNegative(every=1), sampler)
    assert torch.equal(full, cached) and r.branches == 2 * r.evaluations


def test_the_plan_reuses_exactly_the_planned_evaluations():
    rule = rules.CachedNegative(every=3, full_start=2, max_log_sigma_drop=math.inf)
    state = rule.new_state()
    assert [rule.reuses(i, None, state) for i in range(9)] == [False, False, False, True, True, False, True, True, False]
    spec = engine.GuidanceSpec(rule=rule)
    state = rule.new_state()
    assert spec.plan(5.0, scale=5.0, call_index=2, state=state).branches == 2  # the cadence starts
    first = spec.plan(5.0, scale=5.0, call_index=3, state=state)
    assert first.having("rebuilt") == () and first.branches == 2  # nothing cached yet: the negative is predicted
    state["diff"]["primary"], state["at"]["primary"] = torch.zeros(1, 2), 2
    rebuilt = spec.plan(5.0, scale=5.0, call_index=4, state=state)
    assert rebuilt.having("rebuilt") == ("primary",) and rebuilt.branches == 1 and rebuilt.negative == "primary"


def test_a_reused_negative_is_the_positive_minus_the_grown_noise_difference():
    rule = rules.CachedNegative(growth=1.5, full_start=0, bounded=False, sigma_power=1.0, max_log_sigma_drop=math.inf)
    spec, state = engine.GuidanceSpec(rule=rule), rule.new_state()
    gen = torch.Generator().manual_seed(0)
    pos0, neg0, pos2 = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    sigma0, sigma2 = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 3.0])
    plan = spec.plan(2.0, scale=5.0, call_index=0, state=state)
    spec.complete(plan, state, pos0, sigma0, {"primary": neg0}, 0)
    plan = spec.plan(1.0, scale=5.0, call_index=2, state=state)
    assert plan.having("rebuilt") == ("primary",)
    primary, _, _ = spec.complete(plan, state, pos2, sigma2, {}, 2)
    d = (pos0 - neg0) / sigma0.reshape(-1, 1, 1, 1)  # eps_neg - eps_pos, per sample
    torch.testing.assert_close(primary, pos2 - sigma2.reshape(-1, 1, 1, 1) * 1.5 ** 2 * d)


def test_the_frequency_split_sums_to_the_whole():
    t = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    low, high = rules.split_bands(t, 0.25)
    torch.testing.assert_close(low + high, t)
    assert float(low.std()) < float(t.std())
    with pytest.raises(ValueError, match="two spatial dimensions"):
        rules.split_bands(torch.randn(4, 2), 0.25)


def test_state_is_per_run_and_each_sample_is_its_own():
    rule = rules.CachedNegative(growth=1.2)
    once, _ = run(rule)
    twice, _ = run(rule)
    assert torch.equal(once, twice)  # the rule object keeps nothing between runs
    both, _ = run(rule, n=2)
    alone, _ = run(rule, n=1)
    torch.testing.assert_close(both[:1], alone)


def test_it_costs_what_it_saves():
    _, r = run(rules.CachedNegative(every=4, full_start=2, max_log_sigma_drop=math.inf))
    assert r.branches == r.evaluations + 2 + len(range(2, 12, 4))


@pytest.mark.parametrize("kind", ["exploding", "sign-flipping", "shrinking"])
@pytest.mark.parametrize("bands", [False, True])
def test_a_rebuilt_difference_is_never_longer_than_the_last_two_measured(kind, bands):
    """Per sample, at every rebuilt evaluation: |D_pos - D_neg| <= its longest at the last two predicted evaluations,
    measured here from the predictions themselves (the length CFG scales)."""
    rule = rules.CachedNegative(every=3, full_start=1, growth=1.5, bands=bands, high_growth=2.0,
                                max_log_sigma_drop=math.inf)
    spec, state = engine.GuidanceSpec(rule=rule), rule.new_state()
    gen = torch.Generator().manual_seed(3)
    measured, rebuilt_seen = [], 0
    for i in range(16):
        sigma = torch.tensor([10.0 / (1 + i), 7.0 / (1 + i)], dtype=torch.float64)
        pos = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
        factor = {"exploding": 10.0 ** i, "sign-flipping": (-3.0) ** i, "shrinking": 0.5 ** i}[kind]
        neg = pos + factor * torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
        plan = spec.plan(float(sigma[0]), scale=4.0, call_index=i, state=state)
        primary, _, _ = spec.complete(plan, state, pos, sigma, {"primary": neg} if plan.of("primary") == "predicted"
                                      else {}, i)
        length = (pos - primary).flatten(1).norm(dim=1)
        if plan.of("primary") == "rebuilt":
            rebuilt_seen += 1
            bound = torch.maximum(*measured[-2:]) if len(measured) > 1 else measured[-1]
            assert bool((length <= bound * (1 + 1e-12)).all()), (i, length, bound)
        else:
            measured.append(length)
    assert rebuilt_seen == 10


def test_unbounded_the_extrapolation_grows_past_what_was_measured():
    rule = rules.CachedNegative(every=8, full_start=0, growth=1.5, bounded=False, max_log_sigma_drop=math.inf)
    spec, state = engine.GuidanceSpec(rule=rule), rule.new_state()
    pos, neg, sigma = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.ones(1)
    spec.complete(spec.plan(1.0, scale=4.0, call_index=0, state=state), state, pos, sigma, {"primary": neg}, 0)
    primary, _, _ = spec.complete(spec.plan(1.0, scale=4.0, call_index=3, state=state), state, pos, sigma, {}, 3)
    torch.testing.assert_close(primary, 1.5 ** 3 * neg)  # d = -1 grown three times: longer than measured


def test_caching_starts_at_from_sigma_and_its_cadence_with_it():
    rule = rules.CachedNegative(every=3, full_start=1, from_sigma=4.0, max_log_sigma_drop=math.inf)
    spec, state = engine.GuidanceSpec(rule=rule), rule.new_state()
    assert spec.needs_sigma
    sigmas = [20.0, 10.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.2]
    rebuilt = []
    for i, s in enumerate(sigmas):
        plan = spec.plan(s, scale=4.0, call_index=i, state=state)
        pos = torch.zeros(1, 1, 2, 2)
        spec.complete(plan, state, pos, torch.tensor([s]), {"primary": pos + 1} if plan.of("primary") == "predicted"
                      else {}, i)
        rebuilt.append(plan.of("primary") == "rebuilt")
    assert rebuilt == [False, False, False, False, True, True, False, True, True]


def decisions(rule, sigmas):
    """Which of a run's evaluations at ``sigmas`` rebuild the negative (a cached difference always at hand)."""
    spec, state, out = engine.GuidanceSpec(rule=rule), rule.new_state(), []
    state["diff"]["primary"] = torch.zeros(1)
    for i, s in enumerate(sigmas):
        out.append(spec.plan(s, scale=4.0, call_index=i, state=state).of("primary") == "rebuilt")
    return out


def test_the_adaptive_rule_rebuilds_only_small_falling_steps():
    """ln sigma may fall by at most 0.3 since the last prediction, on a falling sigma, within every = 3."""
    rule = rules.CachedNegative(every=3, full_start=1, max_log_sigma_drop=0.3)
    assert rule.adaptive and rule.reads_sigma
    sigmas = [10.0, 8.0, 7.5, 7.5, 7.0, 3.0, 2.9, 2.8, 2.7, 2.1]
    assert decisions(rule, sigmas) == [False, False, True, False, True, False, True, True, False, True]


def test_the_adaptive_rule_at_no_limit_is_the_fixed_cadence_and_at_zero_never_rebuilds():
    sigmas = [10.0, 9.9, 9.9, 9.8, 9.7, 9.7, 9.6, 9.5]
    fixed = rules.CachedNegative(every=3, full_start=1, max_log_sigma_drop=math.inf)
    assert decisions(fixed, sigmas) == [False, False, True, True, False, True, True, False]
    assert not any(decisions(rules.CachedNegative(every=3, full_start=1, max_log_sigma_drop=0.0), sigmas))
    heun = [10.0, 9.0, 9.0, 8.2, 8.2, 7.5, 7.5, 6.9]  # each sigma twice: the second order's repeat
    assert decisions(rules.CachedNegative(every=3, full_start=1), heun) == [
        False, False, False, True, False, True, False, True]


@pytest.mark.parametrize("name,value", [("every", 0), ("growth", -1.0), ("full_start", 1.5), ("cutoff", 2.0),
                                        ("from_percent", 1.5), ("from_sigma", 0.0), ("max_log_sigma_drop", -0.1),
                                        ("max_log_sigma_drop", math.nan)])
def test_bad_parameters_are_named(name, value):
    with pytest.raises(ValueError, match=name):
        rules.CachedNegative(**{name: value})


def test_a_cached_negative_may_not_sit_inside_a_skipping_rule():
    with pytest.raises(ValueError, match="inner must not be a cached negative"):
        rules.MinSigma(min_sigma=1.0, inner=rules.CachedNegative())
    rules.CachedNegative(inner=rules.MinSigma(min_sigma=1.0))  # the other way round is how to combine them


def test_removal_measures_that_overshoot_cannot_game():
    far = torch.full((10, 2), 30.0)  # far past every concept: "no mustache", but off the data
    assert toy.share_in(far, "man with mustache") == 0.0 and toy.share_off_data(far) == 1.0
    near = torch.tensor([list(toy.COMPONENTS["man"][0])] * 10, dtype=torch.float64)
    assert toy.share_off_data(near) == 0.0
    assert toy.distance_from(near + 0.45, near) == pytest.approx(2 ** 0.5)
