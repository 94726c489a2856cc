"""The article's experiment in the real ComfyUI server, on the toy model with known truth: content, not just images.

Every prompt goes through the server's HTTP queue and every picture comes back over ``/view``; a
picture shows a mustache when its mustache band is dark (``samplers.toy.has_mustache``). The toy
benchmark says which way each setting moves the share of mustaches; these tests hold the server to it.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from server_support import ROOT, images, run
from step_reference import Combo, Reference, RuleDesc

from negative_guidance_pack.samplers import toy

N, SIZE = 100, 192  # pictures per prompt, and EmptyLatentImage's side (the pictures are SIZE / 8 = 24 px)


def _node(kind, **inputs):
    return {"class_type": kind, "inputs": inputs}


def toy_prompt(positive="portrait of a man", negative="", cfg=1.0, sampler="euler", steps=20, halves=False,
               extras=(), rule=None, nag=None, unconditional=None, window=(0.0, 1.0), visualize=False) -> dict:
    """A toy graph: the toy model, its text encoder, a sampler (the pack's when a pack input is used), decode, save."""
    p = {
        "1": _node("NegativeGuidanceToyModel", independent_halves=halves),
        "2": _node("CLIPTextEncode", text=positive, clip=["1", 1]),
        "3": _node("CLIPTextEncode", text=negative, clip=["1", 1]),
        "4": _node("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=N),
        "8": _node("VAEDecode", samples=["5", 0], vae=["1", 2]),
        "9": _node("SaveImage", images=["8", 0], filename_prefix="negative_guidance/test_toy"),
    }
    model = ["1", 0]
    if nag is not None:
        p["20"] = _node("CLIPTextEncode", text=nag, clip=["1", 1])
        p["21"] = _node("NegativeAttentionGuidance", model=model, negative=["20", 0], scale=5.0, tau=2.5, alpha=0.25,
                        norm="L1", start_percent=0.0, end_percent=1.0)
        model = ["21", 0]
    sampler_inputs = dict(model=model, seed=0, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="normal",
                          positive=["2", 0], negative=["3", 0], latent_image=["4", 0], denoise=1.0)
    if not (extras or rule or unconditional is not None or window != (0.0, 1.0) or visualize):
        p["5"] = _node("KSampler", **sampler_inputs)
        return p
    chain = None
    for i, (text, weight, mask) in enumerate(extras):
        p[f"3{i}"] = _node("CLIPTextEncode", text=text, clip=["1", 1])
        conditioning = [f"3{i}", 0]
        if mask == "left":
            p["40"] = _node("SolidMask", value=0.0, width=SIZE, height=SIZE)
            p["41"] = _node("SolidMask", value=1.0, width=SIZE // 2, height=SIZE)
            p["42"] = _node("MaskComposite", destination=["40", 0], source=["41", 0], x=0, y=0, operation="add")
            p[f"4{i + 3}"] = _node("ConditioningSetMask", conditioning=conditioning, mask=["42", 0], strength=1.0,
                                   set_cond_area="default")
            conditioning = [f"4{i + 3}", 0]
        p[f"5{i}"] = _node("WeightedNegative", conditioning=conditioning, weight=weight, start_percent=0.0, end_percent=1.0,
                           **({"negatives": chain} if chain else {}))
        chain = [f"5{i}", 0]
    extra = dict(negative_start_percent=window[0], negative_end_percent=window[1], record_trace=visualize)
    if chain:
        extra["negatives"] = chain
    if rule is not None:
        kind, params = rule
        p["60"] = _node(kind, **params)
        extra["rule"] = ["60", 0]
    if unconditional is not None:
        p["61"] = _node("CLIPTextEncode", text=unconditional, clip=["1", 1])
        extra["unconditional"] = ["61", 0]
    p["5"] = _node("NegativeGuidanceSampler", **sampler_inputs, **extra)
    if visualize:
        p["70"] = _node("GuidanceVisualizer", trace=["5", 1], latent=["5", 0], steps=4)
    return p


def pictures(server, prompt, node=None) -> torch.Tensor:
    """The pictures a prompt saved (or one node showed), fetched back over the server's ``/view``."""
    entry = run(server["url"], prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    only = entry["outputs"] if node is None else {node: entry["outputs"][node]}
    return torch.cat([torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255)[None]
                      for png in images(server["url"], {"outputs": only})])


def share(server, prompt) -> float:
    return float(toy.has_mustache(pictures(server, prompt)).float().mean())


@pytest.fixture(scope="module")
def alone(server):
    """The share of mustaches with the positive alone (about half the men have one)."""
    return share(server, toy_prompt())


def test_without_gives_more_mustaches_and_the_negative_removes_them(server, alone):
    assert 0.35 < alone < 0.65
    assert share(server, toy_prompt("portrait of a man without mustache")) > alone + 0.12
    assert share(server, toy_prompt(negative="mustache", cfg=4.0)) < 0.1


def test_the_three_example_graphs_tell_the_story(server):
    shares = []
    for name in ("negative_guidance_toy_1_positive", "negative_guidance_toy_2_without", "negative_guidance_toy_3_negative"):
        prompt = json.loads((ROOT / "example_workflows" / "api" / f"{name}.json").read_text())
        shares.append(share(server, prompt))
    assert shares[1] > shares[0] > shares[2] and shares[2] < 0.15


def test_a_weighted_extra_negative_and_nag_remove_them_at_cfg_one(server, alone):
    assert share(server, toy_prompt(extras=[("mustache", 3.0, None)])) < alone - 0.3
    assert share(server, toy_prompt(nag="mustache")) < alone - 0.2


def test_windows_move_the_share_as_the_toy_benchmark_says(server, alone):
    """The mustache is decided early: a negative until 40% removes it, one from 60% hardly does."""
    assert share(server, toy_prompt(negative="mustache", cfg=4.0, window=(0.0, 0.4))) < 0.15
    assert share(server, toy_prompt(negative="mustache", cfg=4.0, window=(0.6, 1.0))) > alone - 0.2


RULES = [
    ("NegativeRulePerpNeg", dict(neg_scale=1.0), ""),
    ("NegativeRuleAPG", dict(eta=0.0, norm_threshold=15.0, momentum=-0.5), None),
    ("NegativeRuleRescale", dict(phi=0.7), None),
    ("NegativeRuleCFGZeroStar", dict(zero_init_steps=1), None),
    ("NegativeRuleDynamic", dict(scale=30.0, prior=0.5, temperature=1.0, offset=0.0, p_min=1e-6, p_max=0.99), ""),
    ("NegativeRuleMinSigma", dict(min_sigma=1.0, all_steps=False), None),
    ("NegativeRuleInterval", dict(sigma_low=0.28, sigma_high=5.42), None),
    ("NegativeRuleCachedNegative", dict(every=3, growth=1.0, full_start=2, frequency_split=False, cutoff=0.25,
                                        high_growth=1.0, sigma_power=0.5, max_log_sigma_drop=1.0), None),
]


DESCRIPTIONS = {
    "NegativeRulePerpNeg": "perp_neg", "NegativeRuleAPG": "apg", "NegativeRuleRescale": "rescale",
    "NegativeRuleCFGZeroStar": "cfg_zero_star", "NegativeRuleDynamic": "dynamic", "NegativeRuleMinSigma": "min_sigma",
    "NegativeRuleInterval": "interval", "NegativeRuleCachedNegative": "cached",
}


def described(kind, params) -> RuleDesc:
    """The rule node's inputs as the step reference's plain description (its frequency_split is the rule's bands)."""
    params = {("bands" if k == "frequency_split" else k): v for k, v in params.items()}
    return RuleDesc(DESCRIPTIONS[kind], params)


def reference_pictures(host, desc: RuleDesc, unconditional, cfg, sampler, steps=20) -> torch.Tensor:
    """The toy graph's pictures sampled in-process by the host, its combine done by the step reference: a
    ``sampler_cfg_function`` fed each branch predicted alone by the host (no code of the pack's engine)."""
    import importlib

    import comfy.patcher_extension
    import comfy.samplers

    host_nodes = importlib.import_module("nodes")
    custom = importlib.import_module("comfy_extras.nodes_custom_sampler")
    toy_node = importlib.import_module("negative_guidance_pack.nodes.toy_model").NegativeGuidanceToyModel
    model, clip, vae = toy_node.execute().result
    enc = lambda text: host_nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    reference = Reference(Combo(cfg, desc, uncond=unconditional is not None))
    seen = {}

    def capture(executor, *args, **kwargs):
        seen["conds"] = args[0].conds
        return executor(*args, **kwargs)

    def combine(args):
        x, sigma = args["input"], args["sigma"]
        keys = {"positive": "positive", "primary": "negative", "uncond": "reference_uncond"}
        alone = {b: comfy.samplers.calc_cond_batch(args["model"], [seen["conds"][k]], x, sigma, args["model_options"])[0]
                 for b, k in keys.items() if k in seen["conds"]}
        sample_sigmas = args["model_options"]["transformer_options"]["sample_sigmas"]
        return x - reference.evaluate(x, float(sigma[0]), sample_sigmas, alone.__getitem__)[0]

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, "reference", capture)
    m.set_model_sampler_cfg_function(lambda args: combine(args))
    guider = comfy.samplers.CFGGuider(m)
    guider.set_conds(enc("portrait of a man"), enc("mustache"))
    if unconditional is not None:
        guider.inner_set_conds({"reference_uncond": enc(unconditional)})
    guider.set_cfg(cfg)
    sigmas = custom.BasicScheduler().get_sigmas(m, "normal", steps, 1.0)[0]
    latent = host_nodes.EmptyLatentImage().generate(SIZE, SIZE, N)[0]
    out = custom.SamplerCustomAdvanced().sample(custom.Noise_RandomNoise(0), guider,
                                                comfy.samplers.sampler_object(sampler), sigmas, latent)[0]
    return vae.decode(out["samples"]).clamp(0, 1)


@pytest.mark.parametrize("kind,params,unconditional", RULES, ids=[r[0] for r in RULES])
def test_every_rule_node_over_http_draws_the_step_references_pictures(server, host, kind, params, unconditional):
    """Each rule node, queued over HTTP, against the same graph sampled in-process with the step reference doing
    the combine: the saved pictures agree to their 8-bit rounding (a picture that sits on a decision boundary may
    flip; one in a hundred is allowed)."""
    sampler = "euler_ancestral" if kind == "NegativeRuleDynamic" else "euler"
    got = pictures(server, toy_prompt(negative="mustache", cfg=4.0, rule=(kind, params), unconditional=unconditional,
                                      sampler=sampler))
    want = torch.from_numpy(np.clip(255.0 * reference_pictures(host, described(kind, params), unconditional, 4.0,
                                                               sampler).numpy(), 0, 255).astype(np.uint8)) / 255
    off = ((got - want).abs().flatten(1).amax(1) > 2.5 / 255).float().mean()
    assert off <= 0.01, (kind, float(off))


def test_the_visualizers_heatmap_lies_on_the_mustache_band(server):
    image = pictures(server, toy_prompt(negative="mustache", cfg=4.0, visualize=True), node="70")[0]
    cell, label, header = 128, 110, 18  # drawing.strips' layout; the heatmap is the fourth column
    band = torch.from_numpy(np.array(Image.fromarray(toy.mustache_band(SIZE // 8).numpy()).resize((cell, cell))))
    x0 = label + 3 * (cell + 4)
    moved = 0
    for row in range(4):  # the shown steps; once the sample has decided, the negative moves nothing
        y0 = header + row * (cell + 4)
        heat = image[y0:y0 + cell, x0:x0 + cell].mean(-1)
        black = heat.min()
        assert float((heat[~band] - black).abs().max()) < 0.05, row  # nothing moved off the band
        moved += float(heat[band].mean() - black) > 0.2
    assert moved >= 1


def test_a_regional_negative_removes_the_mustache_on_its_half_only(server):
    """An extra negative masked to the left half (toy pictures with independent halves): the left half loses
    its mustache, the right half is the picture without the negative. The host predicts zero where a masked
    conditioning does not reach; there the pack takes the negative to say nothing."""
    plain = pictures(server, toy_prompt(halves=True, extras=[("cat", 0.0, None)]))
    regional = pictures(server, toy_prompt(halves=True, extras=[("mustache", 3.0, "left")]))
    band = toy.mustache_band(SIZE // 8)
    left, right = band.clone(), band.clone()
    left[:, SIZE // 16:], right[:, :SIZE // 16] = False, False

    def dark(images, part):
        return float((images.mean(-1)[:, part].mean(1) < 0.4).float().mean())

    assert dark(plain, left) > 0.3 and dark(regional, left) < 0.05
    assert torch.allclose(regional[..., SIZE // 16:, :], plain[..., SIZE // 16:, :], atol=2 / 255)
