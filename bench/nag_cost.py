"""What Negative Attention Guidance costs, per family, against plain cfg 1, CFG at cfg 2 and the reference port.

Two measurements, both in one run:

1. **Tiny random models** of every family (``bench/families.py``) through the host's KSampler, one
   step: FLOPs per step (``torch.utils.flop_counter``: matrix products and attention, the figure a
   noisy CPU cannot blur) and wall time (medians of interleaved rounds), as ratios to plain cfg 1.
   The port runs where it supports the family.
2. **Real configurations at their usual sizes**, built on the ``meta`` device (no weights, no
   memory; the host's own model classes): SDXL at 1024^2, Wan 2.1 14B at 480p (81 frames), Flux dev
   at 1024^2, HunyuanVideo at 720p (65 frames). One model call each: FLOPs of cfg 1, of CFG (two
   rows) and of NAG.

The host runs with PyTorch's attention (``--use-pytorch-cross-attention``, its default on a GPU).

    .venv/0.8.0/bin/python bench/nag_cost.py [--rounds 5] [--only tiny,real]
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_host import load_host_and_pack  # noqa: E402
from families import ALL_FAMILIES  # noqa: E402

log = logging.getLogger("negative_guidance.nag_cost")
PARAMS = (5.0, 2.5, 0.25)
TOKENS = 8
PORT_FAMILIES = {"sd15", "sdxl", "sd3", "sd35", "flux", "chroma", "hidream", "wan", "wan_i2v", "wan_vace", "wan22_5b",
                 "hunyuan_video"}


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _flash_for_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """PyTorch's counter knows the CUDA attention kernels but not the CPU one; it costs the same."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def median_seconds(cases: dict, rounds: int) -> dict:
    times = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def load_port():
    import comfy_host

    path = comfy_host.ensure(comfy_host.NAG_ORACLE).path
    spec = importlib.util.spec_from_file_location("nag_reference_port", path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["nag_reference_port"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("nag_reference_port.node")


def tiny(host_nodes, nag, rounds: int) -> None:
    port = load_port()
    log.info("1. tiny random models, one euler step through KSampler (%d text tokens each prompt); ratios to cfg 1", TOKENS)
    log.info("  %-14s %-22s %-22s %-22s %-22s", "family", "CFG (cfg 2) flops/time", "pack NAG flops/time",
             "port NAG flops/time", "")
    for name, f in ALL_FAMILIES.items():
        pos, neg, nag_neg = f.cond(1, tokens=TOKENS), f.cond(2, tokens=TOKENS), f.cond(7, tokens=TOKENS)
        lat = f.latent(size=16 if name != "lumina2" else 18)
        models = {"plain": f.model(), "cfg": f.model(), "pack": nag.apply_nag(f.model(), nag_neg, *PARAMS, "L1", 0, 1)}

        def run(model, cfg):
            return lambda: host_nodes.common_ksampler(model, 0, 1, cfg, "euler", "normal", pos, neg, lat)

        cases = {"plain": run(models["plain"], 1.0), "cfg": run(models["cfg"], 2.0), "pack": run(models["pack"], 1.0)}
        if name in PORT_FAMILIES:
            port_model = f.model()  # the port restores the forwards it replaced after each successful run
            cases["port"] = lambda: port.common_ksampler_with_nag(port_model, 0, 1, 1.0, *PARAMS, 0.0, "euler",
                                                                  "normal", pos, neg, nag_neg, lat)
        counted = {k: flops(fn) for k, fn in cases.items()}
        timed = median_seconds(cases, rounds)
        cell = {k: f"x{counted[k] / counted['plain']:.3f} / x{timed[k] / timed['plain']:.2f}" for k in cases}
        log.info("  %-14s %-22s %-22s %-22s", name, cell["cfg"], cell["pack"], cell.get("port", "(not supported)"))


# ---------------------------------------------------------------------------- real configurations on meta

SDXL_REAL = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
WAN14B_REAL = {
    "image_model": "wan2.1", "model_type": "t2v", "dim": 5120, "out_dim": 16, "num_heads": 40, "ffn_dim": 13824,
    "num_layers": 40, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
    "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16,
}
FLUX_DEV_REAL = {
    "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
    "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
    "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}
HUNYUAN_VIDEO_REAL = {
    "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
    "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 20, "depth_single_blocks": 40,
    "axes_dim": [16, 56, 56], "theta": 256, "patch_size": [1, 2, 2], "qkv_bias": True, "guidance_embed": True,
    "byt5": False, "meanflow": False,
}
# (name, config class, config, latent shape, text tokens, text width, extra conds)
REAL = [
    ("SDXL 1024x1024", "SDXL", SDXL_REAL, (1, 4, 128, 128), 77, 2048, {"y": (1, 2816)}),
    ("Wan 2.1 14B 832x480x81", "WAN21_T2V", WAN14B_REAL, (1, 16, 21, 60, 104), 512, 4096, {}),
    ("Flux dev 1024x1024", "Flux", FLUX_DEV_REAL, (1, 16, 128, 128), 256, 4096, {"y": (1, 768), "guidance": (1,)}),
    ("HunyuanVideo 1280x720x65", "HunyuanVideo", HUNYUAN_VIDEO_REAL, (1, 16, 17, 90, 160), 256, 4096,
     {"y": (1, 768), "guidance": (1,)}),
]


def real(nag) -> None:
    import comfy.model_patcher
    import comfy.supported_models

    log.info("")
    log.info("2. real configurations at their usual sizes (meta device), one model call; ratios to cfg 1")
    for title, cls, config, shape, tokens, width, extra in REAL:
        model = getattr(comfy.supported_models, cls)(dict(config))
        model.set_inference_dtype(torch.bfloat16, None)
        base = model.get_model({}, device="meta")
        base.model_sampling.to("meta")
        patcher = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("meta"), offload_device=torch.device("meta"))
        meta = lambda *s: torch.zeros(*s, device="meta")
        negative = [[torch.zeros(1, tokens, width), {}]]
        guided = nag.apply_nag(patcher, negative, *PARAMS, "L1", 0.0, 1.0)

        def call(p, rows):
            options = dict(p.model_options.get("transformer_options", {}))
            options.update(wrappers=p.wrappers, cond_or_uncond=[1, 0][-rows:])
            kw = {k: meta(rows, *s[1:]) for k, s in extra.items()}
            return lambda: base.apply_model(meta(rows, *shape[1:]), meta(rows), c_crossattn=meta(rows, tokens, width),
                                            transformer_options=options, **kw)

        plain = flops(call(patcher, 1))
        log.info("  %-28s CFG x%.3f   NAG x%.4f   (cfg 1: %.1f TFLOPs per call)", title, flops(call(patcher, 2)) / plain,
                 flops(call(guided, 1)) / plain, plain / 1e12)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="tiny,real")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    host_nodes, _ = load_host_and_pack(pytorch_attention=True)
    logging.getLogger().setLevel(logging.WARNING)  # the host's own chatter
    log.setLevel(logging.INFO)
    nag = importlib.import_module("negative_guidance_pack.nodes.nag")
    log.info("torch %s, %d threads, cpu", torch.__version__, torch.get_num_threads())
    if "tiny" in opts.only:
        tiny(host_nodes, nag, opts.rounds)
    if "real" in opts.only:
        real(nag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
