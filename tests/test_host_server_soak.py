"""Reliability in the real ComfyUI server: cached outputs are never mutated, and a soak of 50 prompts.

The host caches every node's output and hands the same Python objects to the next prompt whose
inputs did not change: models, conditioning lists and dicts, latents, and the pack's
``NG_NEGATIVES`` chains, ``NG_RULE`` objects and ``NG_TRACE``. A node that mutated one of them
would make the second run of a prompt differ from the first. These tests run each of the pack's
three entry points (with weighted negatives, a stateful rule, and the trace with the Guidance
Visualizer where the entry point records one) and compare, byte for byte, the latents the host's
``SaveLatent`` writes (the tiny checkpoint's random VAE decodes to a near-constant image, so images
would prove little) and the visualizer's pixels; two seeds must give different latents, so the
comparison has power. The soak queues 50 varied prompts at once, checks every one succeeds and
that the server's resident memory after the 50th is within 5% of that after the 10th, and
interrupts one long prompt queued among them. The server is the session-scoped ``server`` fixture
(``conftest.py``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
from PIL import Image
from server_support import CHECKPOINT, PROMPT_TIMEOUT, get, post, queue, rss_bytes, wait

log = logging.getLogger(__name__)
PATHS = ("sampler", "patch", "guider")
STEPS = 3
POLL = 0.05


def _node(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs}


def build_prompt(path: str, seed: int, prefix: str, visualizer_steps: int = 6, weight: float = 4.0,
                 rule_param: float | None = None, steps: int = STEPS) -> dict:
    """An API prompt through one entry point, with two weighted negatives (one windowed) and a rule.

    ``sampler``: NegativeGuidanceSampler with the dynamic rule and record_trace, then the visualizer;
    ``patch``: NegativeGuidance (APG inside a guidance interval) then the host's KSampler;
    ``guider``: NegativeGuider (Perp-Neg, record_trace) then SamplerCustomAdvanced and the visualizer.
    Every path shares the loader and text-encoder nodes (same ids and inputs), so the host keeps them
    cached across prompts. The sampled latent goes to the host's SaveLatent under ``prefix``.
    """
    clip = ["1", 1]
    p = {
        "1": _node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT),
        "2": _node("CLIPTextEncode", text="portrait photo of a man, studio lighting", clip=clip),
        "3": _node("CLIPTextEncode", text="blurry, low quality", clip=clip),
        "4": _node("CLIPTextEncode", text="mustache, beard", clip=clip),
        "30": _node("CLIPTextEncode", text="hat", clip=clip),
        "20": _node("CLIPTextEncode", text="", clip=clip),
        "6": _node("EmptyLatentImage", width=64, height=64, batch_size=1),
        "5": _node("WeightedNegative", conditioning=["4", 0], weight=weight, start_percent=0.0, end_percent=1.0),
        "31": _node("WeightedNegative", conditioning=["30", 0], weight=2.0, start_percent=0.3, end_percent=1.0,
                    negatives=["5", 0]),
    }
    guidance = dict(negatives=["31", 0], unconditional=["20", 0], rule=["40", 0],
                    negative_start_percent=0.0, negative_end_percent=0.7)
    if path == "sampler":
        p["40"] = _node("NegativeRuleDynamic", scale=20.0 if rule_param is None else rule_param, prior=0.01,
                        temperature=1.0, offset=0.0, p_min=1e-6, p_max=0.99)
        p["7"] = _node("NegativeGuidanceSampler", model=["1", 0], seed=seed, steps=steps, cfg=7.0,
                       sampler_name="euler_ancestral", scheduler="normal", positive=["2", 0], negative=["3", 0],
                       latent_image=["6", 0], denoise=1.0, record_trace=True, **guidance)
        trace = ["7", 1]
    elif path == "patch":
        p["41"] = _node("NegativeRuleAPG", eta=0.0 if rule_param is None else rule_param, norm_threshold=15.0,
                        momentum=-0.5)
        p["40"] = _node("NegativeRuleInterval", sigma_low=0.5, sigma_high=100.0, rule=["41", 0])
        p["50"] = _node("NegativeGuidance", model=["1", 0], **guidance)
        p["7"] = _node("KSampler", model=["50", 0], seed=seed, steps=steps, cfg=7.0, sampler_name="euler",
                       scheduler="normal", positive=["2", 0], negative=["3", 0], latent_image=["6", 0], denoise=1.0)
        trace = None
    elif path == "guider":
        p["40"] = _node("NegativeRulePerpNeg", neg_scale=1.0 if rule_param is None else rule_param)
        p["50"] = _node("NegativeGuider", model=["1", 0], positive=["2", 0], negative=["3", 0], cfg=7.0,
                        record_trace=True, **guidance)
        p["51"] = _node("RandomNoise", noise_seed=seed)
        p["52"] = _node("KSamplerSelect", sampler_name="euler")
        p["53"] = _node("BasicScheduler", model=["1", 0], scheduler="normal", steps=steps, denoise=1.0)
        p["7"] = _node("SamplerCustomAdvanced", noise=["51", 0], guider=["50", 0], sampler=["52", 0],
                       sigmas=["53", 0], latent_image=["6", 0])
        trace = ["50", 1]
    else:
        raise ValueError(path)
    if trace is not None:
        p["10"] = _node("GuidanceVisualizer", trace=trace, latent=["7", 0], steps=visualizer_steps)
    p["11"] = _node("SaveLatent", samples=["7", 0], filename_prefix=prefix)
    return p


def _file(server, item) -> Path:
    folder = {"output": "output", "temp": "temp"}[item["type"]]
    return server["base"] / folder / item["subfolder"] / item["filename"]


def saved_latent(server, entry) -> bytes:
    """The latent tensor's bytes from SaveLatent's file (its metadata holds the prompt, so not the file's)."""
    (item,) = entry["outputs"]["11"]["latents"]
    tensor = safetensors.torch.load_file(str(_file(server, item)))["latent_tensor"]
    assert tensor.shape == (1, 4, 8, 8) and bool(tensor.isfinite().all())
    return tensor.numpy().tobytes()


def visualizer_pixels(server, entry) -> bytes:
    (item,) = entry["outputs"]["10"]["images"]
    with Image.open(_file(server, item)) as im:
        return np.asarray(im.convert("RGB")).tobytes()


def cached_nodes(entry) -> set:
    """Node ids the host served from its cache in this prompt (its execution_cached message)."""
    for name, data in entry["status"]["messages"]:
        if name == "execution_cached":
            return set(data["nodes"])
    raise AssertionError(f"no execution_cached message: {entry['status']['messages']}")


def run_ok(server, prompt) -> dict:
    entry = wait(server["url"], queue(server["url"], prompt), poll=POLL)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry


@pytest.mark.parametrize("path", PATHS)
def test_a_rerun_with_upstream_outputs_from_the_cache_gives_identical_bytes(server, path):
    """Seed A, seed B, seed A again: the third run re-samples with the cached pack outputs of the first.

    Then a changed visualizer (the sampler's latent and the trace from the cache), the first
    visualizer again (re-drawn from the cached trace), and the identical prompt twice (all cached).
    """
    upstream = {"5", "31", "40"} | ({"41"} if path == "patch" else set()) | ({"50"} if path != "sampler" else set())
    traced = path != "patch"
    tag = f"ng_cache/{path}"
    first = run_ok(server, build_prompt(path, seed=11, prefix=f"{tag}_1"))
    other = run_ok(server, build_prompt(path, seed=12, prefix=f"{tag}_2"))
    again = run_ok(server, build_prompt(path, seed=11, prefix=f"{tag}_3"))
    reference = saved_latent(server, first)
    assert saved_latent(server, other) != reference, "two seeds gave the same latent: the comparison has no power"
    missing = upstream - cached_nodes(again)
    assert not missing and "7" not in cached_nodes(again), (
        f"the host did not serve the pack's upstream outputs {sorted(missing)} from its cache while re-sampling; "
        f"cached: {sorted(cached_nodes(again))}")
    assert saved_latent(server, again) == reference, "re-sampling with cached pack outputs changed the latent"
    if traced:
        assert visualizer_pixels(server, again) == visualizer_pixels(server, first)

    redraw = run_ok(server, build_prompt(path, seed=11, prefix=f"{tag}_4", visualizer_steps=5))
    assert "7" in cached_nodes(redraw)
    assert saved_latent(server, redraw) == reference, "a downstream node changed the cached latent"
    back = run_ok(server, build_prompt(path, seed=11, prefix=f"{tag}_5"))
    assert saved_latent(server, back) == reference
    if traced:
        assert "10" not in cached_nodes(back)
        assert visualizer_pixels(server, back) == visualizer_pixels(server, first), (
            "the visualizer drew a different picture from the cached trace")
    prompt = build_prompt(path, seed=11, prefix=f"{tag}_5")
    same = run_ok(server, prompt)
    assert cached_nodes(same) == set(prompt), "an identical prompt ran a node again"
    if same["outputs"]:  # a host that reports a fully cached prompt's outputs again (0.3.64; 0.8.0 reports none)
        assert same["outputs"] == back["outputs"]
        assert saved_latent(server, same) == reference


SOAK, MEASURE_AT, LONG_AFTER = 50, 10, 30


def soak_prompt(i: int) -> dict:
    """Prompt ``i`` of the soak: the three entry points in turn, each with its own seed, weight and rule."""
    path = PATHS[i % len(PATHS)]
    rule_param = {"sampler": 10.0 + i, "patch": 0.02 * i, "guider": 0.5 + 0.02 * i}[path]
    return build_prompt(path, seed=1000 + i, prefix=f"ng_soak/{i:02d}", visualizer_steps=4,
                        weight=2.0 + 0.25 * (i % 7), rule_param=rule_param)


def _seconds(entry) -> float:
    """How long the host took over a prompt, from its own execution_start and end messages."""
    stamps = {name: data.get("timestamp") for name, data in entry["status"]["messages"]}
    end = stamps.get("execution_success") or stamps.get("execution_interrupted") or stamps.get("execution_error")
    return (end - stamps["execution_start"]) / 1000


def _wait_fast(url, prompt_id, deadline):
    return wait(url, prompt_id, timeout=max(deadline - time.time(), 0.1), poll=POLL)


def test_soak_of_fifty_prompts_with_an_interrupt_among_them(server):
    """50 varied prompts queued at once all succeed, memory holds, and a long one interrupted in the middle
    of the queue ends interrupted while the rest carry on."""
    url, pid = server["url"], server["proc"].pid
    run_ok(server, soak_prompt(SOAK))  # warm the loader and encoders so the soak only samples
    start = time.time()
    ids = []
    for i in range(SOAK):
        ids.append(queue(url, soak_prompt(i)))
        if i + 1 == LONG_AFTER:
            long_id = queue(url, build_prompt("sampler", seed=7, prefix="ng_soak/long", steps=400))
    deadline = start + 10 * PROMPT_TIMEOUT
    rss, entries, interrupted = {}, {}, None
    for n, prompt_id in enumerate(ids, 1):
        entries[prompt_id] = _wait_fast(url, prompt_id, deadline)
        rss[n] = rss_bytes(pid)
        if n == LONG_AFTER:  # the long prompt runs next: interrupt it once it is inside its sampler
            while time.time() < deadline and not any(item[1] == long_id for item in get(url, "/queue")["queue_running"]):
                time.sleep(POLL)
            time.sleep(1.0)  # well inside its 400 steps (the nodes before its sampler come from the cache)
            status, _ = post(url, "/interrupt", {"prompt_id": long_id})
            assert status == 200
            interrupted = _wait_fast(url, long_id, deadline)
    wall = time.time() - start

    failed = {i: e["status"] for i, e in enumerate(entries.values()) if e["status"]["status_str"] != "success"}
    assert not failed, f"soak prompts failed: {failed}"
    shared = {"1", "2", "3", "4", "6", "20", "30"}  # the loader, the encoders and the empty latent
    recomputed = {i: sorted(shared - cached_nodes(e)) for i, e in enumerate(entries.values()) if shared - cached_nodes(e)}
    assert not recomputed, f"the host re-ran shared nodes, so the soak measured more than the pack: {recomputed}"
    assert len({saved_latent(server, e) for e in entries.values()}) == SOAK, "soak prompts repeated a latent"
    assert interrupted["status"]["status_str"] == "error" and not interrupted["status"]["completed"]
    events = dict(interrupted["status"]["messages"])
    assert "execution_interrupted" in events, interrupted["status"]["messages"]
    ratio = rss[SOAK] / rss[MEASURE_AT]
    seconds = sorted(_seconds(e) for e in entries.values())
    log.info(f"soak: {SOAK} prompts + 1 interrupted in {wall:.1f} s; RSS after #{MEASURE_AT} {rss[MEASURE_AT] / 2**20:.1f} "
             f"MiB, after #{SOAK} {rss[SOAK] / 2**20:.1f} MiB, ratio {ratio:.4f}; interrupted in "
             f"{events['execution_interrupted']['node_type']}; per prompt {seconds[0]:.2f}..{seconds[-1]:.2f} s, median "
             f"{seconds[len(seconds) // 2]:.2f} s; RSS MiB by prompt: "
             f"{[round(v / 2**20) for v in rss.values()]}")
    assert ratio <= 1.05, (f"server RSS grew {100 * (ratio - 1):.1f}% from prompt {MEASURE_AT} to {SOAK}: "
                           f"{[round(v / 2**20) for v in rss.values()]} MiB")
