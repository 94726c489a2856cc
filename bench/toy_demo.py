"""The pack's main job on a model with known truth: what a negative prompt does to the samples.

Samples the analytic 2-D mixture of ``samplers/toy.py`` with the pack's real engine and rules,
draws one panel per setting (the samples, coloured by the concept they landed in, over the
concepts' regions, with the true target p(x | man, not mustache) outlined) and logs the share
of samples with a mustache in each. Runs in seconds on a CPU, with no ComfyUI and no weights.

    python bench/toy_demo.py [--out out/toy_demo.png] [--n 1500] [--steps 30]
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import comfy_host  # noqa: E402

log = logging.getLogger("negative_guidance.toy_demo")

COLOURS = {"man": (46, 134, 222), "man with mustache": (231, 76, 60), "woman": (155, 89, 182), "cat": (39, 174, 96)}
VIEW = 4.2  # the panel's inner square shows [-VIEW, VIEW]^2 to scale
PANEL = 300
RING = 30  # pixels of the frame around it, where samples beyond the view land, compressed along their direction
INNER = PANEL - 2 * RING


def load_pack():
    """The pack under a fixed name, without ComfyUI (samplers/ never imports the host)."""
    comfy_host.load_pack()
    from negative_guidance_pack.samplers import rules, toy

    return rules, toy


def settings(rules, toy):
    """(title, ToyRun, sampler) for each panel; the pack's defaults except where a setting needs more."""
    return [
        ("positive 'man'", toy.ToyRun("man", "", 5.0), "euler"),
        ("'man without mustache'", toy.ToyRun("man without mustache", "", 5.0), "euler"),
        ("'man' - 'mustache' (CFG 5)", toy.ToyRun("man", "mustache", 5.0), "euler"),
        ("CFG 5, negative until 40%", toy.ToyRun("man", "mustache", 5.0, primary_window=toy.window(0.0, 0.4)),
         "euler"),
        ("Perp-Neg", toy.ToyRun("man", "mustache", 5.0, rules.PerpNeg(), unconditional=""), "euler"),
        ("APG", toy.ToyRun("man", "mustache", 5.0, rules.APG()), "euler"),
        ("Dynamic (prior .5, ancestral)", toy.ToyRun("man", "mustache", 5.0, rules.DynamicNegative(scale=30.0, prior=0.5),
                                                     unconditional=""), "euler_ancestral"),
        ("CFG 2", toy.ToyRun("man", "mustache", 2.0), "euler"),
    ]


def to_pixel(x, y):
    return RING + (x + VIEW) / (2 * VIEW) * INNER, RING + (VIEW - y) / (2 * VIEW) * INNER


def beyond_view(x, y):
    """A sample outside the view, in the frame: its direction kept, its distance past the view squeezed
    into the ring (just past the view at the inner edge, infinitely far at the outer edge)."""
    s = max(abs(x), abs(y))
    ring = VIEW * RING / (INNER / 2)  # the ring's width in data units
    squeezed = VIEW + ring * (1.0 - math.exp(-(s - VIEW) / VIEW))
    return to_pixel(x * squeezed / s, y * squeezed / s)


def draw_panel(points: np.ndarray, labels: list, title: str, toy, lines: list) -> Image.Image:
    img = Image.new("RGB", (PANEL, PANEL + 46), "white")
    d = ImageDraw.Draw(img)
    for name, ((mx, my), s) in toy.COMPONENTS.items():
        colour = tuple(int(c * 0.25 + 255 * 0.75) for c in COLOURS[name])
        (x0, y0), (x1, y1) = to_pixel(mx - 2 * s, my + 2 * s), to_pixel(mx + 2 * s, my - 2 * s)
        d.ellipse([x0, y0, x1, y1], fill=colour)
        d.text((x0, y1 + 2), name, fill=(90, 90, 90))
    (mx, my), s = toy.COMPONENTS["man"]
    (x0, y0), (x1, y1) = to_pixel(mx - 2 * s, my + 2 * s), to_pixel(mx + 2 * s, my - 2 * s)
    d.ellipse([x0 - 3, y0 - 3, x1 + 3, y1 + 3], outline=(0, 0, 0), width=2)  # the true target region
    d.rectangle([0, 0, PANEL - 1, RING - 1], fill=(238, 238, 238))
    d.rectangle([0, PANEL - RING, PANEL - 1, PANEL - 1], fill=(238, 238, 238))
    d.rectangle([0, 0, RING - 1, PANEL - 1], fill=(238, 238, 238))
    d.rectangle([PANEL - RING, 0, PANEL - 1, PANEL - 1], fill=(238, 238, 238))
    for (x, y), label in zip(points, labels):
        if max(abs(x), abs(y)) <= VIEW:
            px, py = to_pixel(x, y)
            d.point([(px, py), (px + 1, py), (px, py + 1)], fill=COLOURS[label])
        else:
            px, py = beyond_view(x, y)
            d.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], outline=COLOURS[label])
    d.rectangle([RING, RING, PANEL - RING, PANEL - RING], outline=(150, 150, 150))
    d.rectangle([0, 0, PANEL - 1, PANEL - 1], outline=(180, 180, 180))
    d.text((4, PANEL + 4), title, fill=(0, 0, 0))
    for i, line in enumerate(lines):
        d.text((4, PANEL + 18 + 12 * i), line, fill=(60, 60, 60))
    return img


def run(n: int, steps: int, out: Path) -> list:
    rules, toy = load_pack()
    target = toy.Mixture.for_prompt("man, clean-shaven").sample(n, torch.Generator().manual_seed(12345))
    panels, figures = [], []
    for title, setting, sampler in settings(rules, toy):
        x = toy.sample(setting, n=n, steps=steps, sampler=sampler, seed=0)
        labels = toy.component_of(x)
        mustache = toy.share_in(x, "man with mustache")
        outside = float((x.abs() > VIEW).any(1).double().mean())
        off_data = toy.share_off_data(x)
        cost = setting.branches / setting.evaluations
        swd = toy.sliced_wasserstein(x, target)
        figures.append((title, mustache, swd, cost, outside))
        lines = [f"mustache {mustache:.1%}  SW {swd:.2f}  {cost:.2f} branches/eval",
                 f"beyond the view (grey frame): {outside:.0%}; off the data {off_data:.0%}"]
        panels.append(draw_panel(x.numpy(), labels, title, toy, lines))
    cols = 4
    rows = (len(panels) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * PANEL, rows * (PANEL + 46)), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % cols) * PANEL, (i // cols) * (PANEL + 46)))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "toy_demo.png")
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=30)
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    figures = run(opts.n, opts.steps, opts.out)
    log.info("%-32s %9s %9s %15s %9s", "setting", "mustache", "SW dist", "branches/eval", "off-view")
    for title, mustache, swd, cost, outside in figures:
        log.info("%-32s %8.1f%% %9.2f %15.2f %8.0f%%", title, 100 * mustache, swd, cost, 100 * outside)
    log.info("target p(x | man, not mustache): 0%% mustache; SW = sliced Wasserstein-1 distance to it "
             "(%d samples, %d Karras steps); picture: %s", opts.n, opts.steps, opts.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
