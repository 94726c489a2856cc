"""Each rule against an oracle we did not write (diffusers' guiders, torch.distributions), per sample,
in every dtype, with zero directions, and never NaN for finite input."""
from __future__ import annotations

import math

import diffusers.guiders as diffusers_guiders
import pytest
import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from diffusers.guiders.guider_utils import rescale_noise_cfg
from hypothesis import given, settings
from hypothesis import strategies as st
from step_cases import Case, EngineRun, Models, to_spec, xs
from step_reference import Combo, Reference, RuleDesc

from negative_guidance_pack.samplers import engine, rules


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * float(b.abs().mean()))


SHAPES = [(2, 4, 16, 16), (3, 16, 3, 8, 8)]  # image batch, and 5-D video latents


@pytest.mark.parametrize("shape", SHAPES)
def test_cfg_matches_diffusers(shape):
    pos, neg = rand(*shape, seed=1), rand(*shape, seed=2)
    guider = diffusers_guiders.ClassifierFreeGuidance(guidance_scale=6.5)
    guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(999))
    close(rules.cfg(pos, neg, 6.5), guider.forward(pos, neg)[0])


@pytest.mark.parametrize("shape", SHAPES)
def test_rescale_matches_diffusers(shape):
    pos, neg = rand(*shape, seed=1), rand(*shape, seed=2)
    guided = rules.cfg(pos, neg, 9.0)
    close(rules.rescale(guided, pos, 0.7), rescale_noise_cfg(guided, pos, 0.7))


@pytest.mark.parametrize("shape", SHAPES)
def test_apg_matches_diffusers_original_formulation_over_a_run(shape):
    """diffusers' 'original formulation' is D_pos + g * update, i.e. the paper's w = g + 1."""
    eta, r, beta, w = 0.0, 2.0, -0.5, 7.0
    buffer, running = MomentumBuffer(beta), None
    for step in range(4):
        pos, neg = rand(*shape, seed=10 + step), rand(*shape, seed=20 + step)
        ours, running = rules.apg(pos, neg, w, eta, r, beta, running)
        theirs = normalized_guidance(pos, neg, w - 1.0, buffer, eta, r, use_original_formulation=True)
        close(ours, theirs)


def test_apg_at_eta_one_without_cap_or_momentum_is_cfg():
    pos, neg = rand(2, 4, 8, 8, seed=1), rand(2, 4, 8, 8, seed=2)
    close(rules.apg(pos, neg, 5.0, 1.0, 0.0, 0.0, None)[0], rules.cfg(pos, neg, 5.0))


@pytest.mark.parametrize("shape", SHAPES)
def test_cfg_zero_star_matches_diffusers(shape):
    pos, neg = rand(*shape, seed=1), rand(*shape, seed=2) * 0.5 + rand(*shape, seed=1) * 0.5
    guider = diffusers_guiders.ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=1)
    guider.set_state(step=3, num_inference_steps=10, timestep=torch.tensor(500))
    close(rules.cfg_zero_star(pos, neg, 5.0), guider.forward(pos, neg)[0])


def test_cfg_zero_star_zero_init_is_diffusers_first_step():
    """At step 0 diffusers returns a zero velocity; the rule returns D = x (x - D = 0) there only."""
    x, pos, neg = rand(1, 4, 8, 8, seed=3), rand(1, 4, 8, 8, seed=1), rand(1, 4, 8, 8, seed=2)
    sample_sigmas = torch.tensor([14.6, 7.0, 3.0, 0.0])
    rule = rules.CFGZeroStar(zero_init_steps=1)
    guider = diffusers_guiders.ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=1)
    for step, sigma in enumerate(sample_sigmas[:-1]):
        s = rules.StepInputs(x=x, sigma=sigma.reshape(1), pos=pos, neg=neg, scale=5.0, sample_sigmas=sample_sigmas)
        guider.set_state(step=step, num_inference_steps=3, timestep=torch.tensor(step))
        noise = guider.forward(rules.to_noise(x, pos), rules.to_noise(x, neg))[0]
        close(rules.to_noise(x, rule.combine(s, None)), noise)


def test_perp_neg_projects_per_sample():
    pos, unc = rand(2, 4, 8, 8, seed=1), rand(2, 4, 8, 8, seed=2)
    neg = rand(2, 4, 8, 8, seed=3)
    neg[1] = neg[1] * 30.0  # a very different second sample: a per-batch projection would mix them
    both = rules.perp_neg(pos, unc, [neg], [7.0], 7.0)
    for i in range(2):
        alone = rules.perp_neg(pos[i:i + 1], unc[i:i + 1], [neg[i:i + 1]], [7.0], 7.0)
        close(both[i:i + 1], alone)


def test_perp_neg_removes_only_the_perpendicular_part():
    pos, unc = rand(1, 4, 8, 8, seed=1), rand(1, 4, 8, 8, seed=2)
    along = unc + (pos - unc) * 0.3  # a negative lying on the positive direction changes nothing
    close(rules.perp_neg(pos, unc, [along], [5.0], 5.0), rules.cfg(pos, unc, 5.0))


def test_perp_neg_with_a_zero_positive_direction_is_finite():
    unc = rand(1, 4, 8, 8, seed=2)
    out = rules.perp_neg(unc.clone(), unc, [rand(1, 4, 8, 8, seed=3)], [2.0], 7.0)
    assert torch.isfinite(out).all()


def test_dng_posterior_is_bayes_with_gaussian_likelihoods():
    """Temperature 1, offset 0: the update is the ratio of two Gaussian densities (torch.distributions)."""
    torch.manual_seed(0)
    x_prev, base, negp = rand(2, 4, 4, 4, seed=1) * 5, rand(2, 4, 4, 4, seed=2), rand(2, 4, 4, 4, seed=3)
    s_prev, s = torch.tensor([5.0, 5.0]), torch.tensor([3.0, 3.0])
    x = rand(2, 4, 4, 4, seed=4) * 3
    p0 = torch.tensor([0.2, 0.2])
    got = rules.dng_posterior(p0, x, s, x_prev, s_prev, base, negp, 1.0, 0.0, 0.0, 1.0)
    vp = 1 + 9.0
    var_up = 9.0 * (25.0 - 9.0) / 25.0
    std = math.sqrt(var_up / vp)
    ratio = math.sqrt(9.0 - var_up) / 5.0  # sigma_down / sigma_prev
    for i in range(2):
        mu_b = (x_prev[i] * ratio + base[i] * (1 - ratio)) / math.sqrt(vp)
        mu_n = (x_prev[i] * ratio + negp[i] * (1 - ratio)) / math.sqrt(vp)
        xi = x[i] / math.sqrt(vp)
        log_ratio = (torch.distributions.Normal(mu_n.double(), std).log_prob(xi.double()).sum()
                     - torch.distributions.Normal(mu_b.double(), std).log_prob(xi.double()).sum())
        want = min(1.0, 0.2 * math.exp(min(float(log_ratio), 80.0)))
        assert got[i].item() == pytest.approx(want, rel=1e-4, abs=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_rescale_on_flow_models_is_diffusers_on_the_velocity(shape):
    """Flow models predict the velocity (x - D) / sigma; diffusers rescales that prediction."""
    x, pos, neg = rand(*shape, seed=0), rand(*shape, seed=1), rand(*shape, seed=2)
    sigma = torch.full((shape[0],), 0.6)
    s = sigma.reshape(-1, *[1] * (len(shape) - 1))
    inputs = rules.StepInputs(x=x, sigma=sigma, pos=pos, neg=neg, scale=5.0, flow=True)
    got = rules.Rescale(phi=0.7).combine(inputs, None)
    guider = diffusers_guiders.ClassifierFreeGuidance(guidance_scale=5.0, guidance_rescale=0.7)
    guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(999))
    want_velocity = guider.forward((x - pos) / s, (x - neg) / s)[0]
    close((x - got) / s, want_velocity)
    vp = rules.Rescale(phi=0.7).combine(rules.StepInputs(x=x, sigma=sigma, pos=pos, neg=neg, scale=5.0), None)
    assert (vp - got).abs().max() > 1e-2  # the v-prediction formula (ComfyUI's RescaleCFG) is another result


def test_dng_posterior_rises_when_the_sample_follows_the_negative():
    x_prev, base, negp = rand(1, 4, 8, 8, seed=1) * 5, rand(1, 4, 8, 8, seed=2), rand(1, 4, 8, 8, seed=3)
    s_prev, s = torch.tensor([5.0]), torch.tensor([4.0])
    r = math.sqrt(16.0 - 16.0 * 9.0 / 25.0) / 5.0  # sigma_down / sigma_prev
    towards_neg = x_prev * r + negp * (1 - r)
    towards_base = x_prev * r + base * (1 - r)
    p0 = torch.tensor([0.1])
    assert rules.dng_posterior(p0, towards_neg, s, x_prev, s_prev, base, negp, 1.0, 0.0, 1e-6, 0.99) > p0
    assert rules.dng_posterior(p0, towards_base, s, x_prev, s_prev, base, negp, 1.0, 0.0, 1e-6, 0.99) < p0
    same_sigma = rules.dng_posterior(p0, towards_neg, s_prev, x_prev, s_prev, base, negp, 1.0, 0.0, 1e-6, 0.99)
    assert torch.equal(same_sigma, p0.float())  # a repeated sigma (Heun's second call) carries no evidence


def test_dng_static_limit_is_negative_prompting():
    """Temperature 0, offset 0: p stays at the prior and the rule is NP with weight scale*prior/(1-prior)."""
    rule = rules.DynamicNegative(scale=3.0, prior=0.2, temperature=0.0)
    state = rule.new_state()
    pos, unc, neg = rand(1, 4, 8, 8, seed=1), rand(1, 4, 8, 8, seed=2), rand(1, 4, 8, 8, seed=3)
    for sigma in (8.0, 4.0, 2.0):
        x = rand(1, 4, 8, 8, seed=int(sigma)) * sigma
        s = rules.StepInputs(x=x, sigma=torch.tensor([sigma]), pos=pos, neg=neg, scale=6.0, uncond=unc)
        base = rules.cfg(pos, unc, 6.0)
        close(rule.combine(s, state), base - (neg - base) * (3.0 * 0.2 / 0.8))


def _all_rules():
    return [rules.CFG(), rules.PerpNeg(), rules.APG(), rules.APG(eta=1.0, norm_threshold=0.0, momentum=0.0),
            rules.Rescale(), rules.CFGZeroStar(), rules.DynamicNegative(), rules.MinSigma(min_sigma=1.0),
            rules.GuidanceInterval(inner=rules.APG())]


def _inputs(shape, dtype, seed=0, zero=False):
    x = rand(*shape, seed=seed, dtype=dtype) * 3
    pos = rand(*shape, seed=seed + 1, dtype=dtype)
    neg = pos.clone() if zero else rand(*shape, seed=seed + 2, dtype=dtype)
    unc = pos.clone() if zero else rand(*shape, seed=seed + 3, dtype=dtype)
    ext = rand(*shape, seed=seed + 4, dtype=dtype)
    return x, pos, neg, unc, ext


def _run(rule, x, pos, neg, unc, ext, sigmas=(4.0, 2.0, 1.0)):
    spec = engine.GuidanceSpec(extras=(engine.ExtraNegative(1.5),), has_uncond=True, rule=rule)
    state, out = rule.new_state(), None
    sample_sigmas = torch.tensor([*sigmas, 0.0])
    for i, sigma in enumerate(sigmas):
        plan = spec.plan(sigma, scale=7.0, call_index=i)
        out = engine.combine_step(
            spec, plan, state, scale=7.0, pos=pos, primary=neg, uncond=unc,
            extras=[ext] * len(plan.extras), x=x, sigma=torch.full((x.shape[0],), sigma, dtype=x.dtype),
            sample_sigmas=sample_sigmas.to(x.dtype))
    return out


@pytest.mark.parametrize("rule", _all_rules(), ids=lambda r: r.name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_rules_keep_dtype_and_stay_finite(rule, dtype, shape):
    out = _run(rule, *_inputs(shape, dtype))
    assert out.dtype == dtype and out.shape == shape and torch.isfinite(out).all()
    zero = _run(rule, *_inputs(shape, dtype, zero=True))  # zero directions everywhere
    assert torch.isfinite(zero).all()


@pytest.mark.parametrize("rule", _all_rules(), ids=lambda r: r.name)
def test_rules_treat_each_sample_alone(rule):
    x, pos, neg, unc, ext = _inputs((3, 4, 8, 8), torch.float32)
    neg[2] *= 25.0
    both = _run(rule, x, pos, neg, unc, ext)
    for i in range(3):
        alone = _run(rule, *(t[i:i + 1] for t in (x, pos, neg, unc, ext)))
        close(both[i:i + 1], alone, tol=1e-4)


STATEFUL = {
    "apg": RuleDesc("apg", {"momentum": 0.5}),
    "dynamic": RuleDesc("dynamic", {"temperature": 0.0, "offset": 0.01}),
    "cfg_zero_star": RuleDesc("cfg_zero_star", {"zero_init_steps": 2}),
    "cached apg": RuleDesc("cached", {"every": 2, "full_start": 1}, RuleDesc("apg", {"momentum": -0.5})),
}


@pytest.mark.parametrize("name", STATEFUL)
def test_one_rule_object_serves_many_runs_each_as_the_step_reference(name):
    """State lives in the run, not in the rule: one rule object, three runs in a row on different inputs (the
    middle one on a batch of another size), each equal to a fresh reference run."""
    schedule = [14.6, 5.0, 2.0, 0.8, 0.3, 0.0]
    combo = Combo(4.0, STATEFUL[name], window=(math.inf, 1.0), uncond=True)
    spec = to_spec(combo)
    for seed, shape in ((1, (2, 3, 4, 4)), (2, (3, 3, 4, 4)), (3, (2, 3, 4, 4))):
        case = Case(combo, schedule[:-1], schedule, shape=shape, seed=seed)
        models, ours, ref = Models(case), EngineRun(combo, spec), Reference(combo)
        for x, sigma in zip(xs(case), case.sigmas):
            got, _ = ours.evaluate(x, sigma, torch.tensor(schedule, dtype=x.dtype), models.predict(x, sigma))
            want, _ = ref.evaluate(x, sigma, torch.tensor(schedule, dtype=x.dtype), models.predict(x, sigma))
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    rule_index=st.integers(0, len(_all_rules()) - 1),
    values=st.lists(finite, min_size=5 * 8, max_size=5 * 8),
    zero_mask=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_property_no_nan_for_finite_input(rule_index, values, zero_mask):
    tensors = torch.tensor(values, dtype=torch.float32).reshape(5, 2, 1, 2, 2)
    tensors = torch.where(torch.tensor(zero_mask).reshape(5, 1, 1, 1, 1), torch.zeros_like(tensors), tensors)
    out = _run(_all_rules()[rule_index], *tensors)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("cls,params,name", [
    (rules.APG, {"eta": math.nan}, "eta"),
    (rules.APG, {"momentum": 2.0}, "momentum"),
    (rules.PerpNeg, {"neg_scale": -1.0}, "neg_scale"),
    (rules.Rescale, {"phi": 1.5}, "phi"),
    (rules.CFGZeroStar, {"zero_init_steps": -1}, "zero_init_steps"),
    (rules.DynamicNegative, {"p_max": 1.0}, "p_max"),
    (rules.GuidanceInterval, {"sigma_low": 6.0, "sigma_high": 5.0}, "sigma_low"),
    (rules.MinSigma, {"min_sigma": math.inf}, "min_sigma"),
])
def test_bad_parameters_are_named(cls, params, name):
    with pytest.raises(ValueError, match=name):
        cls(**params)


def test_rules_that_need_the_unconditional_say_so():
    with pytest.raises(ValueError, match="Perp-Neg rule needs an unconditional"):
        engine.GuidanceSpec(rule=rules.PerpNeg())


def test_min_sigma_skips_as_a1111_does():
    """A1111 (modules/sd_samplers_cfg_denoiser.py, CFGDenoiser.forward): skip when
    ``(self.step % 2 or s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond``,
    ``self.step`` counting denoiser calls from 0 in the run."""
    sigmas = [14.6, 8.0, 4.0, 2.0, 1.5, 0.9, 0.5, 0.2, 0.1]
    for all_steps in (False, True):
        spec = engine.GuidanceSpec(rule=rules.MinSigma(min_sigma=1.6, all_steps=all_steps))
        got = [spec.plan(s, scale=5.0, call_index=i).branches for i, s in enumerate(sigmas)]
        a1111 = [1 if ((i % 2 or all_steps) and 1.6 > 0 and s < 1.6) else 2 for i, s in enumerate(sigmas)]
        assert got == a1111


def test_guidance_interval_is_open_below_and_closed_above():
    spec = engine.GuidanceSpec(rule=rules.GuidanceInterval(sigma_low=0.28, sigma_high=5.42))
    assert [spec.plan(s, scale=5.0).branches for s in (14.6, 5.42, 1.0, 0.28, 0.1)] == [1, 2, 2, 1, 1]
