"""Concept-removal benchmark on the analytic toy model: removal, fidelity and cost of each rule.

For each rule and cfg scale: the share of samples that land in the negative concept's region
("man with mustache"; lower is better), the sliced Wasserstein-1 distance of the samples to the
true target p(x | man, not mustache) (lower is better), the mean distance of each sample from plain
CFG's sample of the same seed (in concept stds), the share of samples off the data (farther than 4
stds from every concept: overshoot, which the share alone counts as "no mustache") and the branches
predicted per model evaluation (no negative = 1, full CFG = 2). Controls: an unrelated negative ("cat": removal should
not be needed and the samples should barely move) and a negative overlapping the positive
("man with mustache, man": Perp-Neg's case). Last, the cheapest skipping setting (delayed start,
window, NGMS) whose removal is within 2 points of full-time CFG's at cfg 5.

    python bench/toy_removal.py [--n 1500] [--steps 30]
"""
from __future__ import annotations

import argparse
import logging

import torch
from toy_demo import load_pack

log = logging.getLogger("negative_guidance.toy_removal")


def measure(toy, run, target, n, steps, sampler="euler", samples=False):
    x = toy.sample(run, n=n, steps=steps, sampler=sampler, seed=0)
    figures = toy.share_in(x, "man with mustache"), toy.sliced_wasserstein(x, target), run.branches / run.evaluations
    return (figures, x) if samples else figures


def rule_table(rules, toy):
    return [
        ("CFG", lambda cfg, neg: toy.ToyRun("man", neg, cfg), "euler"),
        ("Perp-Neg", lambda cfg, neg: toy.ToyRun("man", neg, cfg, rules.PerpNeg(), unconditional=""), "euler"),
        ("APG", lambda cfg, neg: toy.ToyRun("man", neg, cfg, rules.APG()), "euler"),
        ("CFG rescale", lambda cfg, neg: toy.ToyRun("man", neg, cfg, rules.Rescale()), "euler"),
        ("CFG-Zero*", lambda cfg, neg: toy.ToyRun("man", neg, cfg, rules.CFGZeroStar()), "euler"),
        ("Dynamic (prior .5)", lambda cfg, neg: toy.ToyRun("man", neg, cfg, rules.DynamicNegative(scale=30.0, prior=0.5),
                                                          unconditional=""), "euler_ancestral"),
        ("NGMS sigma<1", lambda cfg, neg: toy.ToyRun("man", neg, cfg, rules.MinSigma(min_sigma=1.0)), "euler"),
        ("Interval (0.28,5.42]", lambda cfg, neg: toy.ToyRun("man", neg, cfg, rules.GuidanceInterval()), "euler"),
    ]


def cheap_settings(rules, toy):
    out = []
    for start in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
        out.append((f"negative from {start:.0%}", toy.ToyRun("man", "mustache", 5.0, primary_window=toy.window(start, 1.0))))
    for end in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        out.append((f"negative until {end:.0%}", toy.ToyRun("man", "mustache", 5.0, primary_window=toy.window(0.0, end))))
    for sigma in (0.5, 1.0, 2.0, 4.0, 8.0):
        for all_steps in (False, True):
            label = f"NGMS sigma<{sigma:g}{' all' if all_steps else ''}"
            out.append((label, toy.ToyRun("man", "mustache", 5.0, rules.MinSigma(min_sigma=sigma, all_steps=all_steps))))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=30)
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rules, toy = load_pack()
    target = toy.Mixture.for_prompt("man, clean-shaven").sample(opts.n, torch.Generator().manual_seed(12345))
    n, steps = opts.n, opts.steps

    base = measure(toy, toy.ToyRun("man", "", 5.0), target, n, steps)
    log.info("no negative (empty prompt, cfg 5): mustache %.1f%%, SW %.2f, %.2f branches/eval", 100 * base[0], base[1], base[2])
    log.info("")
    log.info("| rule | negative | cfg | mustache % | SW to target | distance from CFG | off data % | branches/eval |")
    log.info("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, make, sampler in rule_table(rules, toy):
        for neg, scales in (("mustache", (1.5, 3.0, 5.0, 7.0)), ("cat", (5.0,)), ("man with mustache, man", (5.0,))):
            for cfg in scales:
                (removal, swd, cost), x = measure(toy, make(cfg, neg), target, n, steps, sampler, samples=True)
                _, reference = measure(toy, toy.ToyRun("man", neg, cfg), target, n, steps, sampler, samples=True)
                log.info("| %s | %s | %g | %.1f | %.2f | %.2f | %.1f | %.2f |", name, neg, cfg, 100 * removal, swd,
                         toy.distance_from(x, reference), 100 * toy.share_off_data(x), cost)

    full = measure(toy, toy.ToyRun("man", "mustache", 5.0), target, n, steps)
    log.info("")
    log.info("full-time CFG 5: mustache %.1f%%, %.2f branches/eval", 100 * full[0], full[2])
    best = None
    for label, run in cheap_settings(rules, toy):
        removal, swd, cost = measure(toy, run, target, n, steps)
        ok = removal <= full[0] + 0.02
        log.info("  %-28s mustache %5.1f%%  SW %.2f  %.2f branches/eval%s", label, 100 * removal, swd, cost,
                 "  (within 2 points)" if ok else "")
        if ok and (best is None or cost < best[2]):
            best = (label, removal, cost)
    if best is None:
        log.info("cheapest within 2 points of full-time CFG: none of the settings tried")
    else:
        log.info("cheapest within 2 points of full-time CFG: %s, mustache %.1f%%, cost %.2fx sampling with no "
                 "negative (full CFG: 2.00x)", best[0], 100 * best[1], best[2])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
