"""The cached negative's quality against full CFG through the host, on every sampler, schedule, cfg and step count.

The toy model with known truth (``NegativeGuidanceToyModel``) in-process, through the pack's sampler node:
"portrait of a man" with the negative "mustache", n pictures (24x24) per cell, seeds from ``--seed`` on (the
tests use others). Per cell, full CFG and each candidate at the same seeds: the share of pictures with a mustache,
the share of the same pictures as full CFG (a picture's class is its nearest clean toy picture in pixel MSE), the
share off the data (that MSE above 0.05; the toy's own noise gives about 0.01) and the branches per model
evaluation (batch rows at the diffusion model's forward, per sample). Samplers without a fixed step count
(``dpm_adaptive``) run at their own tolerance; ``dpm_fast`` takes the steps as its evaluations. Logs one
markdown row per cell, then the worst cell of each criterion, the mean cost and the time.

Work that cannot change a figure is not done twice: a candidate that predicts both branches at every evaluation
of full CFG's run (decided from that run's sigmas, as the node decides) is full CFG's run, and on a machine
without CUDA a ``_gpu`` sampler is its twin (the same host function, its Brownian tree on the latent's device,
the CPU); both are logged, ``--no-shortcut`` runs them anyway. ``--workers`` processes share the samplers, those
with a Brownian tree (the slowest) first.

    python bench/cache_grid.py [--n 512] [--candidates default,fixed,late_half] [--samplers all]
                               [--schedulers karras,...] [--workers 2] [--shard 1/1] [--out out/cache_grid.md]
    python bench/cache_grid.py --merge out/a.md out/b.md   (the summary of runs split by --shard or --samplers;
                                                             a cell in a later file replaces the same earlier one)
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
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


def run_cell(g, toy, model, vae, encode, lat, sampler, scheduler, cfg, steps, seed, rule) -> dict:
    """One run of the sampler node: each picture's class and whether it is off the data, the mustache share, the
    branches per evaluation, and per forward of the diffusion model its sigma and batch rows."""
    import comfy.patcher_extension

    kw, sigmas, recorder = ({} if rule is None else {"rule": rule}), [], model.clone()

    def record(executor, x, t, *args, **kwargs):
        sigmas.append(float(t.max()))
        return executor(x, t, *args, **kwargs)

    recorder.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "cache_grid_sigma", record)
    with count_forwards(recorder) as rows:
        out = g.NegativeGuidanceSampler.execute(recorder, seed, steps, cfg, sampler, scheduler,
                                                encode("portrait of a man"), encode("mustache"), lat, 1.0, 0.0,
                                                1.0, **kw)[0]["samples"]
    cls, off = classify(toy, out)
    share = float(toy.has_mustache(vae.decode(out)).float().mean())
    return dict(cls=cls, off=off, share=share, branches=sum(rows) / (len(rows) * lat["samples"].shape[0]),
                sigmas=sigmas, rows=list(rows), out=out)


def full_throughout(rule, full: dict, sampler: str, fallbacks: dict, n: int) -> bool:
    """Whether ``rule`` predicts both branches at every evaluation of full CFG's run ``full``: it decides from the
    evaluation's index and sigma alone, so its own run is then full CFG's, evaluation by evaluation."""
    if sampler in fallbacks:
        return True
    if any(r != 2 * n for r in full["rows"]):
        return False
    state = rule.new_state()
    return not any(rule.reuses(i, sigma, state) for i, sigma in enumerate(full["sigmas"]))


def brownian(sampler: str) -> bool:
    """Whether the host's sampler draws its noise from a Brownian tree (the grid's slowest samplers)."""
    import comfy.k_diffusion.sampling as kd

    fn = getattr(kd, f"sample_{sampler}", None)
    return fn is not None and "BrownianTreeNoiseSampler" in inspect.getsource(fn)


def gpu_twins(samplers: list, cuda: bool) -> dict:
    """``{name: twin}`` for each ``_gpu`` sampler whose twin runs too, where there is no CUDA: the host's ``_gpu``
    function only puts the twin's Brownian tree on the latent's device, which is then the CPU."""
    if cuda:
        return {}
    return {s: s[:-len("_gpu")] for s in samplers if s.endswith("_gpu") and s[:-len("_gpu")] in samplers}


class Cells:
    """What every cell of a run needs: the host, the toy model, its prompts and the batch of n latents."""

    def __init__(self, n: int):
        host_nodes, self.g = load_host_and_pack()
        self.toy = importlib.import_module("negative_guidance_pack.samplers.toy")
        self.rules = importlib.import_module("negative_guidance_pack.samplers.rules")
        self.model, clip, self.vae = importlib.import_module("negative_guidance_pack.nodes.toy_model").toy_model()
        conds = {text: host_nodes.CLIPTextEncode().encode(clip, text)[0] for text in ("portrait of a man", "mustache")}
        self.encode = conds.__getitem__
        self.lat, self.n = host_nodes.EmptyLatentImage().generate(SIZE, SIZE, n)[0], n

    def run(self, sampler, scheduler, cfg, steps, seed, rule) -> dict:
        return run_cell(self.g, self.toy, self.model, self.vae, self.encode, self.lat, sampler, scheduler, cfg,
                        steps, seed, rule)

    def sampler_rows(self, sampler: str, schedulers: list, seed: int, names: list, shortcut: bool) -> tuple:
        """Every cell of one sampler: its rows, the seconds its runs took by kind, and the candidate runs taken
        from full CFG's run."""
        rules_by_name, rows, seconds, taken = candidates(self.rules, names), [], {"full": 0.0}, 0
        for scheduler in schedulers:
            for cfg in CFGS:
                for steps in STEPS:
                    start = time.perf_counter()
                    full = self.run(sampler, scheduler, cfg, steps, seed, None)
                    seconds["full"] += time.perf_counter() - start
                    for name, rule in rules_by_name.items():
                        start = time.perf_counter()
                        if shortcut and full_throughout(rule, full, sampler, self.rules.FULL_CFG_SAMPLERS, self.n):
                            cand, taken = full, taken + 1
                        else:
                            cand = self.run(sampler, scheduler, cfg, steps, seed, rule)
                        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
                        rows.append(row(sampler, scheduler, cfg, steps, name, full, cand))
        return rows, seconds, taken


def row(sampler, scheduler, cfg, steps, name, full: dict, cand: dict) -> dict:
    """A cell's figures: mustache shares (full, candidate), same pictures, off the data (full, candidate), in %."""
    return dict(sampler=sampler, scheduler=scheduler, cfg=cfg, steps=steps, candidate=name,
                share=(100 * full["share"], 100 * cand["share"]),
                same=100 * float((full["cls"] == cand["cls"]).double().mean()),
                off=(100 * float(full["off"].double().mean()), 100 * float(cand["off"].double().mean())),
                branches=cand["branches"])


def log_row(r: dict) -> None:
    log.info("| %s | %s | %g | %d | %s | %.1f / %.1f | %.1f | %.1f / %.1f | %.2f |", r["sampler"], r["scheduler"],
             r["cfg"], r["steps"], r["candidate"], *r["share"], r["same"], *r["off"], r["branches"])


_CELLS: Cells | None = None


def _start_worker(n: int, threads: int) -> None:
    global _CELLS
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    _CELLS = Cells(n)


def _worker_rows(*args) -> tuple:
    return _CELLS.sampler_rows(*args)


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
    parser.add_argument("--workers", type=int, default=2, help="processes sharing the samplers (one core each)")
    parser.add_argument("--no-shortcut", dest="shortcut", action="store_false",
                        help="run candidates that stay full CFG and _gpu twins on a machine without CUDA anyway")
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
    load_host_and_pack()
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    log.addHandler(logging.FileHandler(opts.out, mode="w"))
    import comfy.samplers

    rules = importlib.import_module("negative_guidance_pack.samplers.rules")
    samplers = list(comfy.samplers.KSampler.SAMPLERS) if opts.samplers == "all" else opts.samplers.split(",")
    part, parts = (int(v) for v in opts.shard.split("/"))
    samplers = samplers[part - 1::parts]
    twins = gpu_twins(samplers, torch.cuda.is_available()) if opts.shortcut else {}
    order = sorted((s for s in samplers if s not in twins), key=lambda s: not brownian(s))
    names, schedulers = opts.candidates.split(","), opts.schedulers.split(",")
    log.info("| sampler | scheduler | cfg | steps | candidate | mustache full / cand. | same picture | off data full / "
             "cand. | branches/eval |")
    log.info("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    results, seconds, notes, start = [], {}, [], time.perf_counter()
    for sampler, (rows, secs, taken) in measured(order, opts, schedulers, names):
        for twin in [sampler] + [gpu for gpu, t in twins.items() if t == sampler]:
            for r in rows:
                results.append(dict(r, sampler=twin))
                log_row(results[-1])
        for kind, s in secs.items():
            seconds[kind] = seconds.get(kind, 0.0) + s
        if taken:
            notes.append(f"{sampler}: {taken} of {len(rows)} candidate cells full CFG throughout, taken from its run")
    notes += [f"{gpu}: {t}'s cells (no CUDA here: the host's {gpu} is {t} with its Brownian tree on the CPU)"
              for gpu, t in twins.items()]
    summarize(results, rules.FULL_CFG_SAMPLERS)
    for note in notes:
        log.info("%s", note)
    log.info("%d cells in %.0f s with %d workers; runs: %s", len(results), time.perf_counter() - start, opts.workers,
             ", ".join(f"{kind} {s:.0f} s" for kind, s in seconds.items()))
    return 0


def measured(order: list, opts, schedulers: list, names: list):
    """(sampler, its rows, seconds, candidate runs taken) as each sampler finishes, on ``opts.workers`` processes."""
    args = (schedulers, opts.seed, names, opts.shortcut)
    if opts.workers <= 1:
        cells = Cells(opts.n)
        for sampler in order:
            yield sampler, cells.sampler_rows(sampler, *args)
        return
    context = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // opts.workers)
    with ProcessPoolExecutor(opts.workers, mp_context=context, initializer=_start_worker,
                             initargs=(opts.n, threads)) as pool:
        futures = {pool.submit(_worker_rows, sampler, *args): sampler for sampler in order}
        for future in as_completed(futures):
            yield futures[future], future.result()


if __name__ == "__main__":
    raise SystemExit(main())
