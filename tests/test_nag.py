"""NAG's formula against a direct token-by-token computation, and its routing of one attention call
(cross, joint, text-only, negative in rows of its own) against masked attention over the whole call."""
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


def test_the_default_norm_is_the_papers_l1():
    gen = torch.Generator().manual_seed(3)
    z_pos, z_neg = torch.randn(1, 5, 8, generator=gen), torch.randn(1, 5, 8, generator=gen) * 4
    torch.testing.assert_close(nag.nag(z_pos, z_neg, 6.0, 1.5, 0.5), direct(z_pos, z_neg, 6.0, 1.5, 0.5, 1))
    assert nag.Params().norm == "L1"


def test_scale_one_or_alpha_zero_is_the_positive():
    gen = torch.Generator().manual_seed(1)
    z_pos, z_neg = torch.randn(1, 5, 8, generator=gen), torch.randn(1, 5, 8, generator=gen)
    torch.testing.assert_close(nag.nag(z_pos, z_neg, 1.0, 2.5, 0.25), z_pos)
    assert torch.equal(nag.nag(z_pos, z_neg, 5.0, 2.5, 0.0), z_pos)


def test_the_bound_holds_per_token():
    gen = torch.Generator().manual_seed(2)
    z_pos, z_neg = torch.randn(1, 9, 8, generator=gen), torch.randn(1, 9, 8, generator=gen) * 10
    out = nag.nag(z_pos, z_neg, 20.0, 1.5, 1.0, "L2")
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


# ---------------------------------------------------------------------------- routing one attention call
HEADS = 2
PARAMS = nag.Params(6.0, 1.7, 0.6, "L1")


def sdpa(q, k, v, mask=None):
    """The reference attention: [B, L, heads * d] in and out, an additive or boolean mask over keys."""
    b, lq, c = q.shape
    split = lambda t: t.reshape(b, t.shape[1], HEADS, c // HEADS).transpose(1, 2)
    m = None if mask is None else (mask if mask.ndim == 4 else mask[:, None])
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=m)
    return out.transpose(1, 2).reshape(b, lq, c)


def only(keys_allowed, lq, lk):
    """A boolean mask that lets every query see just the keys in ``keys_allowed``."""
    m = torch.zeros(lq, lk, dtype=torch.bool)
    m[:, keys_allowed] = True
    return m[None, None]


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def call(q, k, v, mask=None):
    return nag.Call(q, k, v, mask, q_dim=1, v_dim=1, out_dim=1)


def test_cross_attention_splits_the_keys_and_guides_only_the_positive_rows():
    layout = nag.Layout(((5, 3),))
    rows = nag.Rows(3, torch.tensor([0, 2]))
    q, k, v = rand(3, 7, 8, seed=0), rand(3, 8, 8, seed=1), rand(3, 8, 8, seed=2)
    got = nag.cross_attention(sdpa, call(q, k, v), layout, rows, PARAMS)
    z_pos = sdpa(q, k, v, only(range(5), 7, 8))
    z_neg = sdpa(q, k, v, only(range(5, 8), 7, 8))
    want = z_pos.clone()
    want[[0, 2]] = PARAMS(z_pos[[0, 2]], z_neg[[0, 2]])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("text_first", [True, False])
def test_joint_attention_keeps_each_text_apart_and_guides_the_image(text_first):
    segments = ((3, 2), (2, 1))  # two text parts, as HiDream has
    layout = nag.Layout(segments, image=4, text_first=text_first)
    pos, neg, image = (t.tolist() for t in layout.joint_indices("cpu"))
    n = layout.joint
    rows = nag.Rows(2, torch.tensor([1]))
    q, k, v = (rand(2, n, 8, seed=s) for s in (3, 4, 5))
    got = nag.joint_attention(sdpa, call(q, k, v), layout, rows, PARAMS)
    z_plus = sdpa(q, k, v, only(pos + image, n, n))
    z_minus = sdpa(q, k, v, only(neg + image, n, n))
    want = z_plus.clone()
    want[:, neg] = 0.0                               # row 0 never uses its copy of the negative
    want[1, neg] = z_minus[1, neg]                   # the negative text stream's own update
    want[1, image] = PARAMS(z_plus[1:, image], z_minus[1:, image])[0]
    torch.testing.assert_close(got, want)


def test_a_text_only_attention_keeps_the_two_texts_apart():
    layout = nag.Layout(((4, 3),))
    rows = nag.Rows(1, torch.tensor([0]))
    q, k, v = (rand(1, 7, 8, seed=s) for s in (6, 7, 8))
    got = nag.text_attention(sdpa, call(q, k, v), layout, rows)
    want = torch.cat([sdpa(q[:, :4], k[:, :4], v[:, :4]), sdpa(q[:, 4:], k[:, 4:], v[:, 4:])], dim=1)
    torch.testing.assert_close(got, want)


def test_unused_tokens_are_seen_by_no_attention():
    layout = nag.Layout(((3, 2, 1),), image=2, text_first=False)  # [image 2 | pos 3 | neg 2 | unused 1]
    pos, neg, image = (t.tolist() for t in layout.joint_indices("cpu"))
    assert (pos, neg, image, layout.joint) == ([2, 3, 4], [5, 6], [0, 1], 8)
    rows = nag.Rows(1, torch.tensor([0]))
    q, k, v = (rand(1, 8, 8, seed=s) for s in (9, 10, 11))
    got = nag.joint_attention(sdpa, call(q, k, v), layout, rows, PARAMS)
    z_plus = sdpa(q, k, v, only(pos + image, 8, 8))
    z_minus = sdpa(q, k, v, only(neg + image, 8, 8))
    torch.testing.assert_close(got[0, 7], torch.zeros(8, dtype=torch.float64))
    torch.testing.assert_close(got[0, pos], z_plus[0, pos])
    torch.testing.assert_close(got[0, neg], z_minus[0, neg])
    torch.testing.assert_close(got[0, image], PARAMS(z_plus[:, image], z_minus[:, image])[0])


def test_rotating_tokens_back_by_an_offset_is_rope_at_the_position_they_would_have_alone():
    d, heads = 8, 2
    omega = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))

    def table(position):
        a = position * omega
        return torch.stack([torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)], -1).reshape(-1, 2, 2)

    def rope(x, positions):  # x [B, L, heads * d], positions [L]
        rows = [nag.rotate_tokens(x[:, i:i + 1], table(float(p)), 1, torch.tensor([0]), heads) for i, p in enumerate(positions)]
        return torch.cat(rows, dim=1)

    x = rand(1, 5, heads * d, seed=20)
    at_shifted = rope(x, [7, 8, 9, 10, 11])                  # appended after 7 positive tokens
    back = nag.rotate_tokens(at_shifted, table(-7.0), 1, torch.arange(5), heads)
    torch.testing.assert_close(back, rope(x, [0, 1, 2, 3, 4]))


def test_a_mask_is_cut_with_the_tokens():
    layout = nag.Layout(((5, 3),))
    rows = nag.Rows(2, torch.tensor([1]))
    q, k, v = rand(2, 6, 8, seed=12), rand(2, 8, 8, seed=13), rand(2, 8, 8, seed=14)
    mask = torch.zeros(2, 1, 1, 8, dtype=torch.float64)
    mask[:, ..., 1] = -math.inf  # the host's text mask hides one positive and one negative token
    mask[:, ..., 6] = -math.inf
    got = nag.cross_attention(sdpa, call(q, k, v, mask), layout, rows, PARAMS)
    z_pos = sdpa(q, k, v, only([0, 2, 3, 4], 6, 8))
    z_neg = sdpa(q, k, v, only([5, 7], 6, 8))
    want = z_pos.clone()
    want[1] = PARAMS(z_pos[1:], z_neg[1:])[0]
    torch.testing.assert_close(got, want)


def test_a_heads_first_layout_gives_the_same_result():
    """``skip_reshape`` calls pass [B, heads, L, d]; NAG's token norm still spans all heads."""
    layout = nag.Layout(((5, 3),))
    rows = nag.Rows(2, torch.tensor([0, 1]))
    q, k, v = rand(2, 6, 8, seed=15), rand(2, 8, 8, seed=16), rand(2, 8, 8, seed=17)
    flat = nag.cross_attention(sdpa, call(q, k, v), layout, rows, PARAMS)
    heads = lambda t: t.reshape(t.shape[0], t.shape[1], HEADS, 4).transpose(1, 2)
    attend = lambda q_, k_, v_, m: sdpa(*(t.transpose(1, 2).flatten(2) for t in (q_, k_, v_)), m)
    got = nag.cross_attention(attend, nag.Call(heads(q), heads(k), heads(v), None, 2, 2, 1), layout, rows, PARAMS)
    torch.testing.assert_close(got, flat)


def test_attention_with_its_log_sum_exp_is_attention():
    q, k, v = (rand(2, 2, 6, 4, seed=s).float() for s in (30, 31, 32))
    out, lse = nag.attention_lse(q, k, v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 2.0, dim=-1))
    chunked = nag._attention_lse_chunked(q, k, v, budget=16)
    torch.testing.assert_close(chunked[0], out)
    torch.testing.assert_close(chunked[1], lse)


def test_merging_two_key_sets_is_attention_over_both():
    q, k, v = (rand(1, 2, 5, 4, seed=s).float() for s in (33, 34, 35))
    k2, v2 = rand(1, 2, 3, 4, seed=36).float(), rand(1, 2, 3, 4, seed=37).float()
    merged = nag.merge_attention(*nag.attention_lse(q, k, v), *nag.attention_lse(q, k2, v2))
    both = torch.nn.functional.scaled_dot_product_attention(q, torch.cat([k, k2], 2), torch.cat([v, v2], 2))
    torch.testing.assert_close(merged, both)


@pytest.mark.parametrize("text_first", [True, False])
def test_the_image_computed_once_gives_the_joint_attention(text_first):
    layout = nag.Layout(((3, 2), (2, 2, 1)), image=5, text_first=text_first)
    n = layout.joint
    rows = nag.Rows(3, torch.tensor([0, 2]))
    q, k, v = (rand(3, n, 8, seed=s).float() for s in (38, 39, 40))
    c = nag.Call(q, k, v, None, 1, 1, 1, heads=HEADS)
    want = nag.joint_attention(lambda *a: sdpa(*a).float(), c, layout, rows, PARAMS)
    got = nag.joint_attention_shared_image(lambda *a: sdpa(*a).float(), c, layout, rows, PARAMS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
