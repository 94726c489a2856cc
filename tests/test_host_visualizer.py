"""Sampler -> visualizer in the real host; guider + SamplerCustomAdvanced record too."""
from __future__ import annotations

import importlib

import pytest
import torch
from tests_support import cond, latent, rel_diff


@pytest.fixture(scope="module")
def viz(host):
    return importlib.import_module("negative_guidance_pack.nodes.visualize")


@pytest.fixture()
def temp_dir(host, tmp_path):
    import folder_paths

    before = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(tmp_path))
    yield tmp_path
    folder_paths.set_temp_directory(before)


def run_sampler(g, model, record=True, steps=6, **kw):
    args = dict(negative_start_percent=0.0, negative_end_percent=1.0, record_trace=record)
    args.update(kw)
    return g.NegativeGuidanceSampler.execute(model, 0, steps, 7.0, "euler", "normal", cond(1), cond(2), latent(size=16),
                                             1.0, **args)


def test_sampler_to_visualizer_gives_a_real_picture(pack_nodes, viz, tiny_model, temp_dir):
    lat, trace = run_sampler(pack_nodes, tiny_model)
    assert len(trace.steps) == 6 and trace.stats.shape == (6, 4)
    out = viz.GuidanceVisualizer.execute(trace, lat, 3)
    image = out.result[0]
    assert image.shape[0] == 1 and image.shape[-1] == 3 and float(image.std()) > 0.05
    assert list(temp_dir.glob("*.png")), "no preview was written for the UI"


def test_recording_changes_nothing_and_off_means_no_trace(pack_nodes, host_nodes, tiny_model):
    ref = host_nodes.common_ksampler(tiny_model, 0, 6, 7.0, "euler", "normal", cond(1), cond(2), latent(size=16))[0]
    lat, trace = run_sampler(pack_nodes, tiny_model, record=True)
    assert rel_diff(lat["samples"], ref["samples"]) <= 1e-5
    lat_off, trace_off = run_sampler(pack_nodes, tiny_model, record=False)
    assert trace_off is None and torch.equal(lat_off["samples"], ref["samples"])


def test_a_window_leaves_no_negative_term_outside_it(pack_nodes, tiny_model):
    _, trace = run_sampler(pack_nodes, tiny_model, steps=8, negative_start_percent=0.5)
    outside = [s for s in trace.steps if s.negative == "positive"]
    inside = [s for s in trace.steps if s.negative == "primary"]
    assert outside and inside
    for step in outside:
        assert step.neg is None and torch.equal(step.guided, step.pos)
    share = trace.stats[:, 3]
    assert all(float(share[s.index]) == 0.0 for s in outside) and all(float(share[s.index]) > 0 for s in inside)


def test_guider_records_when_sampler_custom_advanced_runs_it(pack_nodes, custom, viz, tiny_model, temp_dir):
    guider, trace = pack_nodes.NegativeGuider.execute(tiny_model, cond(1), cond(2), 7.0, 0.0, 1.0, record_trace=True)
    sigmas = custom.BasicScheduler().get_sigmas(tiny_model, "normal", 5, 1.0)[0]
    sample = lambda seed: custom.SamplerCustomAdvanced().sample(  # noqa: E731
        custom.Noise_RandomNoise(seed), guider, custom.comfy.samplers.sampler_object("euler"), sigmas, latent(size=16))[0]
    first = sample(0)
    assert len(trace.steps) == 5
    viz.GuidanceVisualizer.execute(trace, first, 2)
    second = sample(1)  # the same guider sampled again: the trace now holds the second run
    viz.GuidanceVisualizer.execute(trace, second, 2)
    with pytest.raises(ValueError, match="GuidanceVisualizer: input 'latent' does not come from the run this trace recorded"):
        viz.GuidanceVisualizer.execute(trace, first, 2)
