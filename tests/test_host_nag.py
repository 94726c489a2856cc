"""NAG on the real host: one forward per step at cfg 1, identity at s = 1, the negative's effect, the window."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests_support import cond, count_forwards, latent, rel_diff


@pytest.fixture(scope="module")
def nag_nodes(host):
    return importlib.import_module("negative_guidance_pack.nodes.nag")


def sample(host_nodes, model, cfg=1.0, steps=4, neg=None):
    return host_nodes.common_ksampler(model, 0, steps, cfg, "euler", "normal", cond(1), neg or cond(2),
                                      latent())[0]["samples"]


def patched(nag_nodes, model, scale=5.0, alpha=0.25, start=0.0, end=1.0, norm="L2"):
    return nag_nodes.NegativeAttentionGuidance.execute(model, cond(7), scale, 2.5, alpha, norm, start, end)[0]


@pytest.fixture()
def attn2_rows(tiny_model):
    """Batch rows seen by the first cross-attention of each forward."""
    attn2 = [m for name, m in tiny_model.model.diffusion_model.named_modules() if name.endswith("attn2")][0]
    rows = []
    handle = attn2.register_forward_pre_hook(lambda module, args, kwargs: rows.append(int(args[0].shape[0])),
                                             with_kwargs=True)
    yield rows
    handle.remove()


def test_at_cfg_one_each_step_is_one_forward_and_the_negative_acts(nag_nodes, host_nodes, tiny_model, attn2_rows):
    ref = sample(host_nodes, tiny_model)
    with count_forwards(tiny_model) as rows:
        got = sample(host_nodes, patched(nag_nodes, tiny_model))
    assert rows == [1] * 4  # one forward of one row per step: the negative rides inside attention
    assert attn2_rows[-4:] == [2] * 4  # ...where the row is doubled for Z+ and Z-
    assert rel_diff(got, ref) > 1e-3


def test_scale_one_is_the_unpatched_model(nag_nodes, host_nodes, tiny_model):
    assert patched(nag_nodes, tiny_model, scale=1.0) is tiny_model
    # the patched path itself, with the blend off, gives the unpatched result
    assert rel_diff(sample(host_nodes, patched(nag_nodes, tiny_model, alpha=0.0)), sample(host_nodes, tiny_model)) <= 1e-5


def test_the_window_limits_where_nag_acts(nag_nodes, host_nodes, tiny_model, attn2_rows):
    import comfy.samplers

    ms = tiny_model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", 8)[:-1].tolist()
    start = ms.percent_to_sigma(0.5)
    sample(host_nodes, patched(nag_nodes, tiny_model, start=0.5), steps=8)
    assert attn2_rows[-8:] == [2 if s <= start else 1 for s in sigmas]
    assert 1 in attn2_rows[-8:] and 2 in attn2_rows[-8:]


def test_with_cfg_it_adds_to_the_negative_prompt(nag_nodes, host_nodes, tiny_model, attn2_rows):
    with count_forwards(tiny_model) as rows:
        got = sample(host_nodes, patched(nag_nodes, tiny_model), cfg=7.0)
    assert rows == [2] * 4 and attn2_rows[-4:] == [3] * 4  # positive and negative rows, the positive doubled
    assert rel_diff(got, sample(host_nodes, tiny_model, cfg=7.0)) > 1e-3


def test_a_longer_negative_is_aligned_like_the_host_does(nag_nodes, host_nodes, tiny_model):
    model = nag_nodes.NegativeAttentionGuidance.execute(tiny_model, cond(7, tokens=154), 5.0, 2.5, 0.25, "L2", 0.0, 1.0)[0]
    assert torch.isfinite(sample(host_nodes, model)).all()
