"""Speed and memory of the pack against the host, measured side by side in one run (CPU here).

Runs ComfyUI in-process (the host ``scripts/comfy_host.py`` finds or makes) on the tiny random
SD1.5-shaped model and prints medians over interleaved rounds, and each case's ratio to its host
baseline:

1. a plain negative through each entry point vs KSampler / CFGGuider (target ratio <= 1.02);
2. k extra negatives (1, 2, 4, 8): the pack (one batched call) vs the host's ConditioningCombine
   (one negative list, averaged) vs one model call per negative; forwards per step and time;
3. a window covering a fraction f of the steps: forwards saved, and wall time saved as a share of
   the theoretical saving (target >= 0.9);
4. the guidance math alone (engine + each rule) at SD1.5, SDXL and video latent sizes, batch 1
   and 4, as a share of one forward of the tiny model at the same size (video: absolute time);
5. trace recording on vs off (target <= 1.05);
6. peak memory (max RSS of a fresh process) with and without the pack;
7. the cached negative against no negative and full CFG in one run, with a window and extras:
   time, forwards and batch rows per evaluation, and the latent's difference from full CFG;
8. the cached negative at its defaults on the tiny families (SD1.5, SDXL, SD3, Flux at cfg 4, Wan): the
   latent's relative L2 to full CFG's at the same seed, batch rows per evaluation, time against full CFG.

    .venv/0.8.0/bin/python bench/host_bench.py [--rounds 5] [--only 1,2]
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_host import load_host_and_pack  # noqa: E402
from tiny import cond, count_forwards, latent, make_tiny_sd15  # noqa: E402

log = logging.getLogger("negative_guidance.host_bench")
STEPS, SIZE, CFG = 8, 16, 7.0


def interleaved(cases: dict, rounds: int) -> dict:
    """Median seconds per case, the cases run in turn each round (drift hits all alike)."""
    times = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def report(title: str, medians: dict, baseline: str, extra: dict = None) -> None:
    log.info("")
    log.info("%s", title)
    for name, seconds in medians.items():
        note = "" if extra is None or name not in extra else f"  {extra[name]}"
        log.info("  %-46s %8.1f ms  x%.3f%s", name, 1000 * seconds, seconds / medians[baseline], note)


def entry_points(ctx, rounds):
    g, host_nodes, custom, model = ctx["g"], ctx["host_nodes"], ctx["custom"], ctx["model"]
    pos, neg, lat = cond(1), cond(2), latent(size=SIZE)
    sigmas = custom.BasicScheduler().get_sigmas(model, "normal", STEPS, 1.0)[0]
    rules = importlib.import_module("negative_guidance_pack.samplers.rules")
    hooked = rules.MinSigma(min_sigma=0.0)  # installs every hook, never skips: the hooks' own cost

    def advanced(guider):
        return custom.SamplerCustomAdvanced().sample(custom.Noise_RandomNoise(0), guider,
                                                     custom.comfy.samplers.sampler_object("euler"), sigmas, lat)

    cases = {
        "KSampler (host)": lambda: host_nodes.common_ksampler(model, 0, STEPS, CFG, "euler", "normal", pos, neg, lat),
        "NegativeGuidanceSampler, defaults": lambda: g.NegativeGuidanceSampler.execute(
            model, 0, STEPS, CFG, "euler", "normal", pos, neg, lat, 1.0, 0.0, 1.0),
        "NegativeGuidanceSampler, hooks installed": lambda: g.NegativeGuidanceSampler.execute(
            model, 0, STEPS, CFG, "euler", "normal", pos, neg, lat, 1.0, 0.0, 1.0, rule=hooked),
        "NegativeGuidance patch + KSampler, hooks": lambda: host_nodes.common_ksampler(
            g.NegativeGuidance.execute(model, 0.0, 1.0, rule=hooked)[0], 0, STEPS, CFG, "euler", "normal", pos, neg, lat),
    }
    report("1a. plain negative, KSampler path (8 euler steps, 128x128)", interleaved(cases, rounds), "KSampler (host)")
    cases = {
        "CFGGuider + SamplerCustomAdvanced (host)": lambda: advanced(custom.CFGGuider().get_guider(model, pos, neg, CFG)[0]),
        "NegativeGuider, defaults": lambda: advanced(g.NegativeGuider.execute(model, pos, neg, CFG, 0.0, 1.0)[0]),
        "NegativeGuider, hooks installed": lambda: advanced(
            g.NegativeGuider.execute(model, pos, neg, CFG, 0.0, 1.0, rule=hooked)[0]),
    }
    report("1b. plain negative, guider path", interleaved(cases, rounds), "CFGGuider + SamplerCustomAdvanced (host)")


def extra_negatives(ctx, rounds):
    g, host_nodes, model = ctx["g"], ctx["host_nodes"], ctx["model"]
    pos, neg, lat = cond(1), cond(2), latent(size=SIZE)
    combine = host_nodes.ConditioningCombine()
    for k in (1, 2, 4, 8):
        extras = [cond(100 + i) for i in range(k)]
        chain = None
        for c in extras:
            chain = g.WeightedNegative.execute(c, 1.0, 0.0, 1.0, negatives=chain)[0]
        combined = neg
        for c in extras:
            combined = combine.combine(combined, c)[0]

        def per_call():
            """The naive way: the host's two-branch call, then one more model call per extra negative."""
            import comfy.patcher_extension
            import comfy.sampler_helpers
            import comfy.samplers

            patched, holder = model.clone(), {}
            keys = [f"bench_extra_{i}" for i in range(len(extras))]

            def calc(args):
                out = comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                                     args["model_options"])
                for key in keys:
                    comfy.samplers.calc_cond_batch(args["model"], [holder["guider"].conds[key]], args["input"],
                                                   args["sigma"], args["model_options"])
                return out

            def wrapper(executor, *a, **kw):
                holder["guider"] = executor.class_obj
                for key, c in zip(keys, extras):
                    executor.class_obj.conds[key] = comfy.sampler_helpers.convert_cond(c)
                return executor(*a, **kw)

            patched.set_model_sampler_calc_cond_batch_function(calc)
            patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "bench", wrapper)
            return host_nodes.common_ksampler(patched, 0, STEPS, CFG, "euler", "normal", pos, neg, lat)

        cases = {
            "host, one negative": lambda: host_nodes.common_ksampler(model, 0, STEPS, CFG, "euler", "normal", pos, neg, lat),
            f"host ConditioningCombine of {k + 1} (averaged)": lambda: host_nodes.common_ksampler(
                model, 0, STEPS, CFG, "euler", "normal", pos, combined, lat),
            f"one model call per negative ({k} extra)": per_call,
            f"pack, {k} weighted extras, one batch": lambda: g.NegativeGuidanceSampler.execute(
                model, 0, STEPS, CFG, "euler", "normal", pos, neg, lat, 1.0, 0.0, 1.0, negatives=chain),
        }
        forwards = {}
        for name, fn in cases.items():
            with count_forwards(model) as rows:
                fn()
            forwards[name] = f"{len(rows) / STEPS:.1f} forwards/step, {sum(rows) / STEPS:.1f} rows/step"
        report(f"2. k = {k} extra negatives", interleaved(cases, rounds), "host, one negative", forwards)


def windows(ctx, rounds):
    g, host_nodes, model = ctx["g"], ctx["host_nodes"], ctx["model"]
    pos, neg, lat = cond(1), cond(2), latent(size=SIZE)
    steps = 20
    base = lambda: host_nodes.common_ksampler(model, 0, steps, CFG, "euler", "normal", pos, neg, lat)  # noqa: E731
    single = lambda: host_nodes.common_ksampler(model, 0, steps, 1.0, "euler", "normal", pos, neg, lat)  # noqa: E731
    cases = {"full CFG (host)": base, "cfg 1, one branch (host)": single}
    rows_of = {}
    for start in (0.25, 0.5, 0.75):
        cases[f"window from {start:.0%}"] = (lambda s: lambda: g.NegativeGuidanceSampler.execute(
            model, 0, steps, CFG, "euler", "normal", pos, neg, lat, 1.0, s, 1.0))(start)
    for name, fn in cases.items():
        with count_forwards(model) as rows:
            fn()
        rows_of[name] = sum(rows)
    medians = interleaved(cases, rounds)
    full, one = medians["full CFG (host)"], medians["cfg 1, one branch (host)"]
    notes = {}
    for name in cases:
        if name.startswith("window"):
            saved_branches = rows_of["full CFG (host)"] - rows_of[name]
            skipped = saved_branches / steps  # fraction of steps that were single-branch
            theory = skipped * (full - one)
            notes[name] = (f"{saved_branches}/{2 * steps} branches saved; time saved {1000 * (full - medians[name]):.0f} ms "
                           f"= {(full - medians[name]) / theory:.2f} of theory" if theory > 0 else "")
    report("3. a window of the main negative (20 euler steps)", medians, "full CFG (host)", notes)


def math_only(ctx, rounds):
    rules = importlib.import_module("negative_guidance_pack.samplers.rules")
    engine = importlib.import_module("negative_guidance_pack.samplers.engine")
    model = ctx["model"]
    all_rules = [rules.CFG(), rules.PerpNeg(), rules.APG(), rules.Rescale(), rules.CFGZeroStar(), rules.DynamicNegative()]
    log.info("")
    log.info("4. guidance math alone per evaluation (engine.combine_step, one extra negative), ms; "
             "[share of one tiny-model forward at that size; batch 4: of 4 batch-1 forwards]")
    header = "  %-22s" + " %16s" * len(all_rules)
    log.info(header, "latent", *[r.name for r in all_rules])
    for label, shape in (("SD1.5 4x64x64", (4, 64, 64)), ("SDXL 4x128x128", (4, 128, 128)),
                         ("video 16x21x90x160", (16, 21, 90, 160))):
        for batch in (1, 4):
            full_shape = (batch, *shape)
            gen = torch.Generator().manual_seed(0)
            x, pos, neg, unc, ext = (torch.randn(full_shape, generator=gen) for _ in range(5))
            sigma = torch.full((batch,), 2.0)
            forward = None
            if len(shape) == 3:
                if batch == 1:
                    with torch.no_grad():  # one timed forward at batch 1: at these sizes it dwarfs the math
                        start = time.perf_counter()
                        model.model.diffusion_model(x, torch.full((1,), 500.0), context=torch.randn(1, 77, 768))
                        forward_b1 = time.perf_counter() - start
                forward = forward_b1 * batch  # batch 4: four times the batch-1 forward (a lower bound on CPU)
            cells = []
            for rule in all_rules:
                spec = engine.GuidanceSpec(extras=(engine.ExtraNegative(1.0),), has_uncond=True, rule=rule)
                plan = spec.plan(2.0, scale=CFG)
                state = rule.new_state()

                def step():
                    engine.combine_step(spec, plan, state, scale=CFG, pos=pos, primary=neg, uncond=unc, extras=[ext],
                                        x=x, sigma=sigma, sample_sigmas=torch.tensor([14.6, 2.0, 0.0]))

                ms = interleaved({"m": step}, rounds)["m"]
                cells.append(f"{1000 * ms:7.2f}" + (f" [{ms / forward:6.3%}]" if forward else "          "))
            log.info(header, f"{label} b{batch}", *cells)


def trace_cost(ctx, rounds):
    g, model = ctx["g"], ctx["model"]
    pos, neg, lat = cond(1), cond(2), latent(size=SIZE)
    run = lambda record: g.NegativeGuidanceSampler.execute(  # noqa: E731
        model, 0, STEPS, CFG, "euler", "normal", pos, neg, lat, 1.0, 0.0, 1.0, record_trace=record)
    hooked = importlib.import_module("negative_guidance_pack.samplers.rules").MinSigma(min_sigma=0.0)
    cases = {
        "trace off, hooks installed": lambda: g.NegativeGuidanceSampler.execute(
            model, 0, STEPS, CFG, "euler", "normal", pos, neg, lat, 1.0, 0.0, 1.0, rule=hooked),
        "trace on": lambda: run(True),
    }
    report("5. trace recording (target <= 1.05)", interleaved(cases, rounds), "trace off, hooks installed")


MEMORY_CHILD = """
import sys, resource
sys.argv = ['x']
sys.path.insert(0, {bench!r})
from demo_host import load_host_and_pack
host_nodes, g = load_host_and_pack()
from tiny import cond, latent, make_tiny_sd15
model = make_tiny_sd15()
pos, neg, lat = cond(1), cond(2), latent(size={size})
case = {case!r}
if case == 'host':
    host_nodes.common_ksampler(model, 0, 4, 7.0, 'euler', 'normal', pos, neg, lat)
else:
    chain = None
    for i in range(int(case.split(':')[1])):
        chain = g.WeightedNegative.execute(cond(100 + i), 1.0, 0.0, 1.0, negatives=chain)[0]
    g.NegativeGuidanceSampler.execute(model, 0, 4, 7.0, 'euler', 'normal', pos, neg, lat, 1.0, 0.0, 1.0,
                                      negatives=chain, record_trace=True)
print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def memory(ctx, rounds):
    bench = str(Path(__file__).resolve().parent)
    log.info("")
    log.info("6. peak memory: max RSS of a fresh process sampling 4 steps at 512x512 (MiB)")
    results = {}
    for case in ("host", "pack:0", "pack:4"):
        code = MEMORY_CHILD.format(bench=bench, size=64, case=case)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("MAXRSS")]
        results[case] = int(line[-1].split()[1]) / 1024 if line else float("nan")
    labels = {"host": "KSampler (host)", "pack:0": "pack, trace on", "pack:4": "pack, 4 extras + trace"}
    for case, mib in results.items():
        log.info("  %-46s %8.0f MiB  x%.3f", labels[case], mib, mib / results["host"])


def cached_negative(ctx, rounds):
    """The cached negative against no negative and full CFG, with windows and extras, 20 euler steps."""
    g, host_nodes, model = ctx["g"], ctx["host_nodes"], ctx["model"]
    rules = importlib.import_module("negative_guidance_pack.samplers.rules")
    pos, neg, lat = cond(1), cond(2), latent(size=SIZE)
    steps = 20
    chain = None
    for i in range(2):
        chain = g.WeightedNegative.execute(cond(100 + i), 1.0, 0.0, 1.0, negatives=chain)[0]

    def pack(**kw):
        return lambda: g.NegativeGuidanceSampler.execute(model, 0, steps, CFG, "euler", "normal", pos, neg, lat, 1.0,
                                                         kw.pop("start", 0.0), kw.pop("end", 1.0), **kw)

    cases = {
        "no negative (cfg 1, host)": lambda: host_nodes.common_ksampler(model, 0, steps, 1.0, "euler", "normal", pos,
                                                                        neg, lat),
        "full CFG (host)": lambda: host_nodes.common_ksampler(model, 0, steps, CFG, "euler", "normal", pos, neg, lat),
        "cached negative, defaults": pack(rule=rules.CachedNegative()),
        "window until 40%": pack(end=0.4),
        "2 extra negatives": pack(negatives=chain),
        "2 extra negatives, cached": pack(negatives=chain, rule=rules.CachedNegative()),
    }
    full = cases["full CFG (host)"]()[0]["samples"]
    notes = {}
    for name, fn in cases.items():
        with count_forwards(model) as rows:
            out = fn()[0]["samples"]
        diff = float((out - full).abs().max() / full.abs().mean())
        notes[name] = f"{len(rows) / steps:.2f} forwards and {sum(rows) / steps:.2f} rows per evaluation; " \
                      f"latent vs full CFG {diff:.2e}"
    report(f"7. the cached negative (tiny SD1.5, {8 * SIZE}x{8 * SIZE}, {steps} euler steps)", interleaved(cases, rounds),
           "no negative (cfg 1, host)", notes)


def cached_families(ctx, rounds):
    """The cached negative at its defaults against full CFG on each tiny family, 30 euler steps, cfg 4."""
    from families import FAMILIES

    g, host_nodes = ctx["g"], ctx["host_nodes"]
    rules = importlib.import_module("negative_guidance_pack.samplers.rules")
    log.info("")
    log.info("8. the cached negative at its defaults on the tiny families (30 euler steps, cfg 4, seed 0): latent's "
             "relative L2 to full CFG's, batch rows per evaluation, time against full CFG")
    for name in ("sd15", "sdxl", "sd3", "flux", "wan"):
        f = FAMILIES[name]
        model, pos, neg, lat = f.model(seed=1), f.cond(1), f.cond(2), f.latent()
        scheduler = "simple" if f.flow else "normal"
        cases = {
            "full CFG (host)": lambda: host_nodes.common_ksampler(model, 0, 30, 4.0, "euler", scheduler, pos, neg,
                                                                  lat)[0]["samples"],
            "cached": lambda: g.NegativeGuidanceSampler.execute(model, 0, 30, 4.0, "euler", scheduler, pos, neg, lat,
                                                                1.0, 0.0, 1.0, rule=rules.CachedNegative())[0]["samples"],
        }
        full = cases["full CFG (host)"]()
        with count_forwards(model) as rows:
            cached = cases["cached"]()
        l2 = float((cached - full).norm() / full.norm())
        medians = interleaved(cases, rounds)
        log.info("  %-5s relative L2 %.2e, %.2f rows per evaluation (full CFG 2.00), time x%.3f", name, l2,
                 sum(rows) / len(rows), medians["cached"] / medians["full CFG (host)"])


SECTIONS = {1: entry_points, 2: extra_negatives, 3: windows, 4: math_only, 5: trace_cost, 6: memory, 7: cached_negative,
            8: cached_families}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="1,2,3,4,5,6,7,8")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    host_nodes, g = load_host_and_pack()
    logging.getLogger().setLevel(logging.INFO)
    for name in ("negative_guidance_pack", "root"):
        logging.getLogger(name).setLevel(logging.WARNING) if name != "root" else None
    ctx = {"g": g, "host_nodes": host_nodes, "custom": importlib.import_module("comfy_extras.nodes_custom_sampler"),
           "model": make_tiny_sd15()}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    log.info("torch %s, %d threads, device cpu; medians of %d interleaved rounds", torch.__version__,
             torch.get_num_threads(), opts.rounds)
    for key in [int(k) for k in opts.only.split(",")]:
        SECTIONS[key](ctx, opts.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
