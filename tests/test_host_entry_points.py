"""The three entry points against the real host's KSampler and CFGGuider, on a tiny random model."""
from __future__ import annotations

import importlib

import pytest
import torch
from tests_support import cond, count_forwards, latent, rel_diff

TOL = 1e-5
SAMPLERS = ["euler", "dpmpp_2m", "heun"]
STEPS = 4


@pytest.fixture(scope="module")
def conds():
    return {"pos": cond(1), "neg": cond(2), "extra": [cond(10 + i) for i in range(3)], "empty": cond(99)}


def ksampler(host_nodes, model, pos, neg, cfg=7.0, sampler="euler", steps=STEPS, lat=None):
    return host_nodes.common_ksampler(model, 0, steps, cfg, sampler, "normal", pos, neg, lat or latent())[0]["samples"]


def ours(g, model, pos, neg, cfg=7.0, sampler="euler", steps=STEPS, lat=None, start=0.0, end=1.0, **kw):
    return g.NegativeGuidanceSampler.execute(model, 0, steps, cfg, sampler, "normal", pos, neg, lat or latent(),
                                             1.0, start, end, **kw)[0]["samples"]


def custom_advanced(custom, guider, sampler="euler", steps=STEPS):
    sigmas = custom.BasicScheduler().get_sigmas(guider.model_patcher, "normal", steps, 1.0)[0]
    noise = custom.Noise_RandomNoise(0)
    out = custom.SamplerCustomAdvanced().sample(noise, guider, custom.comfy.samplers.sampler_object(sampler), sigmas,
                                                latent())
    return out[0]["samples"]


def chain(g, items):
    negs = None
    for c, w, s, e in items:
        negs = g.WeightedNegative.execute(c, w, s, e, negatives=negs)[0]
    return negs


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_entry_point_at_its_defaults_is_the_host(pack_nodes, host_nodes, custom, tiny_model, conds, sampler):
    g, pos, neg = pack_nodes, conds["pos"], conds["neg"]
    ref = ksampler(host_nodes, tiny_model, pos, neg, sampler=sampler)
    patched = g.NegativeGuidance.execute(tiny_model, 0.0, 1.0)[0]
    assert rel_diff(ksampler(host_nodes, patched, pos, neg, sampler=sampler), ref) <= TOL
    assert rel_diff(ours(g, tiny_model, pos, neg, sampler=sampler), ref) <= TOL

    host_guider = custom.CFGGuider().get_guider(tiny_model, pos, neg, 7.0)[0]
    ref_custom = custom_advanced(custom, host_guider, sampler)
    guider = g.NegativeGuider.execute(tiny_model, pos, neg, 7.0, 0.0, 1.0)[0]
    assert rel_diff(custom_advanced(custom, guider, sampler), ref_custom) <= TOL


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_the_engines_own_path_is_exact_when_the_extras_cancel(pack_nodes, host_nodes, custom, tiny_model, conds, sampler):
    """An extra negative equal to its reference adds exactly nothing: the hooks' path alone is measured."""
    g, pos, neg = pack_nodes, conds["pos"], conds["neg"]
    negs = chain(g, [(neg, 3.0, 0.0, 1.0)])
    ref = ksampler(host_nodes, tiny_model, pos, neg, sampler=sampler)
    with count_forwards(tiny_model) as rows:
        got = ours(g, tiny_model, pos, neg, sampler=sampler, negatives=negs)
    assert rel_diff(got, ref) <= TOL
    assert rows and set(rows) == {3}  # pos, primary, extra: one forward a model evaluation
    guider = g.NegativeGuider.execute(tiny_model, pos, neg, 7.0, 0.0, 1.0, negatives=negs)[0]
    host_guider = custom.CFGGuider().get_guider(tiny_model, pos, neg, 7.0)[0]
    assert rel_diff(custom_advanced(custom, guider, sampler), custom_advanced(custom, host_guider, sampler)) <= TOL


def test_three_extra_negatives_cost_one_forward_a_step(pack_nodes, tiny_model, conds):
    g = pack_nodes
    negs = chain(g, [(c, 1.0, 0.0, 1.0) for c in conds["extra"]])
    with count_forwards(tiny_model) as rows:
        ours(g, tiny_model, conds["pos"], conds["neg"], negatives=negs)
    assert rows == [5] * STEPS  # one forward per euler step: pos + negative + 3 extras as batch rows


def test_three_extra_negatives_cost_one_forward_a_step_for_a_batch_of_two(pack_nodes, tiny_model, conds):
    g = pack_nodes
    negs = chain(g, [(c, 1.0, 0.0, 1.0) for c in conds["extra"]])
    with count_forwards(tiny_model) as rows:
        ours(g, tiny_model, conds["pos"], conds["neg"], negatives=negs, lat=latent(batch=2))
    assert rows == [10] * STEPS


def _sigmas(model, steps):
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)


def _in_window(model, sigma, start, end):
    ms = model.get_model_object("model_sampling")
    hi = float("inf") if start <= 0 else ms.percent_to_sigma(start)
    lo = -float("inf") if end >= 1 else ms.percent_to_sigma(end)
    return lo <= sigma <= hi


@pytest.mark.parametrize("start,end", [(0.5, 1.0), (0.0, 0.5), (0.25, 0.75)])
def test_a_window_skips_the_negative_exactly_outside_it(pack_nodes, host_nodes, tiny_model, conds, start, end):
    g, steps = pack_nodes, 8
    sigmas = _sigmas(tiny_model, steps)[:-1].tolist()
    expected = [2 if _in_window(tiny_model, s, start, end) else 1 for s in sigmas]
    assert 1 in expected and 2 in expected
    with count_forwards(tiny_model) as rows:
        ours(g, tiny_model, conds["pos"], conds["neg"], steps=steps, start=start, end=end)
    assert rows == expected


def test_half_window_makes_half_the_steps_single_branch(pack_nodes, tiny_model, conds):
    g, steps = pack_nodes, 10
    with count_forwards(tiny_model) as rows:
        ours(g, tiny_model, conds["pos"], conds["neg"], steps=steps, start=0.5, end=1.0)
    assert rows.count(1) == rows.count(2) == steps // 2


def test_an_extra_window_skips_that_branch_only(pack_nodes, tiny_model, conds):
    g, steps = pack_nodes, 8
    negs = chain(g, [(conds["extra"][0], 1.0, 0.0, 1.0), (conds["extra"][1], 1.0, 0.5, 1.0)])
    sigmas = _sigmas(tiny_model, steps)[:-1].tolist()
    expected = [4 if _in_window(tiny_model, s, 0.5, 1.0) else 3 for s in sigmas]
    with count_forwards(tiny_model) as rows:
        ours(g, tiny_model, conds["pos"], conds["neg"], steps=steps, negatives=negs)
    assert rows == expected


def test_outside_the_window_the_unconditional_stands_in(pack_nodes, host_nodes, tiny_model, conds):
    """With the unconditional equal to the negative, a windowed negative is the host's full-time CFG."""
    g = pack_nodes
    ref = ksampler(host_nodes, tiny_model, conds["pos"], conds["neg"])
    with count_forwards(tiny_model) as rows:
        got = ours(g, tiny_model, conds["pos"], conds["neg"], start=0.5, end=1.0, unconditional=conds["neg"])
    assert rel_diff(got, ref) <= TOL
    assert rows == [2] * STEPS


def test_outside_the_window_without_unconditional_there_is_no_guidance(pack_nodes, host_nodes, tiny_model, conds):
    g = pack_nodes
    # a window that covers no step at all: every step is the positive alone (the host's cfg = 1)
    ref = ksampler(host_nodes, tiny_model, conds["pos"], conds["neg"], cfg=1.0)
    got = ours(g, tiny_model, conds["pos"], conds["neg"], start=1.0, end=1.0)
    assert rel_diff(got, ref) <= TOL
    assert torch.isfinite(got).all()


def test_weight_zero_changes_nothing_and_costs_nothing(pack_nodes, host_nodes, tiny_model, conds):
    g = pack_nodes
    ref = ksampler(host_nodes, tiny_model, conds["pos"], conds["neg"])
    negs = chain(g, [(conds["extra"][0], 0.0, 0.0, 1.0)])
    with count_forwards(tiny_model) as rows:
        got = ours(g, tiny_model, conds["pos"], conds["neg"], negatives=negs)
    assert torch.equal(got, ref)
    assert rows == [2] * STEPS


@pytest.mark.parametrize("cfg", [1.0, 4.0, 12.0])
def test_negative_equal_to_positive_gives_the_positive(pack_nodes, host_nodes, tiny_model, conds, cfg):
    g, pos = pack_nodes, conds["pos"]
    ref = ksampler(host_nodes, tiny_model, pos, pos, cfg=1.0)  # the positive's prediction alone
    negs = chain(g, [(pos, 2.0, 0.0, 1.0)])  # an extra equal to the reference: the engine's path is used
    assert rel_diff(ours(g, tiny_model, pos, pos, cfg=cfg, negatives=negs), ref) <= TOL


def test_cfg_one_keeps_the_host_shortcut_unless_a_negative_needs_computing(pack_nodes, host_nodes, tiny_model, conds):
    g = pack_nodes
    with count_forwards(tiny_model) as rows:
        ours(g, tiny_model, conds["pos"], conds["neg"], cfg=1.0)
    assert rows == [1] * STEPS
    negs = chain(g, [(conds["extra"][0], 2.0, 0.0, 1.0)])
    with count_forwards(tiny_model) as rows:
        got = ours(g, tiny_model, conds["pos"], conds["neg"], cfg=1.0, negatives=negs)
    assert rows == [3] * STEPS  # positive, the negative as reference, the extra
    assert not torch.equal(got, ksampler(host_nodes, tiny_model, conds["pos"], conds["neg"], cfg=1.0))
    # the model passed in is untouched: the host's flag is not set on it
    assert "disable_cfg1_optimization" not in tiny_model.model_options


def test_extra_negative_changes_the_result_and_runs_are_repeatable(pack_nodes, host_nodes, tiny_model, conds):
    g = pack_nodes
    negs = chain(g, [(conds["extra"][0], 2.0, 0.0, 1.0)])
    a = ours(g, tiny_model, conds["pos"], conds["neg"], negatives=negs)
    b = ours(g, tiny_model, conds["pos"], conds["neg"], negatives=negs)
    assert torch.equal(a, b)
    assert rel_diff(a, ksampler(host_nodes, tiny_model, conds["pos"], conds["neg"])) > 1e-3


def test_other_nodes_cfg_and_post_cfg_hooks_keep_running(pack_nodes, host_nodes, tiny_model, conds):
    g, pos, neg = pack_nodes, conds["pos"], conds["neg"]
    advanced = importlib.import_module("comfy_extras.nodes_model_advanced")
    calls = []

    def post_cfg(args):
        calls.append(args["sigma"])
        return args["denoised"]

    rescaled = advanced.RescaleCFG().patch(tiny_model, 0.7)[0]
    rescaled.set_model_sampler_post_cfg_function(post_cfg)
    ref = ksampler(host_nodes, rescaled, pos, neg)
    assert len(calls) == STEPS
    cancelling = chain(g, [(neg, 3.0, 0.0, 1.0)])
    for model in (g.NegativeGuidance.execute(rescaled, 0.0, 1.0, negatives=cancelling)[0], rescaled):
        calls.clear()
        if model is rescaled:  # the pack's patch applied first, RescaleCFG after it
            model = advanced.RescaleCFG().patch(g.NegativeGuidance.execute(tiny_model, 0.0, 1.0, negatives=cancelling)[0], 0.7)[0]
            model.set_model_sampler_post_cfg_function(post_cfg)
        got = ksampler(host_nodes, model, pos, neg)
        assert len(calls) == STEPS, "another node's post-cfg hook stopped running"
        assert rel_diff(got, ref) <= TOL, "RescaleCFG's cfg function was dropped"
    # and the extra negative still acts on top of RescaleCFG
    acting = g.NegativeGuidance.execute(rescaled, 0.0, 1.0, negatives=chain(g, [(conds["extra"][0], 2.0, 0.0, 1.0)]))[0]
    assert rel_diff(ksampler(host_nodes, acting, pos, neg), ref) > 1e-3
