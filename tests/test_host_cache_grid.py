"""A few cells of the cached negative's grid (``bench/cache_grid.py``) at seeds the benchmark does not use, through
the host on the toy model: at the node's defaults each cell meets the grid's criteria against full CFG (mustache
share within 2 points, at least 95% the same pictures, no more off the data +1 point), where the fixed cadence
with FasterCache's unbounded growth overshoots; a sampler it cannot serve is exactly full CFG. The work the grid
skips is checked here too: a candidate it takes from full CFG's run is that run, and without CUDA a ``_gpu``
sampler is its twin."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from negative_guidance_pack.samplers import rules

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import cache_grid  # noqa: E402

N, SEED = 512, 41000
CELLS = [("euler", "karras", 8.0, 10), ("heun", "normal", 4.0, 10), ("lms", "karras", 2.0, 10),
         ("dpmpp_2m", "karras", 8.0, 30), ("euler_ancestral", "simple", 4.0, 30), ("heun", "exponential", 2.0, 30)]
OVERSHOOT = [("euler", "karras", 7.0, 20), ("euler", "karras", 8.0, 10)]


@pytest.fixture(scope="module")
def grid(host, host_nodes):
    toy = importlib.import_module("negative_guidance_pack.samplers.toy")
    g = importlib.import_module("negative_guidance_pack.nodes.guidance")
    model, clip, vae = importlib.import_module("negative_guidance_pack.nodes.toy_model").toy_model()
    lat = host_nodes.EmptyLatentImage().generate(cache_grid.SIZE, cache_grid.SIZE, N)[0]

    def encode(text):
        return host_nodes.CLIPTextEncode().encode(clip, text)[0]

    def cell(sampler, scheduler, cfg, steps, rule):
        return cache_grid.run_cell(g, toy, model, vae, encode, lat, sampler, scheduler, cfg, steps, SEED, rule)
    return cell


def off_share(result) -> float:
    return 100 * float(result["off"].double().mean())


def criteria(full, cached) -> dict:
    """The grid's three measures of one cell: mustache points apart, same pictures (%), extra points off the data."""
    return {"share": 100 * abs(cached["share"] - full["share"]),
            "same": 100 * float((full["cls"] == cached["cls"]).double().mean()),
            "off": off_share(cached) - off_share(full)}


@pytest.mark.parametrize("sampler,scheduler,cfg,steps", CELLS)
def test_the_defaults_keep_full_cfgs_pictures(grid, sampler, scheduler, cfg, steps):
    full, cached = grid(sampler, scheduler, cfg, steps, None), grid(sampler, scheduler, cfg, steps, rules.CachedNegative())
    c = criteria(full, cached)
    assert c["share"] <= 2.0 and c["same"] >= 95.0 and c["off"] <= 1.0, c
    if steps == 30 and scheduler != "exponential":
        assert cached["branches"] < 2.0  # branches per evaluation: small steps are served cheaply


def test_the_fixed_cadence_unbounded_overshoots(grid):
    unbounded = cache_grid.candidates(rules, ["extrapolated"])["extrapolated"]
    worst = max(off_share(grid(*cell, unbounded)) - off_share(grid(*cell, None)) for cell in OVERSHOOT)
    assert worst > 5.0  # the measure can fail: FasterCache's growth alone leaves the data


@pytest.mark.parametrize("sampler", sorted(rules.FULL_CFG_SAMPLERS))
def test_each_sampler_it_cannot_serve_is_full_cfg(grid, sampler):
    full, cached = grid(sampler, "karras", 4.0, 10, None), grid(sampler, "karras", 4.0, 10, rules.CachedNegative())
    assert torch.equal(full["out"], cached["out"]) and cached["branches"] == 2.0


def test_a_fallback_cell_is_full_cfg(grid, monkeypatch):
    monkeypatch.setitem(rules.FULL_CFG_SAMPLERS, "euler", "a test's entry")
    full, cached = grid("euler", "normal", 4.0, 10, None), grid("euler", "normal", 4.0, 10, rules.CachedNegative())
    assert torch.equal(full["out"], cached["out"]) and cached["branches"] == 2.0


SHORTCUT = [("euler", "karras", 8.0, 10, True), ("heun", "normal", 4.0, 10, True), ("dpm_2", "simple", 2.0, 30, True),
            ("dpmpp_2s_ancestral", "karras", 4.0, 10, False), ("dpmpp_2m", "simple", 4.0, 30, False)]


@pytest.mark.parametrize("sampler,scheduler,cfg,steps,expected", SHORTCUT)
def test_a_candidate_the_grid_takes_from_full_cfg_is_full_cfgs_run(grid, sampler, scheduler, cfg, steps, expected):
    """The grid does not run a candidate that predicts both branches at every evaluation of full CFG's run (its
    plan from that run's sigmas, or a fallback sampler); run anyway it is that run, bit for bit, and no other is."""
    rule = rules.CachedNegative()
    full, cached = grid(sampler, scheduler, cfg, steps, None), grid(sampler, scheduler, cfg, steps, rule)
    taken = cache_grid.full_throughout(rule, full, sampler, rules.FULL_CFG_SAMPLERS, N)
    assert taken == expected == torch.equal(full["out"], cached["out"]) == (cached["branches"] == 2.0)
    if taken:
        assert cached["sigmas"] == full["sigmas"]


def test_without_cuda_a_gpu_sampler_is_its_twin(grid):
    """The grid takes a ``_gpu`` sampler's cells from its twin where there is no CUDA, and only there."""
    samplers = ["dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_sde_gpu", "euler"]
    assert cache_grid.gpu_twins(samplers, cuda=True) == {}
    assert cache_grid.gpu_twins(samplers, cuda=False) == {"dpmpp_2m_sde_gpu": "dpmpp_2m_sde"}
    rule = rules.CachedNegative()
    for r in (None, rule):
        assert torch.equal(grid("dpmpp_2m_sde", "karras", 4.0, 10, r)["out"],
                           grid("dpmpp_2m_sde_gpu", "karras", 4.0, 10, r)["out"])
