"""The conditionings the pack adds to a run (extras, the unconditional) are prepared as the sampler's negative is:
their conditioning hooks apply (the host's own hooked negative is the oracle), and an area-limited extra leaves the
positive's and negative's predictions as they are without it."""
from __future__ import annotations

import importlib

import pytest
import torch
from tests_support import cond, latent, rel_diff

CFG = 4.0
KEY = "diffusion_model.input_blocks.0.0.weight"


def hooked(c, model):
    """``c`` with a weight hook (as Create Hook LoRA makes) that changes the model's first convolution."""
    hooks = importlib.import_module("comfy.hooks")
    weight = model.model.state_dict()[KEY]
    other = weight + torch.randn(weight.shape, generator=torch.Generator().manual_seed(7)) * 0.2
    return hooks.set_hooks_for_conditioning(c, hooks.create_hook_model_as_lora({KEY: other}, None, 1.0, 1.0))


def ksampler(host_nodes, model, pos, neg, steps=3):
    return host_nodes.common_ksampler(model, 0, steps, CFG, "euler", "normal", pos, neg, latent())[0]["samples"]


@pytest.fixture
def prompts(tiny_model):
    return {"pos": cond(1), "neg": cond(2), "hooked": hooked(cond(3), tiny_model), "plain": cond(3)}


def test_the_hook_changes_the_hosts_own_prediction(host_nodes, tiny_model, prompts):
    hooked_run = ksampler(host_nodes, tiny_model, prompts["pos"], prompts["hooked"])
    assert rel_diff(hooked_run, ksampler(host_nodes, tiny_model, prompts["pos"], prompts["plain"])) > 1e-3


def test_a_hooked_extra_is_predicted_with_its_hook(pack_nodes, host_nodes, tiny_model, prompts):
    """With the main negative off everywhere and the positive as the reference, an extra of weight cfg - 1 is the
    host's CFG against that extra: ``P - (c - 1)(E - P) = E + c (P - E)``."""
    g = pack_nodes
    negs = g.WeightedNegative.execute(prompts["hooked"], CFG - 1.0, 0.0, 1.0)[0]
    model = g.NegativeGuidance.execute(tiny_model, 1.0, 1.0, negatives=negs, unconditional=prompts["pos"])[0]
    ours = ksampler(host_nodes, model, prompts["pos"], prompts["neg"])
    assert rel_diff(ours, ksampler(host_nodes, tiny_model, prompts["pos"], prompts["hooked"])) <= 1e-5


def test_a_hooked_unconditional_is_predicted_with_its_hook(pack_nodes, host_nodes, custom, tiny_model, prompts):
    """Outside the main window the unconditional plays the negative: the host's CFG against the hooked prompt."""
    g = pack_nodes
    guider = g.NegativeGuider.execute(tiny_model, prompts["pos"], prompts["neg"], CFG, 1.0, 1.0,
                                      unconditional=prompts["hooked"])[0]
    sigmas = custom.BasicScheduler().get_sigmas(tiny_model, "normal", 3, 1.0)[0]
    ours = custom.SamplerCustomAdvanced().sample(custom.Noise_RandomNoise(0), guider,
                                                 custom.comfy.samplers.sampler_object("euler"), sigmas, latent())
    assert rel_diff(ours[0]["samples"], ksampler(host_nodes, tiny_model, prompts["pos"], prompts["hooked"])) <= 1e-5


def first_predictions(host_nodes, model, pos, neg):
    """The positive's and the negative's predictions at the first model evaluation, as the host passed them on."""
    seen = []

    def post_cfg(args):
        seen.append((args["cond_denoised"].clone(), args["uncond_denoised"].clone()))
        return args["denoised"]

    m = model.clone()
    m.set_model_sampler_post_cfg_function(post_cfg)
    ksampler(host_nodes, m, pos, neg, steps=2)
    return seen[0]


def test_an_area_limited_extra_leaves_the_main_term_alone(pack_nodes, host_nodes, tiny_model, prompts):
    g = pack_nodes
    area = host_nodes.ConditioningSetArea().append(cond(5), 32, 64, 0, 0, 1.0)[0]  # the left half, in pixels
    negs = g.WeightedNegative.execute(area, 2.0, 0.0, 1.0)[0]
    with_area = g.NegativeGuidance.execute(tiny_model, 0.0, 1.0, negatives=negs, unconditional=cond(6))[0]
    without = g.NegativeGuidance.execute(tiny_model, 0.0, 1.0, unconditional=cond(6),
                                         negatives=g.WeightedNegative.execute(cond(5), 0.0, 0.0, 1.0)[0])[0]
    pos_a, neg_a = first_predictions(host_nodes, with_area, prompts["pos"], prompts["neg"])
    pos_b, neg_b = first_predictions(host_nodes, without, prompts["pos"], prompts["neg"])
    assert rel_diff(pos_a, pos_b) <= 1e-5 and rel_diff(neg_a, neg_b) <= 1e-5
