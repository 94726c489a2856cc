"""One sampling step of a negative prompt, drawn on the model with known truth.

The analytic 2-D mixture of ``samplers/toy.py`` at a mid sigma of its Karras schedule: for one
noisy sample ``x`` of "a man", the toy's exact predictions under the positive "man" (``D_pos``) and
the negative "mustache" (``D_neg``), the guided prediction the sampler follows,
``D = D_neg + cfg * (D_pos - D_neg)`` (the pack's ``rules.cfg``), and what the negative added to the
positive's prediction, ``D - D_pos = (cfg - 1) * (D_pos - D_neg)``: a push away from the mustache.
The right panel follows ten noisy samples near ``x`` from that sigma to the end of the schedule
(Euler): with the positive alone every one ends with a mustache, with the negative none does.
Runs in seconds on a CPU, with no ComfyUI and no weights.

    python bench/toy_step.py [--out docs/toy_step.png]
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from toy_demo import COLOURS, ROOT, load_pack

log = logging.getLogger("negative_guidance.toy_step")

ARROWS = {  # what each arrow is, in the legend's order: (colour, legend)
    "pos": ((46, 134, 222), "D_pos: the prediction for the positive 'man' (man, with or without mustache)"),
    "neg": ((231, 76, 60), "D_neg: the prediction for the negative 'mustache'"),
    "guided": ((20, 20, 20), "D = D_neg + cfg (D_pos - D_neg): the guided prediction the sampler steps towards"),
    "removed": ((243, 156, 18), "D - D_pos = (cfg - 1)(D_pos - D_neg): what the negative adds, away from the mustache"),
}
STEPS, STEP_INDEX = 30, 12  # the toy's Karras schedule and the step drawn (sigma 2.44)
CFG = 2.0  # enough to remove the mustache from these samples without leaving the data
SAMPLE = (-0.45, -0.5)  # the sample x whose step is drawn: between the man and the mustache, nearer the mustache
HANDFUL, SPREAD, SEED = 10, 0.4, 3  # the right panel's samples: x plus SPREAD times standard normal noise
X_RANGE, Y_RANGE = (-3.2, 2.9), (-2.6, 3.5)  # the data square both panels show
PANEL, TOP, BOTTOM = 450, 28, 150  # a panel's side, the title row above it, the legend below both


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def to_pixel(point) -> tuple:
    x, y = float(point[0]), float(point[1])
    (x0, x1), (y0, y1) = X_RANGE, Y_RANGE
    return (x - x0) / (x1 - x0) * PANEL, TOP + (y1 - y) / (y1 - y0) * PANEL


def arrow(d: ImageDraw.ImageDraw, start, end, colour, width: int = 3, head: float = 13.0) -> None:
    (ax, ay), (bx, by) = to_pixel(start), to_pixel(end)
    length = max(((bx - ax) ** 2 + (by - ay) ** 2) ** 0.5, 1e-9)
    ux, uy = (bx - ax) / length, (by - ay) / length
    head = min(head, 0.6 * length)
    base = (bx - ux * head, by - uy * head)
    d.line([(ax, ay), base], fill=colour, width=width)
    d.polygon([(bx, by), (base[0] - uy * head * 0.45, base[1] + ux * head * 0.45),
               (base[0] + uy * head * 0.45, base[1] - ux * head * 0.45)], fill=colour)


def dot(d: ImageDraw.ImageDraw, point, radius: float, fill=None, outline=None, width: int = 1) -> None:
    px, py = to_pixel(point)
    d.ellipse([px - radius, py - radius, px + radius, py + radius], fill=fill, outline=outline, width=width)


def panel(toy, title: str) -> tuple:
    """A panel with the concepts' regions (two stds, as in bench/toy_demo.py) and its title."""
    img = Image.new("RGB", (PANEL, TOP + PANEL), "white")
    d = ImageDraw.Draw(img)
    for name, ((mx, my), s) in toy.COMPONENTS.items():
        colour = tuple(int(c * 0.25 + 255 * 0.75) for c in COLOURS[name])
        (x0, y0), (x1, y1) = to_pixel((mx - 2 * s, my + 2 * s)), to_pixel((mx + 2 * s, my - 2 * s))
        d.ellipse([x0, y0, x1, y1], fill=colour)
    d.rectangle([0, TOP, PANEL - 1, TOP + PANEL - 1], outline=(180, 180, 180))
    d.text((8, 6), title, fill=(0, 0, 0), font=font(15))
    return img, d


def name_regions(d: ImageDraw.ImageDraw, toy) -> None:
    """The concepts' names, drawn last so that nothing hides them: the upper ones above their region."""
    small = font(13)
    for name, ((mx, my), s) in toy.COMPONENTS.items():
        px, py = to_pixel((mx, my + 2 * s + 0.02) if my > 0 else (mx, my - 2 * s - 0.02))
        box = d.textbbox((px, py), name, font=small, anchor="mb" if my > 0 else "mt")
        d.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill=(255, 255, 255))
        d.text((px, py), name, fill=(90, 90, 90), font=small, anchor="mb" if my > 0 else "mt")


def euler(x: torch.Tensor, sigmas: list, predict) -> list:
    """The points an Euler sampler visits from ``sigmas[0]`` down the schedule (Karras et al. 2022, Alg. 1)."""
    path = [x]
    for sigma, nxt in zip(sigmas[:-1], sigmas[1:]):
        x = x + (x - predict(x, sigma)) / sigma * (nxt - sigma)
        path.append(x)
    return path


def draw(out: Path) -> dict:
    rules, toy = load_pack()
    pos_m, neg_m = toy.Mixture.for_prompt("man"), toy.Mixture.for_prompt("mustache")
    sigmas = toy.karras_sigmas(STEPS)[STEP_INDEX:]
    sigma = sigmas[0]

    def guided(x, s):
        return rules.cfg(pos_m.denoise(x, s), neg_m.denoise(x, s), CFG)

    # left: one step of one sample
    x = torch.tensor([SAMPLE], dtype=torch.float64)
    d_pos, d_neg = pos_m.denoise(x, sigma), neg_m.denoise(x, sigma)
    d_guided = rules.cfg(d_pos, d_neg, CFG)
    x_next = x + (x - d_guided) / sigma * (sigmas[1] - sigma)
    left, d = panel(toy, f"one step at sigma {sigma:.2f}: the predictions for x")
    label = font(14)
    arrow(d, x[0], d_pos[0], ARROWS["pos"][0])
    arrow(d, x[0], d_neg[0], ARROWS["neg"][0])
    arrow(d, x[0], d_guided[0], ARROWS["guided"][0])
    arrow(d, d_pos[0], d_guided[0], ARROWS["removed"][0], width=5, head=16.0)
    arrow(d, x[0], x_next[0], (110, 110, 110), width=2, head=9.0)
    dot(d, x[0], 5, fill=(255, 255, 255), outline=(0, 0, 0), width=2)
    for point, text, colour, anchor in ((x[0], "  x", (0, 0, 0), "lm"), (d_pos[0], "D_pos  ", ARROWS["pos"][0], "rm"),
                                        (d_neg[0], "D_neg  ", ARROWS["neg"][0], "rm"),
                                        (d_guided[0], "D  ", ARROWS["guided"][0], "rm")):
        px, py = to_pixel(point)
        d.text((px, py), text, fill=colour, font=label, anchor=anchor)
    mid = to_pixel((d_pos[0] + d_guided[0]) / 2)
    d.text((mid[0] - 8, mid[1]), "D - D_pos", fill=(200, 120, 0), font=label, anchor="rm")
    px, py = to_pixel(x_next[0])
    d.text((px + 6, py - 4), "next x", fill=(110, 110, 110), font=font(12), anchor="lb")
    name_regions(d, toy)

    # right: a handful of samples near x, from this sigma to the end, positive alone and with the negative
    gen = torch.Generator().manual_seed(SEED)
    starts = x + SPREAD * torch.randn(HANDFUL, 2, generator=gen, dtype=torch.float64)
    alone = euler(starts, sigmas, lambda x, s: pos_m.denoise(x, s))
    with_neg = euler(starts, sigmas, guided)
    right, d = panel(toy, f"{HANDFUL} samples near x, from sigma {sigma:.2f} to 0 ({len(sigmas) - 1} Euler steps)")
    for path, colour in ((alone, ARROWS["pos"][0]), (with_neg, ARROWS["guided"][0])):
        ends = toy.component_of(path[-1])
        for i in range(HANDFUL):
            d.line([to_pixel(p[i]) for p in path], fill=colour, width=2)
            dot(d, path[-1][i], 4, fill=COLOURS[ends[i]], outline=colour)
    for i in range(HANDFUL):
        dot(d, starts[i], 4, fill=(255, 255, 255), outline=(0, 0, 0), width=2)
    name_regions(d, toy)
    end_alone, end_neg = toy.component_of(alone[-1]), toy.component_of(with_neg[-1])
    share = {k: sum(c == "man with mustache" for c in v) for k, v in (("alone", end_alone), ("neg", end_neg))}
    for text, colour, row in ((f"positive alone: {share['alone']} of {HANDFUL} end with a mustache", ARROWS["pos"][0], 0),
                              (f"with the negative: {share['neg']} of {HANDFUL}", ARROWS["guided"][0], 1)):
        d.text((PANEL - 8, TOP + 8 + 18 * row), text, fill=colour, font=font(13), anchor="ra")

    sheet = Image.new("RGB", (2 * PANEL + 10, TOP + PANEL + BOTTOM), "white")
    sheet.paste(left, (0, 0))
    sheet.paste(right, (PANEL + 10, 0))
    d = ImageDraw.Draw(sheet)
    text = font(13)
    y = TOP + PANEL + 10
    for colour, legend in ARROWS.values():
        d.line([(12, y + 8), (52, y + 8)], fill=colour, width=4)
        d.polygon([(60, y + 8), (50, y + 3), (50, y + 13)], fill=colour)
        d.text((70, y + 1), legend, fill=(30, 30, 30), font=text)
        y += 20
    d.line([(12, y + 8), (52, y + 8)], fill=(110, 110, 110), width=2)
    d.text((70, y + 1), "the Euler step to the next sigma; right: the paths, blue with the positive alone, black with "
           "the negative, ends coloured by concept", fill=(30, 30, 30), font=text)
    d.text((12, y + 26), f"cfg {CFG:g}, sigma {sigma:.2f} (step {STEP_INDEX + 1} of {STEPS} of the toy's Karras schedule, "
           f"sigma {toy.SIGMA_MAX:g} to {toy.SIGMA_MIN:g}); exact predictions of samplers/toy.py, combined by rules.cfg",
           fill=(0, 0, 0), font=font(13))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return {"sigma": sigma, "x": x[0].tolist(), "D_pos": d_pos[0].tolist(), "D_neg": d_neg[0].tolist(),
            "D": d_guided[0].tolist(), "mustache_alone": share["alone"], "mustache_with_negative": share["neg"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "toy_step.png")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    figures = draw(opts.out)
    fmt = lambda p: f"({p[0]:+.2f}, {p[1]:+.2f})"  # noqa: E731
    log.info("sigma %.3f, cfg %g: x %s, D_pos %s, D_neg %s, D %s", figures["sigma"], CFG, fmt(figures["x"]),
             fmt(figures["D_pos"]), fmt(figures["D_neg"]), fmt(figures["D"]))
    log.info("%d samples near x from that sigma: %d end with a mustache with the positive alone, %d with the negative; "
             "picture: %s", HANDFUL, figures["mustache_alone"], figures["mustache_with_negative"], opts.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
