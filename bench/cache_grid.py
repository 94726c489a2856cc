"""The cached negative's quality against full CFG through the host, on every sampler, schedule, cfg and step count.

The toy model with known truth (``NegativeGuidanceToyModel``) in-process, through the pack's sampler node:
"portrait of a man" with the negative "mustache", n pictures (24x24) per cell, seeds from ``--seed`` on (the
tests use 0). Per cell, full CFG and each candidate at the same seeds: the share of pictures with a mustache, the
share of the same pictures as full CFG (a picture's class is its nearest clean toy picture in pixel MSE), the
share off the data (that MSE above 0.05; the toy's own noise gives about 0.01) and the branches per model
evaluation (batch rows at the diffusion model's forward, per sample). Samplers without a fixed step count
(``dpm_adaptive``) run at their own tolerance; ``dpm_fast`` takes the steps as its evaluations. Logs one
markdown row per cell, then the worst cell of each criterion and the mean cost.

    python bench/cache_grid.py [--n 512] [--candidates default,fixed,late_half] [--samplers all]
                               [--schedulers karras,...] [--shard 1/1] [--out out/cache_grid.md]
    python bench/cache_grid.py --merge out/a.md out/b.md   (the summary of runs split by --shard or --samplers;
                                                             a cell in a later file replaces the same earlier one)
"""
from __future__ import annotations

import argparse
import importlib
import logging
import time
from pathlib import Path

import torch
from demo_host import ROOT, load_host_and_pack
from tiny import count_forwards

log = logging.getLogger("negative_guidance.cache_grid")
SCHEDULERS = ("karras", "normal", "exponential", "sgm_uniform", "simple")
CFGS = (2.0, 4.0, 8.0)
STEPS = (10, 30)
SIZE, OFF_DATA = 192, 0.05


def candidates(rules, names: list) -> dict:
    """The candidate rules by name: the node's defaults ("default": every 3rd evaluation at most, the difference
    following sqrt(sigma), predicted again on a sigma that did not fall or fell by more than 0.3 in ln sigma),
    the same with other limits ("drop05", "drop02"), the fixed cadence of the earlier defaults ("fixed": every 4th,
    grown by 1.06 in noise space, bounded), the same unbounded ("extrapolated", FasterCache's growth alone),
    and the fixed cadence past 30% of the model's schedule with the sqrt(sigma) difference ("late_half")."""
    inf = float("inf")
    known = {
        "default": lambda: rules.CachedNegative(),
        "drop05": lambda: rules.CachedNegative(max_log_sigma_drop=0.5),
        "drop02": lambda: rules.CachedNegative(max_log_sigma_drop=0.2),
        "fixed": lambda: rules.CachedNegative(every=4, growth=1.06, sigma_power=1.0, max_log_sigma_drop=inf),
        "extrapolated": lambda: rules.CachedNegative(every=4, growth=1.06, sigma_power=1.0, max_log_sigma_drop=inf,
                                                     bounded=False),
        "late_half": lambda: rules.CachedNegative(from_percent=0.3, max_log_sigma_drop=inf),
    }
    return {name: known[name]() for name in names}


def classify(toy, samples: torch.Tensor) -> tuple:
    """(class index, off the data) of each picture: its nearest clean toy picture in pixel MSE."""
    templates = torch.stack([toy.image_template(c, samples.shape[-1]) for c in toy.CONCEPTS]).flatten(1)
    mse = torch.cdist(samples.flatten(1).double(), templates.double()).pow(2) / templates.shape[1]
    best, index = mse.min(1)
    return index, best > OFF_DATA


def run_cell(g, toy, model, vae, encode, lat, sampler, scheduler, cfg, steps, seed, rule):
    kw = {} if rule is None else {"rule": rule}
    with count_forwards(model) as rows:
        out = g.NegativeGuidanceSampler.execute(model, seed, steps, cfg, sampler, scheduler, encode("portrait of a man"),
                                                encode("mustache"), lat, 1.0, 0.0, 1.0, **kw)[0]["samples"]
    cls, off = classify(toy, out)
    share = float(toy.has_mustache(vae.decode(out)).float().mean())
    return cls, off, share, sum(rows) / (len(rows) * lat["samples"].shape[0]), len(rows)


def passes(r: dict) -> bool:
    """The grid's quality criteria in one cell."""
    return abs(r["share"][1] - r["share"][0]) <= 2 and r["same"] >= 95 and r["off"][1] <= r["off"][0] + 1


def summarize(results: list, fallbacks: dict) -> None:
    """Per candidate and sampler: cells within the criteria, the worst of each criterion and the cost; then per
    candidate the grid's worst cells, its mean cost and the samplers that run full CFG (``fallbacks``, with why)."""
    log.info("")
    log.info("| sampler | candidate | cells | within all criteria | worst share diff. | fewest same | most off (cand. - "
             "full) | mean branches | max |")
    log.info("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    names = list(dict.fromkeys(r["candidate"] for r in results))
    for sampler in dict.fromkeys(r["sampler"] for r in results):
        for name in names:
            rows = [r for r in results if r["candidate"] == name and r["sampler"] == sampler]
            if rows:
                log.info("| %s | %s | %d | %d | %.1f | %.1f | %.1f | %.2f | %.2f |", sampler, name, len(rows),
                         sum(map(passes, rows)), max(abs(r["share"][1] - r["share"][0]) for r in rows),
                         min(r["same"] for r in rows), max(r["off"][1] - r["off"][0] for r in rows),
                         sum(r["branches"] for r in rows) / len(rows), max(r["branches"] for r in rows))
    for name in names:
        rows = [r for r in results if r["candidate"] == name]
        share = max(rows, key=lambda r: abs(r["share"][1] - r["share"][0]))
        same = min(rows, key=lambda r: r["same"])
        off = max(rows, key=lambda r: r["off"][1] - r["off"][0])
        cost = sum(r["branches"] for r in rows) / len(rows)
        log.info("")
        log.info("%s: %d of %d cells (%d samplers) within the criteria; mean %.3f branches per evaluation, %d cells "
                 "above 1.5", name, sum(map(passes, rows)), len(rows), len({r["sampler"] for r in rows}), cost,
                 sum(r["branches"] > 1.5 for r in rows))
        for label, r in (("largest share difference", share), ("fewest same pictures", same), ("most off data", off)):
            log.info("  %s: %s %s cfg %g, %d steps: mustache %.1f / %.1f, same %.1f%%, off %.1f / %.1f", label,
                     r["sampler"], r["scheduler"], r["cfg"], r["steps"], *r["share"], r["same"], *r["off"])
    samplers = dict.fromkeys(r["sampler"] for r in results)
    log.info("full CFG (fallback) on %s", "; ".join(f"{s}: {fallbacks[s]}" for s in samplers if s in fallbacks)
             or "no sampler")


def read_rows(path: Path) -> list:
    """The cells of a grid log this script wrote (its markdown rows)."""
    out = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 9 or cells[0] in ("sampler", "---") or "/" not in cells[5]:
            continue
        sampler, scheduler, cfg, steps, name, share, same, off, branches = cells
        out.append(dict(sampler=sampler, scheduler=scheduler, cfg=float(cfg), steps=int(steps), candidate=name,
                        share=tuple(map(float, share.split("/"))), same=float(same),
                        off=tuple(map(float, off.split("/"))), branches=float(branches)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--seed", type=int, default=7000)
    parser.add_argument("--candidates", default="default")
    parser.add_argument("--samplers", default="all", help="comma-separated host sampler names, or all")
    parser.add_argument("--schedulers", default=",".join(SCHEDULERS), help="comma-separated, of " + ", ".join(SCHEDULERS))
    parser.add_argument("--shard", default="1/1", help="i/k: run the i-th of k interleaved parts of the samplers")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "cache_grid.md")
    parser.add_argument("--merge", type=Path, nargs="+", help="only summarize earlier runs' --out files, in order")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if opts.merge:
        load_host_and_pack()
        rules = importlib.import_module("negative_guidance_pack.samplers.rules")
        cells = {}  # a cell measured again in a later file replaces the earlier one
        for r in (r for path in opts.merge for r in read_rows(path)):
            cells[r["sampler"], r["scheduler"], r["cfg"], r["steps"], r["candidate"]] = r
        summarize(list(cells.values()), rules.FULL_CFG_SAMPLERS)
        return 0
    host_nodes, g = load_host_and_pack()
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    log.addHandler(logging.FileHandler(opts.out, mode="w"))
    import comfy.samplers

    toy = importlib.import_module("negative_guidance_pack.samplers.toy")
    rules = importlib.import_module("negative_guidance_pack.samplers.rules")
    model, clip, vae = importlib.import_module("negative_guidance_pack.nodes.toy_model").toy_model()
    encode = lambda text: host_nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    lat = host_nodes.EmptyLatentImage().generate(SIZE, SIZE, opts.n)[0]
    samplers = comfy.samplers.KSampler.SAMPLERS if opts.samplers == "all" else opts.samplers.split(",")
    part, parts = (int(v) for v in opts.shard.split("/"))
    samplers = samplers[part - 1::parts]
    rules_by_name = candidates(rules, opts.candidates.split(","))
    log.info("| sampler | scheduler | cfg | steps | candidate | mustache full / cand. | same picture | off data full / "
             "cand. | branches/eval |")
    log.info("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    results, start = [], time.perf_counter()
    for sampler in samplers:
        for scheduler in opts.schedulers.split(","):
            for cfg in CFGS:
                for steps in STEPS:
                    full = run_cell(g, toy, model, vae, encode, lat, sampler, scheduler, cfg, steps, opts.seed, None)
                    for name, rule in rules_by_name.items():
                        cand = run_cell(g, toy, model, vae, encode, lat, sampler, scheduler, cfg, steps, opts.seed, rule)
                        row = dict(sampler=sampler, scheduler=scheduler, cfg=cfg, steps=steps, candidate=name,
                                   share=(100 * full[2], 100 * cand[2]),
                                   same=100 * float((full[0] == cand[0]).double().mean()),
                                   off=(100 * float(full[1].double().mean()), 100 * float(cand[1].double().mean())),
                                   branches=cand[3])
                        results.append(row)
                        log.info("| %s | %s | %g | %d | %s | %.1f / %.1f | %.1f | %.1f / %.1f | %.2f |", sampler,
                                 scheduler, cfg, steps, name, *row["share"], row["same"], *row["off"], row["branches"])
    summarize(results, rules.FULL_CFG_SAMPLERS)
    log.info("%d cells in %.0f s", len(results), time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
