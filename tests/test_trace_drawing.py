"""The trace and the visualizer's drawing, without the host: synthetic runs with known answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from negative_guidance_pack.nodes import drawing
from negative_guidance_pack.samplers import rules
from negative_guidance_pack.samplers import trace as tr

SD15_RGB = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]


def synthetic_run(evaluations=8, window=None, size=32, preview_size=64):
    """A run whose negative differs from the positive only in the square [8:16, 20:28]."""
    t = tr.Trace(preview_size=preview_size)
    t.meta["rgb_factors"] = SD15_RGB
    gen = torch.Generator().manual_seed(0)
    for i in range(evaluations):
        sigma = torch.tensor([10.0 * (1 - i / evaluations) + 0.1])
        x = torch.randn(1, 4, size, size, generator=gen) * float(sigma)
        pos = torch.randn(1, 4, size, size, generator=gen)
        neg = pos.clone()
        neg[..., 8:16, 20:28] += 2.0
        active = window is None or window[0] <= i < window[1]
        guided = rules.cfg(pos, neg, 7.0) if active else pos
        t.record(x, sigma, pos, neg if active else None, guided, negative="primary" if active else "positive")
    t.finish()
    return t


def test_the_heatmap_peaks_where_the_negative_differs():
    t = synthetic_run()
    step = t.steps[3]
    mag = drawing.magnitude(step.guided[0].float() - step.pos[0].float())
    assert mag[8:16, 20:28].min() > 1.0 and np.delete(mag.flatten(), [r * 32 + c for r in range(8, 16) for c in range(20, 28)]).max() < 1e-2
    heat = drawing.heatmap(mag, float(mag.max()))
    assert heat[12, 24].sum() > heat[2, 2].sum()


@pytest.mark.parametrize("steps,expected", [(1, 1), (3, 3), (6, 6), (50, 8)])
def test_shown_steps_labels_and_size(steps, expected):
    t = synthetic_run()
    shown = drawing.shown_indices(len(t.steps), steps)
    assert len(shown) == expected and shown[-1] == 7 and (expected == 1 or shown[0] == 0)
    image = drawing.render(t, steps, cell=64)
    assert image.dtype == torch.float32 and image.shape[0] == 1 and image.shape[-1] == 3
    assert image.shape[1] == 18 + expected * (64 + 4) + 200 and image.shape[2] == 110 + 4 * (64 + 4)
    assert float(image.std()) > 0.05


def test_a_window_shows_no_negative_term_outside_it():
    t = synthetic_run(window=(2, 5))
    for i, step in enumerate(t.steps):
        inside = 2 <= i < 5
        assert (step.neg is not None) == inside
        assert torch.equal(step.guided, step.pos) != inside
    share = t.stats[:, tr.STATS.index("neg_share")]
    assert torch.all(share[[0, 1, 5, 6, 7]] == 0) and torch.all(share[2:5] > 0)


def test_previews_are_small_half_precision_cpu_tensors():
    t = synthetic_run(size=128, preview_size=32)
    step = t.steps[0]
    assert step.pos.shape == (1, 4, 32, 32) and step.pos.dtype == torch.float16 and step.pos.device.type == "cpu"
    assert t.memory_bytes() == 8 * tr.bytes_per_evaluation(4, 128, 128, preview_size=32)


def test_memory_for_an_sdxl_run_is_bounded():
    """1024x1024 SDXL: 4x128x128 latents; 50 Euler steps = 50 evaluations (figure quoted in the README)."""
    per_eval = tr.bytes_per_evaluation(4, 128, 128, preview_size=64)
    assert per_eval == 3 * 4 * 64 * 64 * 2 + 16
    assert 50 * per_eval < 5 * 2 ** 20


def test_stats_are_the_stated_formulas():
    x, pos, neg = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3))
    guided = rules.cfg(pos, neg, 5.0)
    s = tr.step_stats(x, pos, neg, guided)
    rms = lambda t: t.pow(2).mean(dim=(1, 2, 3)).sqrt()  # noqa: E731
    torch.testing.assert_close(s[:, 0], rms(pos - x))
    torch.testing.assert_close(s[:, 1], rms(neg - x))
    torch.testing.assert_close(s[:, 2], torch.nn.functional.cosine_similarity((pos - x).flatten(1), (neg - x).flatten(1)))
    torch.testing.assert_close(s[:, 3], rms(guided - pos) / rms(guided - x))


def test_video_latents_preview_their_middle_frame():
    t = tr.Trace()
    v = torch.randn(1, 16, 5, 8, 8)
    t.record(v, torch.tensor([1.0]), v, v, v)
    assert t.steps[0].pos.shape == (1, 16, 8, 8)


def test_bad_trace_settings_are_refused():
    with pytest.raises(ValueError, match="preview_size"):
        tr.Trace(preview_size=2)
    with pytest.raises(ValueError, match="keep"):
        tr.Trace(keep=0)


def test_latent_to_rgb_uses_the_models_factors():
    lat = torch.zeros(4, 2, 2)
    lat[0] = 1.0
    rgb = drawing.latent_to_rgb(lat, SD15_RGB)
    want = np.clip((np.array(SD15_RGB[0]) + 1) / 2, 0, 1) * 255
    assert np.allclose(rgb[0, 0], want, atol=1)
