"""NAG's attention-level formula against a direct, token-by-token computation."""
from __future__ import annotations

import math

import pytest
import torch

from negative_guidance_pack.samplers import nag


def direct(z_pos, z_neg, s, tau, alpha, p):
    out = torch.empty_like(z_pos)
    for b in range(z_pos.shape[0]):
        for t in range(z_pos.shape[1]):
            zp, zn = z_pos[b, t].double(), z_neg[b, t].double()
            zt = s * zp - (s - 1) * zn
            ratio = float(zt.abs().pow(p).sum() ** (1 / p)) / float(zp.abs().pow(p).sum() ** (1 / p))
            zh = zt * (tau / ratio) if ratio > tau else zt
            out[b, t] = (alpha * zh + (1 - alpha) * zp).to(out.dtype)
    return out


@pytest.mark.parametrize("norm,p", [("L2", 2), ("L1", 1)])
@pytest.mark.parametrize("scale,tau,alpha", [(5.0, 2.5, 0.25), (2.0, 1.2, 0.5), (11.0, 100.0, 1.0)])
def test_nag_is_the_papers_formula(norm, p, scale, tau, alpha):
    gen = torch.Generator().manual_seed(0)
    z_pos, z_neg = torch.randn(2, 7, 16, generator=gen), torch.randn(2, 7, 16, generator=gen)
    torch.testing.assert_close(nag.nag(z_pos, z_neg, scale, tau, alpha, norm), direct(z_pos, z_neg, scale, tau, alpha, p),
                               rtol=1e-5, atol=1e-5)


def test_scale_one_or_alpha_zero_is_the_positive():
    gen = torch.Generator().manual_seed(1)
    z_pos, z_neg = torch.randn(1, 5, 8, generator=gen), torch.randn(1, 5, 8, generator=gen)
    torch.testing.assert_close(nag.nag(z_pos, z_neg, 1.0, 2.5, 0.25), z_pos)
    assert torch.equal(nag.nag(z_pos, z_neg, 5.0, 2.5, 0.0), z_pos)


def test_the_bound_holds_per_token():
    gen = torch.Generator().manual_seed(2)
    z_pos, z_neg = torch.randn(1, 9, 8, generator=gen), torch.randn(1, 9, 8, generator=gen) * 10
    out = nag.nag(z_pos, z_neg, 20.0, 1.5, 1.0)
    assert torch.all(out.norm(dim=-1) <= 1.5 * z_pos.norm(dim=-1) + 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_kept_and_finite(dtype):
    z = torch.randn(1, 4, 8).to(dtype)
    out = nag.nag(z, torch.zeros_like(z), 5.0, 2.5, 0.25)
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("name,args", [("scale", (0.5, 2.5, 0.25)), ("tau", (5.0, 0.5, 0.25)), ("alpha", (5.0, 2.5, 1.5)),
                                        ("scale", (math.nan, 2.5, 0.25))])
def test_bad_parameters_are_named(name, args):
    with pytest.raises(ValueError, match=name):
        nag.check_parameters(*args)
