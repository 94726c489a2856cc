"""The GPU checks: speed in fp16 and bf16 with CUDA events, and no host-device sync in a step.

Needs a CUDA device; without one it says so and exits 0. On the device it runs the tiny random
SD1.5-shaped model (built there, no weights downloaded) through the real host and prints:

1. per dtype (fp16, bf16): KSampler vs NegativeGuidanceSampler (defaults, hooks installed, 4 extra
   negatives, trace on, the cached negative's fixed cadence and the same plan decided from sigma read
   once per evaluation: their difference is what the adaptive rule's read costs), median milliseconds
   per run from CUDA events over interleaved rounds, and the ratio to KSampler; peak allocated memory of each;
2. per rule: one model evaluation of the guided model run under
   ``torch.cuda.set_sync_debug_mode("error")`` (a PREDICT_NOISE wrapper sets it around the call),
   PASS or the error; rules whose plan depends on sigma (windows, minimum sigma, interval) read
   it once by design and are reported as such;
3. Negative Attention Guidance: per family, cfg 1 vs CFG at cfg 2 vs NAG vs the reference port (CUDA
   events, peak memory); one NAG evaluation of every family under the sync debug mode; the image
   part of a Flux-sized joint attention computed once against the plain path (error and time).

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
        "cached negative, fixed cadence": lambda: run(rule=rules.CachedNegative(max_log_sigma_drop=float("inf"))),
        "cached negative, same plan from sigma": lambda: run(rule=rules.CachedNegative(max_log_sigma_drop=1e9)),
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
             ("interval (reads sigma by design)", {"rule": rules.GuidanceInterval()}),
             ("cached negative, fixed cadence", {"rule": rules.CachedNegative(max_log_sigma_drop=float("inf"))}),
             ("cached negative, adaptive (reads sigma by design)", {"rule": rules.CachedNegative()})]
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


NAG_FAMILIES = ("sd15", "flux", "wan", "hunyuan_video")


def nag_speed(host_nodes, nag, dtype, rounds):
    """NAG at cfg 1 against plain cfg 1, CFG at cfg 2 and the reference port, per family, CUDA events."""
    from families import ALL_FAMILIES
    from nag_cost import PARAMS, PORT_FAMILIES, load_port

    port = load_port()
    log.info("")
    log.info("%s: NAG, 8 euler steps at cfg 1 on tiny models (ratios to cfg 1)", dtype)
    for name in NAG_FAMILIES:
        f = ALL_FAMILIES[name]
        pos, neg, nag_neg = f.cond(1, tokens=64), f.cond(2, tokens=64), f.cond(7, tokens=64)
        lat = f.latent(size=64)
        plain, guided = f.model(dtype=dtype, device="cuda"), None
        guided = nag.apply_nag(plain, nag_neg, *PARAMS, "L1", 0.0, 1.0)
        run = lambda m, cfg: (lambda: host_nodes.common_ksampler(m, 0, 8, cfg, "euler", "normal", pos, neg, lat))  # noqa: E731
        cases = {"cfg 1": run(plain, 1.0), "CFG, cfg 2": run(plain, 2.0), "pack NAG": run(guided, 1.0)}
        if name in PORT_FAMILIES:
            port_model = f.model(dtype=dtype, device="cuda")
            cases["port NAG"] = lambda: port.common_ksampler_with_nag(port_model, 0, 8, 1.0, *PARAMS, 0.0, "euler",
                                                                      "normal", pos, neg, nag_neg, lat)
        medians = timed(cases, rounds)
        log.info("  %-14s %s", name, "  ".join(f"{k} {v:8.2f} ms x{v / medians['cfg 1']:.3f} peak {peak(cases[k]):.0f} MiB"
                                               for k, v in medians.items()))


def nag_sync_check(host_nodes, nag, dtype):
    """One NAG evaluation per family under set_sync_debug_mode('error'); a window reads sigma once by design."""
    import comfy.patcher_extension
    from families import ALL_FAMILIES

    def strict(executor, *args, **kwargs):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return executor(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    log.info("")
    log.info("%s: one NAG evaluation under set_sync_debug_mode('error')", dtype)
    for name, f in ALL_FAMILIES.items():
        pos, neg, nag_neg = f.cond(1), f.cond(2), f.cond(7)
        guided = nag.apply_nag(f.model(dtype=dtype, device="cuda"), nag_neg, 5.0, 2.5, 0.25, "L1", 0.0, 1.0)
        host_nodes.common_ksampler(guided, 0, 1, 1.0, "euler", "normal", pos, neg, f.latent())  # the caches, first
        checked = guided.clone()
        checked.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "sync_check", strict)
        try:
            host_nodes.common_ksampler(checked, 0, 1, 1.0, "euler", "normal", pos, neg, f.latent())
            log.info("  %-14s PASS (no sync)", name)
        except RuntimeError as e:
            log.info("  %-14s SYNC: %s", name, str(e).splitlines()[0][:120])


def nag_shared_image_check(dtype):
    """The image part computed once (log-sum-exp merge, CUDA's fused kernels) against NAG's plain path."""
    nag = importlib.import_module("negative_guidance_pack.samplers.nag")
    layout = nag.Layout(((77, 77),), image=4096, text_first=True)
    rows = nag.Rows(2, torch.tensor([1], device="cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 24, layout.joint, 128, device="cuda", generator=gen).to(dtype) for _ in range(3))
    call = nag.Call(q, k, v, None, q_dim=2, v_dim=2, out_dim=1, heads=24)
    sdpa = lambda q_, k_, v_, m: torch.nn.functional.scaled_dot_product_attention(q_, k_, v_).transpose(1, 2).flatten(2)  # noqa: E731
    params = nag.Params()
    plain = nag.joint_attention(sdpa, call, layout, rows, params).float()
    shared = nag.joint_attention_shared_image(sdpa, call, layout, rows, params).float()
    error = float((shared - plain).abs().max() / plain.abs().mean())
    cases = {"plain path": lambda: nag.joint_attention(sdpa, call, layout, rows, params),
             "image once": lambda: nag.joint_attention_shared_image(sdpa, call, layout, rows, params)}
    medians = timed(cases, 5)
    log.info("")
    log.info("%s: one Flux-sized joint attention (4096 image + 2x77 text tokens, 24 heads): image-once error %.2e; "
             "%s", dtype, error, "  ".join(f"{k} {v:.2f} ms" for k, v in medians.items()))


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
    nag = importlib.import_module("negative_guidance_pack.nodes.nag")
    for dtype in (torch.float16, torch.bfloat16):
        speed(g, host_nodes, rules, tiny, dtype, opts.rounds, opts.size)
        sync_check(g, host_nodes, rules, tiny, dtype)
        nag_speed(host_nodes, nag, dtype, opts.rounds)
        nag_sync_check(host_nodes, nag, dtype)
        nag_shared_image_check(dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
