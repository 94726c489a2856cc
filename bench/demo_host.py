"""The pack's main job, shown in the real host: one sampling run per setting on a tiny random model.

Loads ComfyUI in-process on the CPU (the host ``scripts/comfy_host.py`` finds or makes), runs KSampler and the pack's
NegativeGuidanceSampler on an SD1.5-shaped random UNet, and prints, per setting, the model
forwards and batch rows it cost and how far its latent is from KSampler's.

    python bench/demo_host.py [--steps 10]
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import comfy_host  # noqa: E402

log = logging.getLogger("negative_guidance.demo")


def load_host_and_pack(cpu: bool = True, pytorch_attention: bool = False):
    """Find or make the host (``scripts/comfy_host.py``), import it (on the CPU unless ``cpu`` is False,
    with PyTorch's attention kernel if asked) and the pack by path; return the host's ``nodes`` module
    and the pack's entry points."""
    try:
        comfy_host.import_host(cpu=cpu, pytorch_attention=pytorch_attention)
    except comfy_host.HostNotFound as why:
        raise SystemExit(f"error: {why}") from None
    comfy_host.load_pack()
    return importlib.import_module("nodes"), importlib.import_module(f"{comfy_host.PACK}.nodes.guidance")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cfg", type=float, default=7.0)
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    host_nodes, g = load_host_and_pack()
    sys.path.insert(0, str(ROOT / "bench"))
    from tiny import cond, count_forwards, latent, make_tiny_sd15, rel_diff

    model = make_tiny_sd15()
    pos, neg = cond(1), cond(2)
    extras = None
    for seed in (11, 12, 13):
        extras = g.WeightedNegative.execute(cond(seed), 2.0, 0.0, 1.0, negatives=extras)[0]

    def ksampler():
        return host_nodes.common_ksampler(model, 0, opts.steps, opts.cfg, "euler", "normal", pos, neg, latent())[0]

    def sampler(**kw):
        args = dict(negative_start_percent=0.0, negative_end_percent=1.0)
        args.update(kw)
        return g.NegativeGuidanceSampler.execute(model, 0, opts.steps, opts.cfg, "euler", "normal", pos, neg,
                                                 latent(), 1.0, **args)[0]

    settings = [
        ("KSampler (host)", ksampler),
        ("NegativeGuidanceSampler, defaults", lambda: sampler()),
        ("negative only in the last half", lambda: sampler(negative_start_percent=0.5)),
        ("3 extra negatives, weight 2", lambda: sampler(negatives=extras)),
    ]
    reference = None
    log.info("%-36s %8s %10s %12s %9s", "setting", "forwards", "batch rows", "vs KSampler", "seconds")
    for name, run in settings:
        with count_forwards(model) as rows:
            start = time.perf_counter()
            samples = run()["samples"]
            seconds = time.perf_counter() - start
        reference = samples if reference is None else reference
        log.info("%-36s %8d %10d %12.3g %9.2f", name, len(rows), sum(rows), rel_diff(samples, reference), seconds)
    log.info("(vs KSampler: max|diff| / mean|KSampler|; %d euler steps, cfg %.1f, tiny random SD1.5-shaped UNet)",
             opts.steps, opts.cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
