"""Pure tests of the engine: no host, random tensors, formulas checked against direct arithmetic."""
from __future__ import annotations

import math

import pytest
import torch

from negative_guidance_pack.samplers import engine, rules
from negative_guidance_pack.samplers.schedule import SigmaWindow, check_percent_window

ALWAYS = SigmaWindow()


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def plan(spec, sigma=None, scale=5.0, **kw):
    return spec.plan(sigma, scale=scale, **kw)


def has(p, branch):
    return p.of(branch) != "absent"


def test_only_the_primary_negative_gives_plain_cfg():
    pos, neg = rand(1, 4, 8, 8, seed=1), rand(1, 4, 8, 8, seed=2)
    spec = engine.GuidanceSpec()
    plan = globals()["plan"](spec)
    assert (has(plan, "primary"), has(plan, "uncond"), plan.extras, plan.negative) == (True, False, (), "primary")
    assert torch.equal(engine.combine_step(spec, plan, None, scale=5.0, pos=pos, primary=neg), neg + (pos - neg) * 5.0)


def test_extra_negatives_follow_composable_not_against_the_reference():
    pos, neg, unc = (rand(2, 4, 8, 8, seed=s) for s in (1, 2, 3))
    extras = [rand(2, 4, 8, 8, seed=s) for s in (4, 5)]
    weights = [2.0, -0.5]
    for has_uncond, ref in ((False, neg), (True, unc)):
        spec = engine.GuidanceSpec(extras=tuple(engine.ExtraNegative(w) for w in weights), has_uncond=has_uncond)
        p = plan(spec)
        got = engine.combine_step(spec, p, None, scale=6.0, pos=pos, primary=neg,
                                  uncond=unc if has_uncond else None, extras=extras)
        want = neg + 6.0 * (pos - neg) - 2.0 * (extras[0] - ref) + 0.5 * (extras[1] - ref)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_weight_zero_and_an_extra_equal_to_the_reference_change_nothing():
    pos, neg = rand(1, 4, 8, 8, seed=1), rand(1, 4, 8, 8, seed=2)
    base = rules.cfg(pos, neg, 7.0)
    assert torch.equal(rules.composable_not(base, [rand(1, 4, 8, 8, seed=9)], [0.0], neg), base)
    assert torch.equal(rules.composable_not(base, [neg.clone()], [3.0], neg), base)


def test_weight_zero_is_never_predicted_and_needs_no_sigma():
    spec = engine.GuidanceSpec(extras=(engine.ExtraNegative(0.0, SigmaWindow(5.0, 1.0)),))
    assert not spec.needs_sigma
    assert plan(spec).extras == ()


@pytest.mark.parametrize("scale", [0.0, 1.0, 4.0, 30.0])
def test_primary_negative_equal_to_positive_gives_the_positive(scale):
    pos = rand(1, 4, 8, 8, seed=1)
    spec = engine.GuidanceSpec()
    assert torch.equal(engine.combine_step(spec, plan(spec), None, scale=scale, pos=pos, primary=pos.clone()), pos)


def test_window_decides_before_the_model_is_called():
    window = SigmaWindow(sigma_start=5.0, sigma_end=1.0)
    spec = engine.GuidanceSpec(primary_window=window)
    assert spec.needs_sigma
    inside, above, below = plan(spec, 3.0), plan(spec, 9.0), plan(spec, 0.5)
    assert has(inside, "primary") and inside.branches == 2
    for p in (above, below):  # outside: one branch, and no guidance (never a zero prediction)
        assert (has(p, "primary"), has(p, "uncond"), p.negative, p.branches) == (False, False, "positive", 1)
    assert has(plan(spec, 5.0), "primary") and has(plan(spec, 1.0), "primary")  # closed, like the host's ranges


def test_outside_its_window_the_primary_falls_back_to_the_unconditional():
    spec = engine.GuidanceSpec(primary_window=SigmaWindow(5.0, 1.0), has_uncond=True)
    p = plan(spec, 9.0)
    assert (has(p, "primary"), has(p, "uncond"), p.negative) == (False, True, "uncond")
    pos, unc = rand(1, 4, 4, 4, seed=1), rand(1, 4, 4, 4, seed=2)
    assert torch.equal(engine.combine_step(spec, p, None, scale=3.0, pos=pos, uncond=unc), unc + (pos - unc) * 3.0)
    bare = engine.GuidanceSpec(primary_window=SigmaWindow(5.0, 1.0))
    assert engine.combine_step(bare, plan(bare, 9.0), None, scale=3.0, pos=pos).equal(pos)


def test_extra_windows_and_their_reference():
    spec = engine.GuidanceSpec(
        primary_window=SigmaWindow(5.0, 0.0),
        extras=(engine.ExtraNegative(1.0, SigmaWindow(10.0, 4.0)), engine.ExtraNegative(1.0)),
    )
    early = plan(spec, 8.0)  # primary outside, both extras inside: the primary is still the reference
    assert early.extras == (0, 1) and has(early, "primary") and early.negative == "positive"
    assert early.reference == "primary"
    late = plan(spec, 2.0)
    assert late.extras == (1,) and late.negative == "primary" and late.branches == 3


def test_cfg_one_skips_the_primary_unless_it_is_needed():
    plain = plan(engine.GuidanceSpec(), scale=1.0)
    assert not has(plain, "primary") and plain.branches == 1
    asked = plan(engine.GuidanceSpec(), scale=1.0, asked=frozenset({"primary"}))
    assert has(asked, "primary") and asked.negative == "primary"
    with_extra = plan(engine.GuidanceSpec(extras=(engine.ExtraNegative(2.0),)), scale=1.0)
    assert has(with_extra, "primary") and with_extra.reference == "primary" and with_extra.branches == 3
    with_uncond = plan(engine.GuidanceSpec(extras=(engine.ExtraNegative(2.0),), has_uncond=True), scale=1.0)
    assert not has(with_uncond, "primary") and has(with_uncond, "uncond") and with_uncond.negative == "positive"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_is_kept(dtype):
    pos, neg, ext = (rand(2, 4, 4, 4, seed=s, dtype=dtype) for s in (1, 2, 3))
    spec = engine.GuidanceSpec(extras=(engine.ExtraNegative(1.5),))
    out = engine.combine_step(spec, plan(spec), None, scale=7.0, pos=pos, primary=neg, extras=[ext])
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_video_latents_work_unchanged():
    pos, neg, ext = (rand(1, 16, 3, 8, 8, seed=s) for s in (1, 2, 3))
    spec = engine.GuidanceSpec(extras=(engine.ExtraNegative(1.0),))
    out = engine.combine_step(spec, plan(spec), None, scale=5.0, pos=pos, primary=neg, extras=[ext])
    torch.testing.assert_close(out, neg + 5.0 * (pos - neg) - (ext - neg))


@pytest.mark.parametrize("start,end,message", [
    (0.6, 0.4, "after end_percent"),
    (-0.1, 0.5, "start_percent must be"),
    (0.0, math.nan, "end_percent must be"),
    (0.0, 1.5, "end_percent must be"),
])
def test_bad_windows_are_named(start, end, message):
    with pytest.raises(ValueError, match=message):
        check_percent_window(start, end, "SomeNode")


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused(weight):
    with pytest.raises(ValueError, match="finite"):
        engine.ExtraNegative(weight)


def test_guide_refuses_a_missing_prediction():
    spec = engine.GuidanceSpec(extras=(engine.ExtraNegative(1.0),))
    with pytest.raises(ValueError, match="active extra negatives"):
        engine.combine_step(spec, plan(spec), None, scale=2.0, pos=rand(1, 4, 4, 4), primary=rand(1, 4, 4, 4))
