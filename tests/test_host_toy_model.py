"""The toy model with known truth on the real host, in-process: its parts are the host's classes, its
prediction is the exact mixture denoiser, its text encoder fails the way real ones do, and the
host's samplers, schedulers and conditioning nodes work on it unchanged."""
from __future__ import annotations

import importlib

import pytest
import torch

from negative_guidance_pack.samplers import toy


@pytest.fixture(scope="module")
def parts(host):
    toy_model = importlib.import_module("negative_guidance_pack.nodes.toy_model")
    return toy_model.NegativeGuidanceToyModel.execute().result


def encode(host_nodes, clip, text):
    return host_nodes.CLIPTextEncode().encode(clip, text)[0]


def test_its_parts_are_the_hosts_own_classes(parts):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sd

    model, clip, vae = parts
    assert isinstance(model, comfy.model_patcher.ModelPatcher) and isinstance(model.model, comfy.model_base.BaseModel)
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)


def test_the_text_encoder_binds_man_and_mustache_and_drops_without(host_nodes, parts):
    _, clip, _ = parts
    weights = lambda text: encode(host_nodes, clip, text)[0][0][0, 1:, 1:].sum(0)  # noqa: E731  (after the start token)
    assert weights("a man without mustache").tolist() == weights("man mustache").tolist() == [1.0, 3.0, 0.0, 0.0]
    assert weights("(mustache:1.5)").tolist() == [0.0, 3.0, 0.0, 0.0]  # the host's prompt weights
    assert encode(host_nodes, clip, "a photo, please")[0][0].shape[1] == 1  # nothing known: the start token alone


@pytest.mark.parametrize("prompt,weights", [("portrait of a man", (1.0, 1.0, 0.0, 0.0)),
                                            ("a man without mustache", (1.0, 3.0, 0.0, 0.0)),
                                            ("", (1.0, 1.0, 1.0, 1.0))])
def test_the_model_predicts_the_exact_mixture_denoiser(host_nodes, parts, prompt, weights):
    model, clip, _ = parts
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.tensor([3.0, 0.5])
    context = encode(host_nodes, clip, prompt)[0][0]
    # The host's samplers hand the model its sigma in transformer_options; the timestep alone round-trips
    # through the discrete schedule and lands within about 1e-3 of it.
    out = model.model.apply_model(x, sigma, c_crossattn=context.expand(2, -1, -1), transformer_options={"sigmas": sigma})
    templates = torch.stack([toy.image_template(c, 16) for c in toy.CONCEPTS])
    want = toy.picture_denoise(x, sigma, torch.tensor([weights] * 2), templates)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "uni_pc", "lcm"])
def test_host_samplers_and_conditioning_nodes_work_on_it_unchanged(host_nodes, custom, parts, sampler):
    model, clip, vae = parts
    pos = host_nodes.ConditioningCombine().combine(encode(host_nodes, clip, "man"), encode(host_nodes, clip, "woman"))[0]
    pos = host_nodes.ConditioningConcat().concat(pos, encode(host_nodes, clip, "man"))[0]
    neg = host_nodes.ConditioningSetTimestepRange().set_range(encode(host_nodes, clip, "cat"), 0.0, 0.5)[0]
    lat = host_nodes.EmptyLatentImage().generate(64, 64, 2)[0]  # 4 channels: the host fixes them to the model's 3
    guider = custom.CFGGuider().get_guider(model, pos, neg, 3.0)[0]
    sigmas = custom.BasicScheduler().get_sigmas(model, "karras", 6, 1.0)[0]
    out = custom.SamplerCustomAdvanced().sample(custom.Noise_RandomNoise(0), guider,
                                                custom.comfy.samplers.sampler_object(sampler), sigmas, lat)[0]["samples"]
    images = host_nodes.VAEDecode().decode(vae, {"samples": out})[0]
    assert images.shape == (2, 8, 8, 3) and torch.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1


def test_nag_and_the_pack_s_entry_points_guide_it(host_nodes, parts):
    nag = importlib.import_module("negative_guidance_pack.nodes.nag")
    g = importlib.import_module("negative_guidance_pack.nodes.guidance")
    model, clip, vae = parts
    pos, empty, mustache = (encode(host_nodes, clip, t) for t in ("portrait of a man", "", "mustache"))
    lat = host_nodes.EmptyLatentImage().generate(192, 192, 100)[0]
    share = lambda samples: float(toy.has_mustache(vae.decode(samples)).float().mean())  # noqa: E731
    alone = share(host_nodes.common_ksampler(model, 0, 12, 1.0, "euler", "normal", pos, empty, lat)[0]["samples"])
    guided = nag.apply_nag(model, mustache, 5.0, 2.5, 0.25, "L1", 0.0, 1.0)
    assert share(host_nodes.common_ksampler(guided, 0, 12, 1.0, "euler", "normal", pos, empty, lat)[0]["samples"]) < alone - 0.2
    extra = g.WeightedNegative.execute(mustache, 3.0, 0.0, 1.0)[0]
    out = g.NegativeGuidanceSampler.execute(model, 0, 12, 1.0, "euler", "normal", pos, empty, lat, 1.0, 0.0, 1.0,
                                            negatives=extra)[0]["samples"]
    assert share(out) < alone - 0.3
