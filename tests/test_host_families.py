"""Every entry point and rule on tiny random models of each host family: SD1.5, SDXL, SD3, Flux, Wan video.

The models are built by the host's own ``supported_models`` classes (``bench/families.py``), so
model sampling (eps or flow), latent formats and extra conditionings (SDXL's ADM vector, pooled
vectors, Flux's guidance embedding, 5-D video latents) are the host's. What the README's family
table says is what these tests check.
"""
from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from tests_support import count_forwards, rel_diff

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from families import FAMILIES  # noqa: E402

from negative_guidance_pack.samplers import rules  # noqa: E402

NAMES = list(FAMILIES)
STEPS = 3
CFG = 4.0


@pytest.fixture(scope="module", params=NAMES)
def family(host, request):
    f = FAMILIES[request.param]
    return f, f.model(seed=1)


@pytest.fixture(scope="module")
def viz(host):
    return importlib.import_module("negative_guidance_pack.nodes.visualize")


@pytest.fixture(scope="module")
def nag(host):
    return importlib.import_module("negative_guidance_pack.nodes.nag")


def _ksampler(host_nodes, model, f, cfg=CFG, neg=None, lat=None, sampler="euler"):
    return host_nodes.common_ksampler(model, 0, STEPS, cfg, sampler, "normal", f.cond(1), neg or f.cond(2),
                                      lat or f.latent())[0]["samples"]


def _sampler(g, model, f, cfg=CFG, neg=None, lat=None, sampler="euler", start=0.0, **kw):
    return g.NegativeGuidanceSampler.execute(model, 0, STEPS, cfg, sampler, "normal", f.cond(1), neg or f.cond(2),
                                             lat or f.latent(), 1.0, start, 1.0, **kw)


def _custom_advanced(custom, guider, f):
    sigmas = custom.BasicScheduler().get_sigmas(guider.model_patcher, "normal", STEPS, 1.0)[0]
    return custom.SamplerCustomAdvanced().sample(custom.Noise_RandomNoise(0), guider,
                                                 custom.comfy.samplers.sampler_object("euler"), sigmas,
                                                 f.latent())[0]["samples"]


def _extras(g, f, weight=2.0):
    return g.WeightedNegative.execute(f.cond(3), weight, 0.0, 1.0)[0]


def _finite_like(out, f, batch=1):
    assert out.shape == f.latent(batch)["samples"].shape
    assert torch.isfinite(out).all()


def test_the_random_models_are_reproducible(host):
    """Same seed, same weights and buffers: nothing is left as uninitialised memory.

    SD3's position table is a ``torch.empty`` buffer the host leaves to the checkpoint; unfilled it
    was NaN on one CI machine and finite on this one.
    """
    for f in FAMILIES.values():
        a, b = (f.model(seed=5).model.state_dict() for _ in range(2))
        for name, tensor in a.items():
            assert torch.isfinite(tensor).all() and torch.equal(tensor, b[name]), (f.name, name)


def test_at_defaults_every_entry_point_is_the_host(pack_nodes, host_nodes, custom, family):
    f, model = family
    ref = _ksampler(host_nodes, model, f)
    assert torch.equal(_ksampler(host_nodes, pack_nodes.NegativeGuidance.execute(model, 0.0, 1.0)[0], f), ref)
    assert torch.equal(_sampler(pack_nodes, model, f)[0]["samples"], ref)
    host_guider = custom.CFGGuider().get_guider(model, f.cond(1), f.cond(2), CFG)[0]
    guider = pack_nodes.NegativeGuider.execute(model, f.cond(1), f.cond(2), CFG, 0.0, 1.0)[0]
    assert torch.equal(_custom_advanced(custom, guider, f), _custom_advanced(custom, host_guider, f))


def test_an_extra_equal_to_the_negative_is_exact_through_the_hooks(pack_nodes, host_nodes, family):
    """The engine's own path (extra batched, cfg function installed) reproduces the host when the extra cancels."""
    f, model = family
    ref = _ksampler(host_nodes, model, f)
    negs = pack_nodes.WeightedNegative.execute(f.cond(2), 3.0, 0.0, 1.0)[0]
    with count_forwards(model) as rows:
        got = _sampler(pack_nodes, model, f, negatives=negs)[0]["samples"]
    assert rel_diff(got, ref) <= 1e-5
    assert rows == [3] * STEPS  # positive, negative and the extra in one forward a step


def test_every_entry_point_applies_the_extras(pack_nodes, host_nodes, custom, family):
    f, model = family
    ref = _ksampler(host_nodes, model, f)
    negs = _extras(pack_nodes, f)
    via_patch = _ksampler(host_nodes, pack_nodes.NegativeGuidance.execute(model, 0.0, 1.0, negatives=negs)[0], f)
    via_sampler = _sampler(pack_nodes, model, f, negatives=negs)[0]["samples"]
    guider = pack_nodes.NegativeGuider.execute(model, f.cond(1), f.cond(2), CFG, 0.0, 1.0, negatives=negs)[0]
    via_guider = _custom_advanced(custom, guider, f)
    for out in (via_patch, via_sampler, via_guider):
        _finite_like(out, f)
        assert rel_diff(out, ref) > 1e-4, "the extra negative did nothing"
    assert torch.equal(via_patch, via_sampler)


def _rule_cases(g):
    rn = importlib.import_module("negative_guidance_pack.nodes.rules")
    return {
        "cfg": None,
        "perp_neg": rn.NegativeRulePerpNeg.execute(1.0)[0],
        "apg": rn.NegativeRuleAPG.execute(0.0, 15.0, -0.5)[0],
        "rescale": rn.NegativeRuleRescale.execute(0.7)[0],
        "cfg_zero_star": rn.NegativeRuleCFGZeroStar.execute(1)[0],
        "dynamic": rn.NegativeRuleDynamic.execute(20.0, 0.01, 1.0, 0.0, 1e-6, 0.99)[0],
        "min_sigma": rn.NegativeRuleMinSigma.execute(0.5, False)[0],
        "interval": rn.NegativeRuleInterval.execute(0.1, 5.42)[0],
    }


RULES = ["cfg", "perp_neg", "apg", "rescale", "cfg_zero_star", "dynamic", "min_sigma", "interval"]


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_runs_finite_with_extras_a_window_and_a_batch_of_two(pack_nodes, family, rule):
    f, model = family
    out, trace = _sampler(pack_nodes, model, f, lat=f.latent(batch=2), start=0.2, sampler="euler_ancestral",
                          negatives=_extras(pack_nodes, f), unconditional=f.cond(4), record_trace=True,
                          rule=_rule_cases(pack_nodes)[rule])
    _finite_like(out["samples"], f, batch=2)
    assert len(trace.steps) == STEPS and torch.isfinite(trace.stats).all()


def test_the_visualizer_draws_every_family(pack_nodes, viz, family, tmp_path):
    import folder_paths

    f, model = family
    out, trace = _sampler(pack_nodes, model, f, record_trace=True)
    before = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(tmp_path))
    try:
        image = viz.GuidanceVisualizer.execute(trace, out, 2).result[0]
    finally:
        folder_paths.set_temp_directory(before)
    assert image.ndim == 4 and image.shape[-1] == 3 and torch.isfinite(image).all()


def test_nag_runs_on_every_family(nag, host_nodes, family):
    """(``test_host_nag.py`` holds the exactness tests.)"""
    f, model = family
    got = _ksampler(host_nodes, nag.NegativeAttentionGuidance.execute(model, f.cond(7), 4.0, 2.5, 0.25, "L1", 0.0,
                                                                       1.0)[0], f, cfg=1.0)
    _finite_like(got, f)
    assert rel_diff(got, _ksampler(host_nodes, model, f, cfg=1.0)) > 1e-4


def _bare(f, seed=3):
    return [[f.cond(seed)[0][0], {}]]


POOLED = [n for n, f in FAMILIES.items() if f.pooled_width]


@pytest.mark.parametrize("name", POOLED)
@pytest.mark.parametrize("where", ["negatives[0]", "unconditional", "positive", "negative"])
def test_a_prompt_without_the_pooled_vector_the_family_needs_is_named(pack_nodes, host_nodes, custom, name, where):
    f = FAMILIES[name]
    model = f.model()
    kw, pos, neg = {}, f.cond(1), f.cond(2)
    if where == "negatives[0]":
        kw["negatives"] = pack_nodes.WeightedNegative.execute(_bare(f), 1.0, 0.0, 1.0)[0]
    elif where == "unconditional":
        kw["unconditional"] = _bare(f)
    elif where == "positive":
        pos = _bare(f)
    else:
        neg = _bare(f)
    message = re.escape(f"input '{where}' has no 'pooled_output', which this model ({f.config_class}) needs")
    with count_forwards(model) as rows:
        with pytest.raises(ValueError, match=f"NegativeGuidanceSampler: {message}"):
            pack_nodes.NegativeGuidanceSampler.execute(model, 0, STEPS, CFG, "euler", "normal", pos, neg, f.latent(),
                                                       1.0, 0.0, 1.0, **kw)
        with pytest.raises(ValueError, match=f"NegativeGuider: {message}"):
            pack_nodes.NegativeGuider.execute(model, pos, neg, CFG, 0.0, 1.0, **kw)
        extras = dict(kw) or {"negatives": _extras(pack_nodes, f)}
        if where.startswith(("negatives", "unconditional")):
            with pytest.raises(ValueError, match=f"NegativeGuidance: {message}"):
                pack_nodes.NegativeGuidance.execute(model, 0.0, 1.0, **extras)
        else:  # the KSampler's own prompts are only known when sampling starts
            patched = pack_nodes.NegativeGuidance.execute(model, 0.0, 1.0, **extras)[0]
            with pytest.raises(ValueError, match=f"NegativeGuidance: {message}"):
                host_nodes.common_ksampler(patched, 0, STEPS, CFG, "euler", "normal", pos, neg, f.latent())
    assert rows == [], "sampling started before the error"


def test_families_without_a_pooled_vector_take_prompts_without_one(pack_nodes):
    for name in ("sd15", "wan"):
        f = FAMILIES[name]
        negs = pack_nodes.WeightedNegative.execute(_bare(f), 1.0, 0.0, 1.0)[0]
        out = _sampler(pack_nodes, f.model(), f, neg=_bare(f, 2), negatives=negs)[0]["samples"]
        _finite_like(out, f)


@pytest.mark.parametrize("name", ["sd15", "flux"])
def test_a_sigma_rule_outside_the_models_range_is_named(pack_nodes, name, caplog):
    """Sigma thresholds are in the model's units: SD-type sigmas run 14.6..0.03, flow sigmas 1..0."""
    rn = importlib.import_module("negative_guidance_pack.nodes.rules")
    f = FAMILIES[name]
    model = f.model()
    high = float(model.get_model_object("model_sampling").sigma_max)
    never = [rn.NegativeRuleInterval.execute(high * 1.5, high * 3)[0], rn.NegativeRuleMinSigma.execute(high * 2, True)[0]]
    for rule in never:
        with pytest.raises(ValueError, match=r"NegativeGuidance: input 'rule' \(.*\) would never guide on this model"):
            pack_nodes.NegativeGuidance.execute(model, 0.0, 1.0, rule=rule)
    caplog.clear()
    pack_nodes.NegativeGuidance.execute(model, 0.0, 1.0, rule=rn.NegativeRuleMinSigma.execute(high * 2, False)[0])
    assert "skips over the whole run" in caplog.text
    assert ("a flow model" in caplog.text) == f.flow


def test_on_flux_the_negative_prompt_needs_real_cfg_and_the_extras_act_at_cfg_one(pack_nodes, host_nodes):
    """Flux-dev is guidance-distilled: at cfg 1 the host never predicts the negative prompt, so it does nothing.
    The pack's extra negatives still act at cfg 1, measured from the negative prompt's prediction."""
    f = FAMILIES["flux"]
    model = f.model(seed=1)
    at_one = [_ksampler(host_nodes, model, f, cfg=1.0, neg=f.cond(s)) for s in (2, 5)]
    assert torch.equal(at_one[0], at_one[1])
    at_three = [_ksampler(host_nodes, model, f, cfg=3.0, neg=f.cond(s)) for s in (2, 5)]
    assert rel_diff(at_three[0], at_three[1]) > 1e-4
    with count_forwards(model) as rows:
        got = _sampler(pack_nodes, model, f, cfg=1.0, negatives=_extras(pack_nodes, f))[0]["samples"]
    assert rows == [3] * STEPS and rel_diff(got, at_one[0]) > 1e-4
    guidance = _ksampler(host_nodes, model, f, cfg=1.0, neg=f.cond(2))
    lower = host_nodes.common_ksampler(model, 0, STEPS, 1.0, "euler", "normal", f.cond(1, guidance=1.5), f.cond(2),
                                       f.latent())[0]["samples"]
    assert rel_diff(lower, guidance) > 1e-4, "the guidance embedding is read from the positive's conditioning"


def test_dng_tracks_the_posterior_through_the_hosts_rectified_flow_ancestral_step(host):
    """The host's ``sample_euler_ancestral_RF`` is the oracle for the step's mean (zero noise) and spread (unit noise)."""
    from comfy.k_diffusion import sampling

    gen = torch.Generator().manual_seed(0)
    x_prev, base, negp = (torch.randn(2, 16, 4, 4, generator=gen) for _ in range(3))
    sigmas = torch.tensor([0.8, 0.5])
    noise = torch.randn(2, 16, 4, 4, generator=gen)

    def step(denoised, n):
        return sampling.sample_euler_ancestral_RF(lambda x, s, **kw: denoised, x_prev, sigmas, disable=True,
                                                  noise_sampler=lambda a, b: n)

    mu_base, mu_neg = step(base, torch.zeros_like(noise)), step(negp, torch.zeros_like(noise))
    std = float(((step(base, noise) - mu_base) / noise).flatten()[0])
    x = step(negp, noise)  # the sample followed the negative concept
    p0 = torch.tensor([0.2, 0.2])
    got = rules.dng_posterior(p0, x, sigmas[1:].expand(2), x_prev, sigmas[:1].expand(2), base, negp,
                              1.0, 0.0, 0.0, 1.0, flow=True)
    for i in range(2):
        normal = lambda mu: torch.distributions.Normal(mu[i].double(), std).log_prob(x[i].double()).sum()
        want = min(1.0, 0.2 * math.exp(min(float(normal(mu_neg) - normal(mu_base)), 80.0)))
        assert float(got[i]) == pytest.approx(want, rel=1e-4)
    assert (got > p0).all()


def test_rescale_on_flow_models_works_on_the_velocity_not_the_hosts_v_formula(pack_nodes, host_nodes):
    advanced_nodes = importlib.import_module("comfy_extras.nodes_model_advanced")
    for name in ("sd15", "sd3"):
        f = FAMILIES[name]
        model = f.model(seed=1)
        host = _ksampler(host_nodes, advanced_nodes.RescaleCFG().patch(model, 0.7)[0], f)
        ours = _sampler(pack_nodes, model, f, rule=rules.Rescale(phi=0.7))[0]["samples"]
        assert (rel_diff(ours, host) <= 1e-5) == (not f.flow)


def test_a_latent_with_another_familys_dimensions_is_named(pack_nodes):
    sd15, wan = FAMILIES["sd15"], FAMILIES["wan"]
    with pytest.raises(ValueError, match=re.escape("NegativeGuidanceSampler: input 'latent_image' has 5 dimensions but "
                                                   "this model's latents are [batch, channels, height, width] (images)")):
        _sampler(pack_nodes, sd15.model(), sd15, lat={"samples": torch.zeros(1, 4, 2, 8, 8)})
    # a 4-D latent on a video model is a one-frame video, as the host makes it
    out = _sampler(pack_nodes, wan.model(), wan, lat={"samples": torch.zeros(1, 16, 8, 8)})[0]["samples"]
    assert out.shape == (1, 16, 1, 8, 8) and torch.isfinite(out).all()


def test_a_prompt_from_another_familys_encoder_is_named(pack_nodes):
    """SD1.5's 768-wide prompt on SDXL (2048); on the DiTs, widths are checked against the positive prompt."""
    sdxl, flux = FAMILIES["sdxl"], FAMILIES["flux"]
    small = [[torch.randn(1, 77, 768), dict(sdxl.cond(1)[0][1])]]
    with pytest.raises(ValueError, match=re.escape("NegativeGuidanceSampler: input 'positive' must have this model's "
                                                   "context width (2048, SDXL)")):
        pack_nodes.NegativeGuidanceSampler.execute(sdxl.model(), 0, STEPS, CFG, "euler", "normal", small, small,
                                                   sdxl.latent(), 1.0, 0.0, 1.0)
    wrong = pack_nodes.WeightedNegative.execute([[torch.randn(1, 77, 768), dict(flux.cond(3)[0][1])]], 1.0, 0.0, 1.0)[0]
    with pytest.raises(ValueError, match=re.escape("NegativeGuidanceSampler: input 'negatives[0]' must have the "
                                                   "embedding width of 'positive' (4096)")):
        _sampler(pack_nodes, flux.model(), flux, negatives=wrong)


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux", "wan"])
def test_half_precision_families_stay_finite(pack_nodes, name):
    f = FAMILIES[name]
    model = f.model(seed=2, dtype=torch.bfloat16 if name in ("flux", "wan") else torch.float16)
    for rule in (rules.APG(), rules.Rescale(), rules.DynamicNegative()):
        out = _sampler(pack_nodes, model, f, lat=f.latent(batch=2), sampler="euler_ancestral",
                       negatives=_extras(pack_nodes, f), unconditional=f.cond(4), rule=rule)[0]["samples"]
        _finite_like(out, f, batch=2)
