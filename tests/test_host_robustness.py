"""Bad latents and NaN conditionings are named before sampling; half precision, batches and odd sizes stay finite."""
from __future__ import annotations

import math

import pytest
import torch

from tests_support import cond, count_forwards, latent, make_tiny_sd15

from negative_guidance_pack.samplers import rules


def _sample(g, model, pos=None, neg=None, lat=None, steps=2, **kw):
    args = dict(negative_start_percent=0.0, negative_end_percent=1.0)
    args.update(kw)
    return g.NegativeGuidanceSampler.execute(model, 0, steps, 7.0, "euler", "normal", pos or cond(1), neg or cond(2),
                                             lat or latent(), 1.0, **args)[0]["samples"]


def test_a_latent_from_another_family_is_named(pack_nodes, tiny_model):
    with count_forwards(tiny_model) as rows, pytest.raises(
            ValueError, match="NegativeGuidanceSampler: input 'latent_image' has 16 channels but this model's latents have 4"):
        _sample(pack_nodes, tiny_model, lat={"samples": torch.randn(1, 16, 8, 8)})
    assert rows == []


def test_an_empty_latent_of_another_width_is_adapted_as_the_host_does(pack_nodes, tiny_model):
    assert _sample(pack_nodes, tiny_model, lat={"samples": torch.zeros(1, 16, 8, 8)}).shape[1] == 4


@pytest.mark.parametrize("where", ["positive", "negative", "extra", "pooled"])
def test_nan_in_a_conditioning_is_named(pack_nodes, tiny_model, where):
    bad = cond(9)
    if where == "pooled":
        bad = [[bad[0][0], {"pooled_output": torch.full((1, 768), math.nan)}]]
    else:
        bad[0][0][0, 3, 5] = math.nan
    kwargs = {}
    if where in ("extra", "pooled"):
        kwargs["negatives"] = pack_nodes.WeightedNegative.execute(cond(3), 1.0, 0.0, 1.0)[0] if where == "pooled" else None
        if where == "extra":
            with pytest.raises(ValueError, match="WeightedNegative: input 'conditioning' contains NaN"):
                pack_nodes.WeightedNegative.execute(bad, 1.0, 0.0, 1.0)
            return
        kwargs["unconditional"] = bad
    name = {"positive": "positive", "negative": "negative", "pooled": "unconditional"}[where]
    with count_forwards(tiny_model) as rows, pytest.raises(ValueError, match=f"input '{name}' contains NaN"):
        _sample(pack_nodes, tiny_model, pos=bad if where == "positive" else None,
                neg=bad if where == "negative" else None, **kwargs)
    assert rows == []


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def half_model(host, request):
    return make_tiny_sd15(dtype=request.param)


@pytest.mark.parametrize("batch,size", [(1, (7, 9)), (2, (8, 8)), (4, (5, 11))])
def test_half_precision_batches_and_odd_sizes_stay_finite(pack_nodes, half_model, batch, size):
    negs = pack_nodes.WeightedNegative.execute(cond(3), 2.0, 0.0, 0.7)[0]
    for rule in (None, rules.APG(), rules.PerpNeg()):
        out = _sample(pack_nodes, half_model, lat={"samples": torch.zeros(batch, 4, *size)}, negatives=negs,
                      rule=rule, unconditional=cond(4), negative_start_percent=0.2, record_trace=True)
        assert out.shape == (batch, 4, *size) and torch.isfinite(out).all(), rule
