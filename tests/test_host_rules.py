"""Rules on the real host: against ComfyUI's own Perp-Neg, APG, RescaleCFG and CFGZeroStar, and the
forward counts of the skipping rules."""
from __future__ import annotations

import importlib

import pytest
import torch
from tests_support import cond, count_forwards, latent, rel_diff

from negative_guidance_pack.samplers import rules

TOL = 1e-5


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class FixedNoise:
    """A NOISE object for SamplerCustomAdvanced that returns a given tensor."""

    def __init__(self, noise, seed=0):
        self.noise, self.seed = noise, seed

    def generate_noise(self, latent_image):
        return self.noise.clone()


def advanced(custom, guider, noise, steps=4, sampler="euler"):
    sigmas = custom.BasicScheduler().get_sigmas(guider.model_patcher, "normal", steps, 1.0)[0]
    lat = {"samples": torch.zeros_like(noise.noise)}
    return custom.SamplerCustomAdvanced().sample(noise, guider, custom.comfy.samplers.sampler_object(sampler),
                                                 sigmas, lat)[0]["samples"]


def ours(g, model, rule, cfg=7.0, steps=4, sampler="euler", **kw):
    args = dict(negative_start_percent=0.0, negative_end_percent=1.0, rule=rule)
    args.update(kw)
    return g.NegativeGuidanceSampler.execute(model, 0, steps, cfg, sampler, "normal", cond(1), cond(2), latent(),
                                             1.0, **args)[0]["samples"]


def ksampler(host_nodes, model, cfg=7.0, steps=4, sampler="euler"):
    return host_nodes.common_ksampler(model, 0, steps, cfg, sampler, "normal", cond(1), cond(2), latent())[0]["samples"]


# ---------------------------------------------------------------------------- Perp-Neg


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5, 7.5])
def test_cfg_is_the_hosts_cfg_function_bit_for_bit(host, scale):
    """``rules.cfg`` against ComfyUI's own ``cfg_function`` with no cfg hook: the same bits, in every dtype."""
    import comfy.samplers

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        gen = torch.Generator().manual_seed(int(scale * 10))
        pos, neg, x = (torch.randn(2, 4, 8, 8, generator=gen).to(dtype) for _ in range(3))
        host_out = comfy.samplers.cfg_function(None, pos, neg, scale, x, torch.ones(2), model_options={})
        assert torch.equal(rules.cfg(pos, neg, scale), host_out), dtype


def test_perp_neg_matches_comfyui_on_one_sample_and_not_on_a_batch(host):
    perpneg = importlib.import_module("comfy_extras.nodes_perpneg")
    x = rand(1, 4, 8, 8, seed=0)
    pos, neg, unc = (rand(1, 4, 8, 8, seed=s) for s in (1, 2, 3))
    theirs = perpneg.perp_neg(x, pos, neg, unc, 1.5, 7.0)
    assert rel_diff(rules.perp_neg(pos, unc, [neg], [7.0 * 1.5], 7.0), theirs) <= TOL
    # a batch of two different samples: ComfyUI's projection sums over the whole batch
    pos2, neg2, unc2 = (torch.cat([t, rand(1, 4, 8, 8, seed=9 + i) * 10]) for i, t in enumerate((pos, neg, unc)))
    ours2 = rules.perp_neg(pos2, unc2, [neg2], [10.5], 7.0)
    theirs2 = perpneg.perp_neg(torch.cat([x, x]), pos2, neg2, unc2, 1.5, 7.0)
    assert rel_diff(ours2[:1], theirs) <= TOL, "per sample, the first sample is unaffected by the second"
    assert rel_diff(theirs2[:1], theirs) > 1e-3, "ComfyUI's Perp-Neg mixes the samples of a batch"


def test_perp_neg_rule_matches_perpneg_guider_on_the_host(pack_nodes, custom, tiny_model):
    perpneg = importlib.import_module("comfy_extras.nodes_perpneg")
    pos, neg, empty = cond(1), cond(2), cond(3)
    noise = FixedNoise(rand(1, 4, 8, 8, seed=5))
    host_guider = perpneg.PerpNegGuider.execute(tiny_model, pos, neg, empty, 7.0, 1.0)[0]
    ref = advanced(custom, host_guider, noise)
    guider = pack_nodes.NegativeGuider.execute(tiny_model, pos, neg, 7.0, 0.0, 1.0, unconditional=empty,
                                               rule=rules.PerpNeg(neg_scale=1.0))[0]
    with count_forwards(tiny_model) as rows:
        got = advanced(custom, guider, noise)
    assert rel_diff(got, ref) <= TOL
    assert rows == [3] * 4  # positive, negative and unconditional in one forward


def test_perp_neg_rule_on_a_batch_equals_each_sample_alone(pack_nodes, custom, tiny_model):
    perpneg = importlib.import_module("comfy_extras.nodes_perpneg")
    pos, neg, empty = cond(1), cond(2), cond(3)
    noise = torch.cat([rand(1, 4, 8, 8, seed=5), rand(1, 4, 8, 8, seed=6) * 0.01])  # two very different starts
    rule = rules.PerpNeg(neg_scale=1.0)

    def run(n):
        guider = pack_nodes.NegativeGuider.execute(tiny_model, pos, neg, 7.0, 0.0, 1.0, unconditional=empty, rule=rule)[0]
        return advanced(custom, guider, FixedNoise(n))

    def run_host(n):
        return advanced(custom, perpneg.PerpNegGuider.execute(tiny_model, pos, neg, empty, 7.0, 1.0)[0], FixedNoise(n))

    both = run(noise)
    for i in range(2):
        assert rel_diff(both[i:i + 1], run(noise[i:i + 1])) <= 1e-4
    host_both = run_host(noise)
    assert max(rel_diff(host_both[i:i + 1], run_host(noise[i:i + 1])) for i in range(2)) > 1e-3


# ---------------------------------------------------------------------------- APG


def _comfy_apg(host_apg_model, cond_, uncond, scale):
    fn = host_apg_model.model_options["sampler_pre_cfg_function"][-1]
    out = fn({"conds_out": [cond_, uncond], "sigma": torch.tensor([1.0]), "cond_scale": scale})
    return out[1] + (out[0] - out[1]) * scale  # the host's cfg_function after the pre-cfg hook


def test_comfyui_apg_is_the_papers_apg_at_cfg_plus_one(host, tiny_model):
    apg_node = importlib.import_module("comfy_extras.nodes_apg").APG
    pos, neg = rand(2, 4, 8, 8, seed=1), rand(2, 4, 8, 8, seed=2)
    model = apg_node.execute(tiny_model, 0.0, 5.0, 0.0)[0]
    theirs = _comfy_apg(model, pos, neg, 6.0)
    assert rel_diff(rules.apg(pos, neg, 7.0, 0.0, 5.0, 0.0, None)[0], theirs) <= TOL  # ours at w = cfg + 1
    assert rel_diff(rules.apg(pos, neg, 6.0, 0.0, 5.0, 0.0, None)[0], theirs) > 1e-3  # off by one in scale


def test_apg_rule_equals_the_hosts_apg_node_at_cfg_minus_one(pack_nodes, host_nodes, tiny_model):
    apg_node = importlib.import_module("comfy_extras.nodes_apg").APG
    ref = ksampler(host_nodes, apg_node.execute(tiny_model, 0.0, 5.0, -0.5)[0], cfg=6.0)
    got = ours(pack_nodes, tiny_model, rules.APG(eta=0.0, norm_threshold=5.0, momentum=-0.5), cfg=7.0)
    assert rel_diff(got, ref) <= 1e-4


def test_stateful_rules_repeat_across_runs_and_shared_clones(pack_nodes, host_nodes, tiny_model):
    for rule in (rules.APG(), rules.DynamicNegative(scale=2.0, temperature=0.5)):
        kw = {"unconditional": cond(3)} if rule.needs_uncond else {}
        a = ours(pack_nodes, tiny_model, rule, **kw)
        b = ours(pack_nodes, tiny_model, rule, **kw)
        assert torch.equal(a, b), rule.name
        patched = pack_nodes.NegativeGuidance.execute(tiny_model, 0.0, 1.0, rule=rule, **kw)[0]
        first, second = ksampler(host_nodes, patched), ksampler(host_nodes, patched)
        assert torch.equal(first, second), f"{rule.name}: state leaked from one run into the next"
        assert rel_diff(first, a) <= TOL


# ---------------------------------------------------------------------------- rescale and CFG-Zero*


def test_rescale_rule_equals_the_hosts_rescalecfg(pack_nodes, host_nodes, tiny_model):
    advanced_nodes = importlib.import_module("comfy_extras.nodes_model_advanced")
    for sampler in ("euler", "dpmpp_2m"):
        ref = ksampler(host_nodes, advanced_nodes.RescaleCFG().patch(tiny_model, 0.7)[0], sampler=sampler)
        got = ours(pack_nodes, tiny_model, rules.Rescale(phi=0.7), sampler=sampler)
        assert rel_diff(got, ref) <= TOL


def test_comfyui_cfg_zero_star_mixes_spaces_and_has_no_zero_init(host):
    nodes_cfg = importlib.import_module("comfy_extras.nodes_cfg")
    x = rand(1, 4, 8, 8, seed=0) * 5
    pos, neg = rand(1, 4, 8, 8, seed=1), rand(1, 4, 8, 8, seed=2)
    cfg_out = rules.cfg(pos, neg, 6.0)

    class Model:
        def clone(self):
            m = Model()
            m.fns = []
            m.set_model_sampler_post_cfg_function = m.fns.append
            return m

    post = nodes_cfg.CFGZeroStar.execute(Model())[0].fns[0]
    theirs = post({"cond_scale": 6.0, "input": x, "cond_denoised": pos, "uncond_denoised": neg, "denoised": cfg_out})
    alpha = rules._dot(x - pos, x - neg) / (rules._dot(x - neg, x - neg) + 1e-8)
    assert rel_diff(theirs, alpha * neg + 6.0 * (pos - alpha * neg)) <= TOL  # s* from noise, applied to denoised
    paper = x - rules.cfg_zero_star(x - pos, x - neg, 6.0)
    assert rel_diff(theirs, paper) > 1e-3


# ---------------------------------------------------------------------------- skipping rules


def _a1111_skips(sigmas, min_sigma, all_steps):
    return [bool((i % 2 or all_steps) and min_sigma > 0 and s < min_sigma) for i, s in enumerate(sigmas)]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("all_steps", [False, True])
def test_min_sigma_skips_the_model_calls_a1111_skips(pack_nodes, tiny_model, sampler, all_steps):
    sigma_log = []
    model = tiny_model.clone()
    model.set_model_unet_function_wrapper(lambda f, a: (sigma_log.append(float(a["timestep"][0])), f(a["input"], a["timestep"], **a["c"]))[1])
    with count_forwards(tiny_model) as rows:
        ours(pack_nodes, model, rules.MinSigma(min_sigma=3.0, all_steps=all_steps), steps=8, sampler=sampler)
    # a skipped call is one forward of one row; the model wrapper saw each call's sigma
    skips = _a1111_skips(sigma_log, 3.0, all_steps)
    assert [1 if s else 2 for s in skips] == rows
    assert any(skips)


def test_skipping_rules_report_what_they_saved(pack_nodes, tiny_model, caplog):
    with caplog.at_level("INFO"), count_forwards(tiny_model) as rows:
        ours(pack_nodes, tiny_model, rules.MinSigma(min_sigma=3.0, all_steps=True), steps=8)
    line = [r.getMessage() for r in caplog.records if "branches predicted" in r.getMessage()][-1]
    assert f"{len(rows)} model evaluations, {sum(rows)} branches predicted (plain CFG: {2 * len(rows)}; " \
           f"saved {2 * len(rows) - sum(rows)})" in line


def test_guidance_interval_guides_only_inside(pack_nodes, tiny_model):
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(tiny_model.get_model_object("model_sampling"), "normal", 8)[:-1].tolist()
    with count_forwards(tiny_model) as rows:
        ours(pack_nodes, tiny_model, rules.GuidanceInterval(sigma_low=0.5, sigma_high=4.0), steps=8)
    assert rows == [2 if 0.5 < s <= 4.0 else 1 for s in sigmas]
    assert 1 in rows and 2 in rows


# ---------------------------------------------------------------------------- errors


def test_a_rule_that_owns_the_combine_refuses_another_cfg_function(pack_nodes, host_nodes, tiny_model):
    advanced_nodes = importlib.import_module("comfy_extras.nodes_model_advanced")
    rescaled = advanced_nodes.RescaleCFG().patch(tiny_model, 0.7)[0]
    patched = pack_nodes.NegativeGuidance.execute(rescaled, 0.0, 1.0, rule=rules.APG())[0]
    with pytest.raises(ValueError, match=r"NegativeGuidance: input 'rule' \(APG\) replaces the combine step.*rescale_cfg"):
        ksampler(host_nodes, patched)
