"""A few cells of the cached negative's grid (``bench/cache_grid.py``) at seeds the benchmark does not use, through
the host on the toy model: at the node's defaults each cell meets the grid's criteria against full CFG (mustache
share within 2 points, at least 95% the same pictures, no more off the data +1 point), where the fixed cadence
with FasterCache's unbounded growth overshoots; a sampler it cannot serve is exactly full CFG."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

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
    return 100 * float(result[1].double().mean())


def criteria(full, cached) -> dict:
    """The grid's three measures of one cell: mustache points apart, same pictures (%), extra points off the data."""
    return {"share": 100 * abs(cached[2] - full[2]), "same": 100 * float((full[0] == cached[0]).double().mean()),
            "off": off_share(cached) - off_share(full)}


@pytest.mark.parametrize("sampler,scheduler,cfg,steps", CELLS)
def test_the_defaults_keep_full_cfgs_pictures(grid, sampler, scheduler, cfg, steps):
    full, cached = grid(sampler, scheduler, cfg, steps, None), grid(sampler, scheduler, cfg, steps, rules.CachedNegative())
    c = criteria(full, cached)
    assert c["share"] <= 2.0 and c["same"] >= 95.0 and c["off"] <= 1.0, c
    if steps == 30 and scheduler != "exponential":
        assert cached[3] < 2.0  # branches per evaluation: small steps are served cheaply


def test_the_fixed_cadence_unbounded_overshoots(grid):
    unbounded = cache_grid.candidates(rules, ["extrapolated"])["extrapolated"]
    worst = max(off_share(grid(*cell, unbounded)) - off_share(grid(*cell, None)) for cell in OVERSHOOT)
    assert worst > 5.0  # the measure can fail: FasterCache's growth alone leaves the data


@pytest.mark.parametrize("sampler", sorted(rules.FULL_CFG_SAMPLERS))
def test_each_sampler_it_cannot_serve_is_full_cfg(grid, sampler):
    full, cached = grid(sampler, "karras", 4.0, 10, None), grid(sampler, "karras", 4.0, 10, rules.CachedNegative())
    assert bool((full[0] == cached[0]).all()) and full[2] == cached[2] and cached[3] == 2.0


def test_a_fallback_cell_is_full_cfg(grid, monkeypatch):
    monkeypatch.setitem(rules.FULL_CFG_SAMPLERS, "euler", "a test's entry")
    full, cached = grid("euler", "normal", 4.0, 10, None), grid("euler", "normal", 4.0, 10, rules.CachedNegative())
    assert bool((full[0] == cached[0]).all()) and full[2] == cached[2] and cached[3] == 2.0
