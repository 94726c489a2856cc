"""The toy model's denoiser against Monte Carlo and its limits; sampling through the real engine."""
from __future__ import annotations

import math

import pytest
import torch

from negative_guidance_pack.samplers import rules, toy


@pytest.mark.parametrize("prompt", ["man", "", "man without mustache"])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 3.0])
def test_denoiser_matches_monte_carlo(prompt, sigma):
    """E[x0 | x] by self-normalised importance sampling over draws from the prompt's mixture."""
    mix = toy.Mixture.for_prompt(prompt)
    gen = torch.Generator().manual_seed(7)
    x0 = mix.sample(400_000, gen)
    points = mix.sample(4, gen) + sigma * torch.randn(4, 2, generator=gen, dtype=torch.float64)  # where it matters
    for x in points:
        w = torch.softmax(-((x0 - x) ** 2).sum(1) / (2 * sigma ** 2), 0)
        mc = (w[:, None] * x0).sum(0)
        ess = 1.0 / float((w ** 2).sum())
        assert ess > 50, "too few effective samples for a fair comparison"
        spread = float((w[:, None] * (x0 - mc) ** 2).sum(0).max().sqrt())  # posterior std of x0
        tol = max(0.01, 4 * spread / math.sqrt(ess))  # four Monte Carlo standard errors
        assert torch.allclose(mix.denoise(x[None], sigma)[0], mc, atol=tol), (x, sigma, tol)


def test_denoiser_limits():
    mix = toy.Mixture.for_prompt("")
    x = torch.tensor([[0.3, -0.7], [-2.0, 2.0]], dtype=torch.float64)
    assert torch.allclose(mix.denoise(x, 1e-5), x, atol=1e-6)  # sigma -> 0: the point itself
    assert torch.allclose(mix.denoise(x, 1e5), mix.mean().expand_as(x), atol=1e-4)  # sigma -> inf: the mean


def test_the_without_phrasing_fills_the_mustache_region_and_the_negative_empties_it():
    alone = toy.sample(toy.ToyRun("man", "", 5.0), n=1000)
    without = toy.sample(toy.ToyRun("man without mustache", "", 5.0), n=1000)
    negated = toy.sample(toy.ToyRun("man", "mustache", 5.0), n=1000)
    share = lambda x: toy.share_in(x, "man with mustache")  # noqa: E731
    assert 0.35 < share(alone) < 0.65
    assert share(without) > 0.9
    assert share(negated) < 0.05 and share(alone) - share(negated) > 0.3  # a wide margin at the default cfg


def test_sampling_plans_with_the_engine():
    half = toy.ToyRun("man", "mustache", 5.0, primary_window=toy.window(0.5, 1.0))
    toy.sample(half, n=10, steps=20)
    inside = sum(s <= toy.percent_to_sigma(0.5) for s in toy.karras_sigmas(20)[:-1])
    assert 0 < inside < 20
    assert half.evaluations == 20 and half.branches == 20 + inside  # the negative only inside its window
    heun = toy.ToyRun("man", "mustache", 5.0, rules.MinSigma(min_sigma=1.0, all_steps=True))
    toy.sample(heun, n=10, steps=10, sampler="heun")
    assert heun.evaluations == 19 and heun.branches < 2 * heun.evaluations


@pytest.mark.parametrize("sampler", toy.SAMPLERS)
def test_samplers_run_and_are_repeatable(sampler):
    run = lambda: toy.sample(toy.ToyRun("man", "mustache", 3.0, rules.APG()), n=50, steps=8, sampler=sampler)  # noqa: E731
    a, b = run(), run()
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_schedule_and_windows():
    s = toy.karras_sigmas(10)
    assert s[0] == pytest.approx(toy.SIGMA_MAX) and s[-2] == pytest.approx(toy.SIGMA_MIN) and s[-1] == 0.0
    assert all(a > b for a, b in zip(s, s[1:]))
    assert toy.percent_to_sigma(0.0) == math.inf and toy.percent_to_sigma(1.0) == -math.inf
    assert toy.SIGMA_MIN < toy.percent_to_sigma(0.5) < toy.SIGMA_MAX


def test_bad_inputs_are_named():
    with pytest.raises(KeyError, match="unknown toy prompt"):
        toy.Mixture.for_prompt("dog")
    with pytest.raises(ValueError, match="sampler must be one of"):
        toy.sample(toy.ToyRun(), n=2, steps=2, sampler="dpm")


def test_sliced_wasserstein_is_zero_for_the_same_set_and_grows_with_a_shift():
    pts = toy.Mixture.for_prompt("man").sample(500, torch.Generator().manual_seed(0))
    assert toy.sliced_wasserstein(pts, pts) == 0.0
    assert toy.sliced_wasserstein(pts, pts + torch.tensor([1.0, 0.0], dtype=pts.dtype)) > 0.5


def test_toy_pictures_differ_only_by_the_mustache_and_the_trace_finds_it():
    from negative_guidance_pack.nodes import drawing
    from negative_guidance_pack.samplers.trace import Trace

    man, mustache = toy.image_template("man"), toy.image_template("man with mustache")
    rows = (man - mustache).abs().sum((0, 2)).nonzero().flatten()
    assert 0 < len(rows) < toy.IMAGE_SIZE // 3
    trace = Trace(preview_size=32)
    run = toy.ToyRun("man", "mustache", 4.0)
    toy.sample(run, n=1, steps=10, images=True, trace=trace)
    trace.finish()
    assert len(trace.steps) == 10 and trace.stats.shape == (10, 4)
    mag = drawing.magnitude(trace.steps[2].guided[0].float() - trace.steps[2].pos[0].float())
    peak_row = int(mag.max(1).argmax())
    assert int(rows.min()) <= peak_row <= int(rows.max())
