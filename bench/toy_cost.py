"""Negatives at a fraction of their cost, on the analytic toy model: what each cheaper setting removes.

For Euler, Heun and Euler ancestral at cfg 2, 3 and 5 (30 Karras steps, 1,500 samples, one seed),
each setting against full CFG drawn from the same seed: the share of samples with a mustache, the
sliced Wasserstein distance to the true target p(x | man, not mustache), the mean distance of each
sample from full CFG's sample of the same seed (in concept stds), the share of samples off the data
(farther than 4 stds from every concept; overshoot the share alone would count as "no mustache")
and the branches predicted per model evaluation (full CFG 2). Settings: step windows, minimum
sigma, the guidance interval and the cached negative, at its defaults, at its earlier fixed cadence
(every 4, growth 1.06 in noise space) and with the growth that suits each sampler on that cadence.
Then the cached negative's frequency split, measured on the toy pictures.
Writes the chart, branches per evaluation against removal, to ``out/toy_cost.png``.

    python bench/toy_cost.py [--n 1500] [--steps 30] [--out out/toy_cost.png]
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from toy_demo import ROOT, load_pack

log = logging.getLogger("negative_guidance.toy_cost")
SAMPLERS = ("euler", "heun", "euler_ancestral")
SCALES = (2.0, 3.0, 5.0)
TUNED_GROWTH = {"euler": 1.10, "heun": 1.03, "euler_ancestral": 1.05}  # per sampler, from this benchmark's grid
TUNED_START = {"euler": 0, "heun": 1, "euler_ancestral": 1}
TARGET = {"share": 2.0, "distance": 0.45, "branches": 1.30}
FIXED = {"every": 4, "growth": 1.06, "sigma_power": 1.0, "max_log_sigma_drop": float("inf")}  # the earlier defaults


def settings(rules, toy, sampler):
    """(label, kind, a function cfg -> ToyRun)."""
    run = lambda **kw: (lambda cfg: toy.ToyRun("man", "mustache", cfg, **kw))  # noqa: E731
    return [
        ("full CFG", "full", run()),
        ("negative until 40%", "window", run(primary_window=toy.window(0.0, 0.4))),
        ("negative from 20%", "window", run(primary_window=toy.window(0.2, 1.0))),
        ("minimum sigma 1", "min sigma", run(rule=rules.MinSigma(min_sigma=1.0))),
        ("minimum sigma 2, all", "min sigma", run(rule=rules.MinSigma(min_sigma=2.0, all_steps=True))),
        ("interval (0.28, 5.42]", "interval", run(rule=rules.GuidanceInterval())),
        ("cached, defaults", "cached", run(rule=rules.CachedNegative())),
        ("cached, every 4, growth 1.06", "cached fixed", run(rule=rules.CachedNegative(**FIXED))),
        (f"cached, growth {TUNED_GROWTH[sampler]:g}, start {TUNED_START[sampler]}", "cached tuned",
         run(rule=rules.CachedNegative(**{**FIXED, "growth": TUNED_GROWTH[sampler],
                                          "full_start": TUNED_START[sampler]}))),
    ]


def measure(toy, make, cfg, sampler, n, steps, target, reference=None, images=False):
    run = make(cfg)
    x = toy.sample(run, n=n, steps=steps, sampler=sampler, seed=0, images=images)
    row = {"share": 100 * toy.share_in(x, "man with mustache"), "branches": run.branches / run.evaluations}
    if not images:
        row.update(sw=toy.sliced_wasserstein(x, target), off=100 * toy.share_off_data(x))
    row["distance"] = 0.0 if reference is None else toy.distance_from(x, reference)
    return x, row


def table(rules, toy, n, steps, target) -> list:
    rows = []
    log.info("| sampler | cfg | setting | mustache % | SW to target | distance from full CFG | off data % | "
             "branches/eval | cached negative's targets |")
    log.info("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for sampler in SAMPLERS:
        for cfg in SCALES:
            full_x, full = None, None
            for label, kind, make in settings(rules, toy, sampler):
                x, row = measure(toy, make, cfg, sampler, n, steps, target, full_x)
                if kind == "full":
                    full_x, full = x, row
                met = ""
                if kind.startswith("cached"):
                    ok = (abs(row["share"] - full["share"]) <= TARGET["share"] and row["distance"] <= TARGET["distance"]
                          and row["branches"] <= TARGET["branches"])
                    met = "met" if ok else "not met"
                rows.append(dict(row, sampler=sampler, cfg=cfg, label=label, kind=kind, met=met))
                log.info("| %s | %g | %s | %.1f | %.2f | %.2f | %.1f | %.2f | %s |", sampler, cfg, label, row["share"],
                         row["sw"], row["distance"], row["off"], row["branches"], met)
    return rows


def frequency_split(rules, toy, n, steps) -> None:
    """The cached negative's fixed cadence with and without FasterCache's split, on the toy pictures (Euler, cfg 3)."""
    log.info("")
    log.info("frequency split on the toy pictures (%d pictures, euler, cfg 3): mustache %%, distance from full CFG's "
             "pictures (RMS per pixel), branches/eval", n)
    run = lambda rule=None: (lambda cfg: toy.ToyRun("man", "mustache", cfg, **({"rule": rule} if rule else {})))  # noqa: E731
    full, full_row = measure(toy, run(), 3.0, "euler", n, steps, None, images=True)
    log.info("  %-38s mustache %5.1f%%  %.2f branches/eval", "full CFG", full_row["share"], full_row["branches"])
    cases = [("no split", rules.CachedNegative(**FIXED)),
             ("no split, growth 1.1", rules.CachedNegative(**{**FIXED, "growth": 1.1}))]
    for cutoff in (0.125, 0.25, 0.5):
        for high in (0.9, 1.0, 1.1):
            cases.append((f"split at {cutoff:g}, high band growth {high:g}",
                          rules.CachedNegative(**FIXED, bands=True, cutoff=cutoff, high_growth=high)))
    for label, rule in cases:
        x, row = measure(toy, run(rule), 3.0, "euler", n, steps, None, images=True)
        rms = float((x - full).pow(2).mean(dim=1).sqrt().mean())
        log.info("  %-38s mustache %5.1f%%  RMS %.4f  %.2f branches/eval", label, row["share"], rms, row["branches"])


COLOURS = {"full": (0, 0, 0), "window": (46, 134, 222), "min sigma": (155, 89, 182), "interval": (39, 174, 96),
           "cached": (231, 76, 60), "cached fixed": (120, 40, 30), "cached tuned": (243, 156, 18)}


def chart(rows: list, out: Path) -> None:
    """Branches per evaluation (x) against the mustache share (y), one panel per cfg, all samplers."""
    w, h, pad = 330, 260, 40
    img = Image.new("RGB", (w * len(SCALES), h + 90), "white")
    d = ImageDraw.Draw(img)
    top = max(r["share"] for r in rows) * 1.1 + 1
    for p, cfg in enumerate(SCALES):
        x0 = p * w
        d.rectangle([x0 + pad, 10, x0 + w - 10, h - pad + 10], outline=(180, 180, 180))
        for b in (1.0, 1.25, 1.5, 1.75, 2.0):
            px = x0 + pad + (b - 1.0) * (w - pad - 20)
            d.line([px, h - pad + 10, px, h - pad + 14], fill=(120, 120, 120))
            d.text((px - 10, h - pad + 16), f"{b:.2f}", fill=(80, 80, 80))
        d.text((x0 + pad + 60, h - pad + 30), "branches per evaluation", fill=(80, 80, 80))
        d.text((x0 + 4, 10), f"{top:.0f}%", fill=(80, 80, 80))
        d.text((x0 + 10, h - pad), "0%", fill=(80, 80, 80))
        d.text((x0 + pad + 4, 14), f"cfg {cfg:g}: mustache share", fill=(0, 0, 0))
        for r in (r for r in rows if r["cfg"] == cfg):
            px = x0 + pad + (r["branches"] - 1.0) * (w - pad - 20)
            py = h - pad + 10 - r["share"] / top * (h - pad)
            shape = {"euler": d.ellipse, "heun": d.rectangle, "euler_ancestral": d.ellipse}[r["sampler"]]
            size = 4 if r["sampler"] != "euler_ancestral" else 2
            shape([px - size, py - size, px + size, py + size], fill=COLOURS[r["kind"]])
    for i, (kind, colour) in enumerate(COLOURS.items()):
        d.rectangle([10 + 135 * i, h + 50, 20 + 135 * i, h + 60], fill=colour)
        d.text((24 + 135 * i, h + 48), kind, fill=(0, 0, 0))
    d.text((10, h + 70), "circle: euler   square: heun   small circle: euler ancestral", fill=(80, 80, 80))
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pictures", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "toy_cost.png")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rules, toy = load_pack()
    target = toy.Mixture.for_prompt("man, clean-shaven").sample(opts.n, torch.Generator().manual_seed(12345))
    rows = table(rules, toy, opts.n, opts.steps, target)
    log.info("")
    for kind, label in (("cached", "defaults"), ("cached fixed", "every 4, growth 1.06"),
                        ("cached tuned", "every 4, growth tuned per sampler")):
        met = [r["met"] == "met" for r in rows if r["kind"] == kind]
        log.info("cached negative, %s: within the criteria in %d of %d cases", label, sum(met), len(met))
    chart(rows, opts.out)
    frequency_split(rules, toy, opts.pictures, opts.steps)
    log.info("chart: %s", opts.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
