"""The GPU checks: speed in fp16 and bf16 with CUDA events, and no host-device sync in a step.

Needs a CUDA device; without one it says so and exits 0. On the device it runs the tiny random
SD1.5-shaped model (built there, no weights downloaded) through the real host and prints:

1. per dtype (fp16, bf16): KSampler vs NegativeGuidanceSampler (defaults, hooks installed, 4 extra
   negatives, trace on), median milliseconds per run from CUDA events over interleaved rounds,
   and the ratio to KSampler; peak allocated memory of each;
2. per rule: one model evaluation of the guided model run under
   ``torch.cuda.set_sync_debug_mode("error")`` (a PREDICT_NOISE wrapper sets it around the call),
   PASS or the error; rules whose plan depends on sigma (windows, minimum sigma, interval) read
   it once by design and are reported as such.

    python bench/gpu_check.py [--rounds 5] [--size 64]   (the host: scripts/comfy_host.py)
"""
from __future__ import annotations

import argparse
import importlib
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

log = logging.getLogger("negative_guidance.gpu_check")


def timed(cases: dict, rounds: int) -> dict:
    """Median ms per case from CUDA events, cases interleaved round by round."""
    out = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(rounds):
        for name, fn in cases.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out[name].append(start.elapsed_time(end))
    return {name: statistics.median(v) for name, v in out.items()}


def peak(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 20


def speed(g, host_nodes, rules, tiny, dtype, rounds, size):
    model = tiny.make_tiny_sd15(dtype=dtype, device="cuda")
    pos, neg, lat = tiny.cond(1), tiny.cond(2), tiny.latent(size=size)
    hooked = rules.MinSigma(min_sigma=0.0)
    chain = None
    for i in range(4):
        chain = g.WeightedNegative.execute(tiny.cond(100 + i), 1.0, 0.0, 1.0, negatives=chain)[0]
    run = lambda **kw: g.NegativeGuidanceSampler.execute(  # noqa: E731
        model, 0, 10, 7.0, "euler", "normal", pos, neg, lat, 1.0, 0.0, 1.0, **kw)
    cases = {
        "KSampler (host)": lambda: host_nodes.common_ksampler(model, 0, 10, 7.0, "euler", "normal", pos, neg, lat),
        "NegativeGuidanceSampler, defaults": lambda: run(),
        "hooks installed": lambda: run(rule=hooked),
        "4 extra negatives": lambda: run(negatives=chain),
        "trace on": lambda: run(record_trace=True),
    }
    medians = timed(cases, rounds)
    log.info("")
    log.info("%s, latent %dx%d, 10 euler steps", dtype, size, size)
    for name, ms in medians.items():
        log.info("  %-36s %9.2f ms  x%.3f  peak %7.1f MiB", name, ms, ms / medians["KSampler (host)"], peak(cases[name]))


def sync_check(g, host_nodes, rules, tiny, dtype):
    import comfy.patcher_extension

    model = tiny.make_tiny_sd15(dtype=dtype, device="cuda")

    def strict(executor, *args, **kwargs):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return executor(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    checked = model.clone()
    checked.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "sync_check", strict)
    cases = [("CFG + 2 extras", {"negatives": "2"}), ("trace on", {"record_trace": True}),
             ("Perp-Neg", {"rule": rules.PerpNeg(), "unconditional": True}), ("APG", {"rule": rules.APG()}),
             ("CFG rescale", {"rule": rules.Rescale()}), ("CFG-Zero*", {"rule": rules.CFGZeroStar()}),
             ("Dynamic", {"rule": rules.DynamicNegative(), "unconditional": True}),
             ("window (reads sigma by design)", {"negative_start_percent": 0.5}),
             ("minimum sigma (reads sigma by design)", {"rule": rules.MinSigma(min_sigma=1.0)}),
             ("interval (reads sigma by design)", {"rule": rules.GuidanceInterval()})]
    log.info("")
    log.info("%s: one guided model evaluation under set_sync_debug_mode('error')", dtype)
    for name, kw in cases:
        kw = dict(kw)
        if kw.pop("unconditional", False):
            kw["unconditional"] = tiny.cond(3)
        if "negatives" in kw:
            chain = None
            for i in range(int(kw["negatives"])):
                chain = g.WeightedNegative.execute(tiny.cond(100 + i), 1.0, 0.0, 1.0, negatives=chain)[0]
            kw["negatives"] = chain
        kw.setdefault("negative_start_percent", 0.0)
        try:
            g.NegativeGuidanceSampler.execute(checked, 0, 2, 7.0, "euler", "normal", tiny.cond(1), tiny.cond(2),
                                              tiny.latent(size=32), 1.0, negative_end_percent=1.0, **kw)
            log.info("  %-40s PASS (no sync)", name)
        except RuntimeError as e:
            log.info("  %-40s SYNC: %s", name, str(e).splitlines()[0][:120])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.info("bench/gpu_check.py needs a CUDA device; none is present here, so nothing was measured.")
        return 0
    from demo_host import load_host_and_pack

    host_nodes, g = load_host_and_pack(cpu=False)
    rules = importlib.import_module("negative_guidance_pack.samplers.rules")
    tiny = importlib.import_module("tiny")
    log.info("device %s, torch %s", torch.cuda.get_device_name(), torch.__version__)
    for dtype in (torch.float16, torch.bfloat16):
        speed(g, host_nodes, rules, tiny, dtype, opts.rounds, opts.size)
        sync_check(g, host_nodes, rules, tiny, dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
