"""The pack's nodes chained with the host's RescaleCFG, CFGZeroStar, PerturbedAttentionGuidance and a
LoRA-style weight patch, in both orders: everything runs, stays finite, and every patch still acts."""
from __future__ import annotations

import importlib

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
