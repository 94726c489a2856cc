"""The pack's nodes chained with the host's RescaleCFG, CFGZeroStar, PerturbedAttentionGuidance and a
LoRA-style weight patch, in both orders: everything runs, stays finite, and every patch still acts."""
from __future__ import annotations

import importlib
import re

import pytest
import torch
from tests_support import cond, latent, rel_diff


def _host_patches():
    advanced = importlib.import_module("comfy_extras.nodes_model_advanced")
    cfg_nodes = importlib.import_module("comfy_extras.nodes_cfg")
    pag = importlib.import_module("comfy_extras.nodes_pag")

    def lora(model):
        m = model.clone()
        key = "diffusion_model.input_blocks.0.0.weight"
        weight = m.model.state_dict()[key]
        delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)) * 0.05
        assert m.add_patches({key: (delta,)}, 1.0) == [key]
        return m

    return {
        "RescaleCFG": lambda m: advanced.RescaleCFG().patch(m, 0.7)[0],
        "CFGZeroStar": lambda m: cfg_nodes.CFGZeroStar.execute(m)[0],
        "PerturbedAttentionGuidance": lambda m: pag.PerturbedAttentionGuidance.execute(m, 3.0)[0],
        "LoRA-style weight patch": lora,
    }


def _ours(g, model):
    negs = g.WeightedNegative.execute(cond(3), 2.0, 0.0, 1.0)[0]
    return g.NegativeGuidance.execute(model, 0.2, 1.0, negatives=negs, unconditional=cond(4))[0]


def _run(host_nodes, model):
    return host_nodes.common_ksampler(model, 0, 3, 7.0, "euler", "normal", cond(1), cond(2), latent())[0]["samples"]


HOST_PATCHES = ["RescaleCFG", "CFGZeroStar", "PerturbedAttentionGuidance", "LoRA-style weight patch"]


@pytest.mark.parametrize("name", HOST_PATCHES)
@pytest.mark.parametrize("order", ["pack first", "pack last"])
def test_each_host_patch_composes_with_the_pack(pack_nodes, host_nodes, tiny_model, name, order):
    patch = _host_patches()[name]
    composed = patch(_ours(pack_nodes, tiny_model)) if order == "pack first" else _ours(pack_nodes, patch(tiny_model))
    out = _run(host_nodes, composed)
    assert torch.isfinite(out).all()
    plain, host_only, ours_only = _run(host_nodes, tiny_model), _run(host_nodes, patch(tiny_model)), _run(
        host_nodes, _ours(pack_nodes, tiny_model))
    # neither side is dropped: each still changes the result by a good share of what it does alone
    assert rel_diff(out, ours_only) > 0.1 * rel_diff(host_only, plain) > 0, f"{name} stopped acting"
    assert rel_diff(out, host_only) > 0.1 * rel_diff(ours_only, plain) > 0, "the pack stopped acting"


def test_the_order_of_model_patches_does_not_matter(pack_nodes, host_nodes, tiny_model):
    """The pack sets its hooks at run time, so it composes the same way whichever side it is applied on."""
    patches = _host_patches()
    for name in ("RescaleCFG", "CFGZeroStar", "LoRA-style weight patch"):
        first = _run(host_nodes, patches[name](_ours(pack_nodes, tiny_model)))
        last = _run(host_nodes, _ours(pack_nodes, patches[name](tiny_model)))
        assert rel_diff(first, last) <= 1e-5, name


def test_all_of_them_at_once(pack_nodes, host_nodes, tiny_model):
    model = tiny_model
    for patch in _host_patches().values():
        model = patch(model)
    out = _run(host_nodes, _ours(pack_nodes, model))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("order", ["pack first", "NAG first"])
def test_nag_composes_with_the_packs_guidance_and_guides_only_the_positive_row(pack_nodes, host_nodes, tiny_model,
                                                                                caplog, order):
    """NAG and the pack's guidance (an extra negative, an unconditional, a cached negative) on one model: the pack's
    batched call carries the positive, the negatives and the unconditional; NAG guides the positive's row alone,
    every evaluation, and at alpha 0 leaves the pack's result as it is."""
    nag = importlib.import_module("negative_guidance_pack.nodes.nag")
    rules = importlib.import_module("negative_guidance_pack.samplers.rules")

    def ours(model):
        negs = pack_nodes.WeightedNegative.execute(cond(3), 2.0, 0.0, 1.0)[0]
        rule = rules.CachedNegative(every=2, full_start=1, max_log_sigma_drop=float("inf"))
        return pack_nodes.NegativeGuidance.execute(model, 0.0, 1.0, negatives=negs, unconditional=cond(4), rule=rule)[0]

    def with_nag(model, alpha=0.25):
        return nag.NegativeAttentionGuidance.execute(model, cond(7), 4.0, 2.5, alpha, "L1", 0.0, 1.0)[0]

    def both(alpha=0.25):
        return with_nag(ours(tiny_model), alpha) if order == "pack first" else ours(with_nag(tiny_model, alpha))

    alone = _run(host_nodes, ours(tiny_model))
    assert rel_diff(_run(host_nodes, both(alpha=0.0)), alone) <= 1e-5
    caplog.clear()
    with caplog.at_level("INFO", logger="negative_guidance_pack"):
        out = _run(host_nodes, both())
    assert torch.isfinite(out).all() and rel_diff(out, alone) > 1e-4
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("NegativeAttentionGuidance on ")]
    assert len(lines) == 1 and re.search(r"evaluations inside its window: 3; .*, rows 1 of [\d-]+$", lines[0]), lines


def test_the_packs_guidance_beside_another_nodes_batch_function_is_the_same(pack_nodes, host_nodes, tiny_model):
    """Another node in the host's ``sampler_calc_cond_batch_function`` slot (here one that only calls the host's own
    ``calc_cond_batch``): the pack calls through to it for cond and uncond and computes its own branches in a second
    batched call; the pictures are the pack's alone."""
    import comfy.samplers

    seen = []

    def other_node(args):
        seen.append(len(args["conds"]))
        return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                              args["model_options"])

    beside = tiny_model.clone()
    beside.set_model_sampler_calc_cond_batch_function(other_node)
    alone = _run(host_nodes, _ours(pack_nodes, tiny_model))
    both = _run(host_nodes, _ours(pack_nodes, beside))
    assert seen == [2] * 3 and rel_diff(both, alone) <= 1e-5


def test_nag_beside_the_pack_and_another_nodes_batch_function_guides_only_the_positive(pack_nodes, host_nodes,
                                                                                        tiny_model):
    """The pack's second batched call (its branches, when another node holds the batch function) keeps their places,
    so NAG does not take the first of them for a positive: the pictures are those without the other node."""
    import comfy.samplers

    nag = importlib.import_module("negative_guidance_pack.nodes.nag")

    def other_node(args):
        return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                              args["model_options"])

    def guided(model):
        return nag.NegativeAttentionGuidance.execute(_ours(pack_nodes, model), cond(7), 4.0, 2.5, 0.25, "L1", 0.0,
                                                     1.0)[0]

    beside = tiny_model.clone()
    beside.set_model_sampler_calc_cond_batch_function(other_node)
    assert rel_diff(_run(host_nodes, guided(beside)), _run(host_nodes, guided(tiny_model))) <= 1e-5
