"""The cached negative on the real host: exactly full CFG at k = 1 through every entry point, the
planned branches skipped and no others (first- and second-order samplers), one latent per seed,
per sample, and with windows, extras, every rule and the families' models."""
from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from step_reference import Combo, Reference, RuleDesc
from tests_support import cond, count_forwards, latent, rel_diff

from negative_guidance_pack.samplers import rules

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from families import FAMILIES  # noqa: E402

STEPS = 8


@pytest.fixture(scope="module")
def rule_nodes(host):
    return importlib.import_module("negative_guidance_pack.nodes.rules")


def sampler_run(g, model, rule=None, cfg=7.0, sampler="euler", lat=None, steps=STEPS, **kw):
    args = dict(negative_start_percent=0.0, negative_end_percent=1.0)
    if rule is not None:
        args["rule"] = rule
    args.update(kw)
    return g.NegativeGuidanceSampler.execute(model, 0, steps, cfg, sampler, "normal", cond(1), cond(2),
                                             lat or latent(), 1.0, **args)[0]["samples"]


def guider_run(g, custom, model, rule=None, sampler="euler"):
    guider = g.NegativeGuider.execute(model, cond(1), cond(2), 7.0, 0.0, 1.0,
                                      **({"rule": rule} if rule is not None else {}))[0]
    sigmas = custom.BasicScheduler().get_sigmas(model, "normal", STEPS, 1.0)[0]
    return custom.SamplerCustomAdvanced().sample(custom.Noise_RandomNoise(0), guider,
                                                 custom.comfy.samplers.sampler_object(sampler), sigmas,
                                                 latent())[0]["samples"]


def patch_run(g, host_nodes, model, rule=None, sampler="euler"):
    patched = g.NegativeGuidance.execute(model, 0.0, 1.0, **({"rule": rule} if rule is not None else {}))[0]
    return host_nodes.common_ksampler(patched, 0, STEPS, 7.0, sampler, "normal", cond(1), cond(2), latent())[0]["samples"]


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_every_one_is_full_cfg_bit_for_bit_through_every_entry_point(pack_nodes, host_nodes, custom, tiny_model, sampler):
    every_one = rules.CachedNegative(every=1)
    assert torch.equal(sampler_run(pack_nodes, tiny_model, every_one, sampler=sampler),
                       sampler_run(pack_nodes, tiny_model, sampler=sampler))
    assert torch.equal(guider_run(pack_nodes, custom, tiny_model, every_one, sampler),
                       guider_run(pack_nodes, custom, tiny_model, sampler=sampler))
    assert torch.equal(patch_run(pack_nodes, host_nodes, tiny_model, every_one, sampler),
                       host_nodes.common_ksampler(tiny_model, 0, STEPS, 7.0, sampler, "normal", cond(1), cond(2),
                                                  latent())[0]["samples"])


def forwards(model):
    """A clone of ``model`` that records (sigma, batch rows) at every forward (an APPLY_MODEL wrapper)."""
    import comfy.patcher_extension

    seen, clone = [], model.clone()

    def record(executor, x, t, *args, **kwargs):
        seen.append((float(t.max()), int(x.shape[0])))
        return executor(x, t, *args, **kwargs)

    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_record", record)
    return clone, seen


def planned_rows(params: dict, sigmas: list) -> list:
    """The batch rows the documented rule gives a run whose evaluations are at ``sigmas`` (the step reference's
    decision, a cached difference always at hand)."""
    ref, rows = Reference(Combo(7.0, RuleDesc("cached", params))), []
    ref.diff["primary"] = None
    for s in sigmas:
        rows.append(1 if ref.branches(s)[0]["primary"] == "rebuilt" else 2)
        ref.n += 1
    return rows


PLANS = [(sampler, STEPS, every, start, math.inf) for sampler in ("euler", "heun") for every, start in
         [(4, 2), (3, 0), (2, 5)]]
PLANS += [(sampler, 30, 3, 2, 0.3) for sampler in ("euler", "heun", "dpm_2", "dpmpp_2m")]
PLANS += [(sampler, STEPS, 4, 1, 1.0) for sampler in ("heun", "dpm_2")]


@pytest.mark.parametrize("sampler,steps,every,full_start,drop", PLANS)
def test_the_negative_is_predicted_on_exactly_the_planned_evaluations(pack_nodes, tiny_model, monkeypatch, sampler,
                                                                      steps, every, full_start, drop):
    """At each forward's own sigma, the rows the documented rule plans: second-order samplers repeat a sigma or
    evaluate between two, and the adaptive rule predicts the negative there (dpm_2's fallback to full CFG lifted)."""
    monkeypatch.delitem(rules.FULL_CFG_SAMPLERS, sampler, raising=False)
    params = dict(every=every, full_start=full_start, max_log_sigma_drop=drop, growth=1.2)
    model, seen = forwards(tiny_model)
    out = sampler_run(pack_nodes, model, rules.CachedNegative(**params), sampler=sampler, steps=steps)
    rows = [r for _, r in seen]
    assert rows == planned_rows(params, [s for s, _ in seen]) and 1 in rows
    assert torch.isfinite(out).all()
    assert rel_diff(out, sampler_run(pack_nodes, tiny_model, sampler=sampler, steps=steps)) > 1e-6


def test_a_run_sampled_twice_gives_the_same_latent(pack_nodes, tiny_model):
    rule = rules.CachedNegative()
    assert torch.equal(sampler_run(pack_nodes, tiny_model, rule), sampler_run(pack_nodes, tiny_model, rule))


def test_a_batch_of_two_is_two_runs_of_one(pack_nodes, tiny_model):
    rule = rules.CachedNegative(growth=1.2)
    both = sampler_run(pack_nodes, tiny_model, rule, lat=latent(batch=2))
    for i in range(2):
        one = sampler_run(pack_nodes, tiny_model, rule, lat=dict(latent(), batch_index=[i]))
        assert rel_diff(both[i:i + 1], one) <= 1e-5


def test_the_rebuilt_negative_follows_the_cached_difference(pack_nodes, tiny_model):
    """On a reused evaluation the host's negative is D_pos - sigma * growth^j * d, d from the last full one."""
    import comfy.patcher_extension

    seen = []

    def record(executor, model, conds, x, timestep, model_options):
        out = executor(model, conds, x, timestep, model_options)
        seen.append((timestep.clone(), [o.clone() for o in out]))
        return out

    rule = rules.CachedNegative(every=3, full_start=0, growth=1.3, bounded=False, sigma_power=1.0,
                                max_log_sigma_drop=math.inf)
    model = tiny_model.clone()
    model.add_wrapper(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, record)
    calls = []
    model.set_model_sampler_cfg_function(lambda a: (calls.append((a["sigma"].clone(), a["cond_denoised"].clone(),
                                                                  a["uncond_denoised"].clone())),
                                                    a["input"] - (a["uncond_denoised"] + 7.0 * (a["cond_denoised"] - a["uncond_denoised"])))[1])
    sampler_run(pack_nodes, model, rule)
    sigma0, pos0, neg0 = calls[0]
    d = (pos0 - neg0) / sigma0.reshape(-1, 1, 1, 1)
    for j in (1, 2):
        sigma, pos, neg = calls[j]
        want = pos - sigma.reshape(-1, 1, 1, 1) * 1.3 ** j * d
        assert rel_diff(neg, want) <= 1e-5


def test_it_composes_with_windows_extras_and_every_rule(pack_nodes, tiny_model):
    chain = pack_nodes.WeightedNegative.execute(cond(5), 1.0, 0.2, 0.9)[0]
    plain = sampler_run(pack_nodes, tiny_model)
    inner_rules = [None, rules.PerpNeg(), rules.APG(), rules.Rescale(), rules.CFGZeroStar(), rules.DynamicNegative(),
                   rules.MinSigma(min_sigma=3.0), rules.GuidanceInterval(sigma_low=0.5, sigma_high=8.0)]
    for inner in inner_rules:
        rule = rules.CachedNegative(inner=inner)
        kw = {"unconditional": cond(3)} if rule.needs_uncond else {}
        with count_forwards(tiny_model) as rows:
            out = sampler_run(pack_nodes, tiny_model, rule, sampler="euler_ancestral", negatives=chain,
                              negative_start_percent=0.1, **kw)
        assert torch.isfinite(out).all() and rel_diff(out, plain) > 1e-6, inner
        assert sum(rows) < len(rows) * (3 + bool(kw)), inner  # some branches were rebuilt, not predicted


def test_a_cached_negative_inside_a_skipping_rule_is_refused_by_name(rule_nodes):
    cached = rule_nodes.NegativeRuleCachedNegative.execute(4, 1.06, 2, False, 0.25, 1.0)[0]
    with pytest.raises(ValueError, match=re.escape("NegativeRuleMinSigma: input 'rule' must not be a cached negative")):
        rule_nodes.NegativeRuleMinSigma.execute(1.0, False, rule=cached)
    with pytest.raises(ValueError, match=re.escape("NegativeRuleCachedNegative: input 'every' must be a whole number")):
        rule_nodes.NegativeRuleCachedNegative.execute(0, 1.06, 2, False, 0.25, 1.0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_and_the_frequency_split(pack_nodes, name):
    f = FAMILIES[name]
    model = f.model(seed=1)
    for bands in (False, True):
        out = pack_nodes.NegativeGuidanceSampler.execute(
            model, 0, STEPS, 4.0, "euler", "normal", f.cond(1), f.cond(2), f.latent(batch=2), 1.0, 0.0, 1.0,
            rule=rules.CachedNegative(bands=bands))[0]["samples"]
        assert torch.isfinite(out).all() and out.shape[0] == 2


def test_a_saved_node_without_the_new_inputs_keeps_its_meaning_and_gets_the_bound(rule_nodes):
    node = rule_nodes.NegativeRuleCachedNegative
    names = [i.id for i in node.define_schema().inputs]
    assert names[:7] == ["every", "growth", "full_start", "frequency_split", "cutoff", "high_growth", "rule"]
    assert names[7:] == ["bounded", "cache_start_percent", "sigma_power", "max_log_sigma_drop"]  # new at the end
    assert all(i.optional for i in node.define_schema().inputs[7:])
    old = node.execute(4, 1.06, 2, False, 0.25, 1.0)[0]
    assert old == rules.CachedNegative(every=4, growth=1.06, full_start=2, bounded=True, sigma_power=0.5,
                                       max_log_sigma_drop=0.3)
    fixed = node.execute(4, 1.06, 2, False, 0.25, 1.0, max_log_sigma_drop=100.0)[0]
    assert fixed.max_log_sigma_drop == math.inf and not fixed.adaptive


@pytest.mark.parametrize("name,value", [("cache_start_percent", 1.5), ("sigma_power", -1.0),
                                        ("max_log_sigma_drop", -0.5), ("max_log_sigma_drop", 101.0)])
def test_the_new_inputs_refuse_bad_values_by_name(rule_nodes, name, value):
    kw = {"cache_start_percent": 0.0, "sigma_power": 1.0, "max_log_sigma_drop": 0.3, name: value}
    with pytest.raises(Exception, match=f"NegativeRuleCachedNegative.*{name}"):
        rule_nodes.NegativeRuleCachedNegative.execute(4, 1.06, 2, False, 0.25, 1.0, **kw)


@pytest.mark.parametrize("percent", [0.3, 0.6])
def test_caching_starts_where_the_models_own_percent_puts_it(pack_nodes, tiny_model, percent):
    import comfy.samplers
    ms = tiny_model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", STEPS)
    start = next(i for i, s in enumerate(sigmas[:-1]) if float(s) <= float(ms.percent_to_sigma(percent)))
    rule = rules.CachedNegative(every=3, full_start=0, from_percent=percent, max_log_sigma_drop=math.inf)
    with count_forwards(tiny_model) as rows:
        sampler_run(pack_nodes, tiny_model, rule)
    assert rows == [2] * start + [2 if (i - start) % 3 == 0 else 1 for i in range(start, STEPS)]


def test_a_sampler_it_cannot_serve_runs_full_cfg_and_says_so(pack_nodes, tiny_model, monkeypatch, caplog):
    monkeypatch.setitem(rules.FULL_CFG_SAMPLERS, "heun", "a test's entry")
    with caplog.at_level("INFO", logger="negative_guidance_pack"):
        with count_forwards(tiny_model) as rows:
            out = sampler_run(pack_nodes, tiny_model, rules.CachedNegative(), sampler="heun")
    assert set(rows) == {2}
    assert torch.equal(out, sampler_run(pack_nodes, tiny_model, sampler="heun"))
    assert "runs full CFG on the sampler heun (a test's entry)" in caplog.text
    with count_forwards(tiny_model) as rows:
        sampler_run(pack_nodes, tiny_model, rules.CachedNegative(), sampler="euler", steps=30)
    assert 1 in rows  # other samplers are still served cheaply
