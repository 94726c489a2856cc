"""Removal through the host: every common host sampler and schedule on the toy model with known truth.

The toy model (``NegativeGuidanceToyModel``) in-process, through the host's KSampler: 100 pictures
(24x24), 20 steps, "portrait of a man" with the negative "mustache" at cfg 4, by full CFG and by the
cached negative. Per sampler and schedule: the share of pictures with a mustache, the distance to the
true target (RMS per pixel from the clean-shaven face, in the concepts' std), the distance from full
CFG's pictures of the same seed (RMS per pixel, same units) and the branches predicted per model
evaluation. Writes the chart to ``out/toy_host_samplers.png``.

    python bench/toy_host_samplers.py [--n 100] [--steps 20] [--out out/toy_host_samplers.png]
"""
from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path

from demo_host import ROOT, load_host_and_pack
from PIL import Image, ImageDraw
from tiny import count_forwards

log = logging.getLogger("negative_guidance.toy_host_samplers")
SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "uni_pc", "ddim", "lcm")
SCHEDULES = ("karras", "normal", "exponential")
CFG, SIZE = 4.0, 192


def measure(host_nodes, g, toy, rules, model, vae, encode, n, steps):
    lat = host_nodes.EmptyLatentImage().generate(SIZE, SIZE, n)[0]
    target = toy.image_template("man", SIZE // 8).flatten()
    rows = []
    for sampler in SAMPLERS:
        for schedule in SCHEDULES:
            full = None
            for label, rule in (("full CFG", None), ("cached negative", rules.CachedNegative())):
                kw = {} if rule is None else {"rule": rule}
                with count_forwards(model) as calls:
                    out = g.NegativeGuidanceSampler.execute(model, 0, steps, CFG, sampler, schedule, encode("portrait of a man"),
                                                            encode("mustache"), lat, 1.0, 0.0, 1.0, **kw)[0]["samples"]
                flat = out.flatten(1).double()
                pictures = vae.decode(out)
                row = dict(sampler=sampler, schedule=schedule, setting=label,
                           share=100 * float(toy.has_mustache(pictures).float().mean()),
                           target=float((flat - target).pow(2).mean(1).sqrt().mean()) / toy.IMAGE_STD,
                           full=0.0 if full is None else float((flat - full).pow(2).mean(1).sqrt().mean()) / toy.IMAGE_STD,
                           branches=sum(calls) / (len(calls) * n))
                full = flat if full is None else full
                rows.append(row)
                log.info("| %s | %s | %s | %.1f | %.2f | %.2f | %.2f |", sampler, schedule, label, row["share"],
                         row["target"], row["full"], row["branches"])
    return rows


def chart(rows, out: Path) -> None:
    """Mustache share per sampler and schedule: a bar for full CFG, a dot for the cached negative."""
    w, h, left, bottom = 980, 300, 40, 250
    img = Image.new("RGB", (w, h + 40), "white")
    d = ImageDraw.Draw(img)
    top = max(r["share"] for r in rows) * 1.15 + 1
    slot = (w - left - 10) / (len(SAMPLERS) * len(SCHEDULES))
    colours = {"karras": (46, 134, 222), "normal": (39, 174, 96), "exponential": (155, 89, 182)}
    d.line([left, bottom, w - 10, bottom], fill=(120, 120, 120))
    d.text((4, 4), f"{top:.0f}%", fill=(80, 80, 80))
    d.text((4, bottom - 10), "0%", fill=(80, 80, 80))
    for i, sampler in enumerate(SAMPLERS):
        d.text((left + i * 3 * slot + 2, bottom + 6), sampler, fill=(0, 0, 0))
        for j, schedule in enumerate(SCHEDULES):
            x = left + (i * 3 + j) * slot
            for r in rows:
                if r["sampler"] != sampler or r["schedule"] != schedule:
                    continue
                y = bottom - r["share"] / top * (bottom - 20)
                if r["setting"] == "full CFG":
                    d.rectangle([x + 3, y, x + slot - 3, bottom], fill=colours[schedule])
                else:
                    d.ellipse([x + slot / 2 - 4, y - 4, x + slot / 2 + 4, y + 4], fill=(231, 76, 60))
    for k, (schedule, colour) in enumerate(colours.items()):
        d.rectangle([left + 160 * k, h + 10, left + 160 * k + 10, h + 20], fill=colour)
        d.text((left + 160 * k + 14, h + 8), f"{schedule}: full CFG", fill=(0, 0, 0))
    d.ellipse([left + 500, h + 10, left + 510, h + 20], fill=(231, 76, 60))
    d.text((left + 514, h + 8), "cached negative", fill=(0, 0, 0))
    d.text((left + 640, h + 8), "mustache share, 'portrait of a man' - 'mustache', cfg 4", fill=(80, 80, 80))
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "toy_host_samplers.png")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    host_nodes, g = load_host_and_pack()
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    toy_model = importlib.import_module("negative_guidance_pack.nodes.toy_model")
    toy = importlib.import_module("negative_guidance_pack.samplers.toy")
    rules = importlib.import_module("negative_guidance_pack.samplers.rules")
    model, clip, vae = toy_model.toy_model()
    encode = lambda text: host_nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    log.info("| sampler | schedule | setting | mustache % | distance to target | distance from full CFG | branches/eval |")
    log.info("| --- | --- | --- | --- | --- | --- | --- |")
    rows = measure(host_nodes, g, toy, rules, model, vae, encode, opts.n, opts.steps)
    chart(rows, opts.out)
    log.info("chart: %s", opts.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
