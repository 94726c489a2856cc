"""An empty latent of another width is adapted; half precision, batches and odd sizes stay finite.

Bad latents and NaN conditionings are named in test_host_bad_inputs.py."""
from __future__ import annotations

import pytest
import torch
from tests_support import cond, latent, make_tiny_sd15

from negative_guidance_pack.samplers import rules


def _sample(g, model, pos=None, neg=None, lat=None, steps=2, **kw):
    args = dict(negative_start_percent=0.0, negative_end_percent=1.0)
    args.update(kw)
    return g.NegativeGuidanceSampler.execute(model, 0, steps, 7.0, "euler", "normal", pos or cond(1), neg or cond(2),
                                             lat or latent(), 1.0, **args)[0]["samples"]


def test_an_empty_latent_of_another_width_is_adapted_as_the_host_does(pack_nodes, tiny_model):
    assert _sample(pack_nodes, tiny_model, lat={"samples": torch.zeros(1, 16, 8, 8)}).shape[1] == 4


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
