"""Negative Attention Guidance on the real host, on a tiny random model of every family it guides.

The oracle is the reference ComfyUI port (loaded by path from its folder, see docs/testing.md): on every family both
run, the pack's latent equals the port's, at batch 1 and 2, at cfg 1 and above, with a window, wherever
the port itself works. Where the port reads the negative's pooled vector the pack keeps the positive's
(one row carries both texts); those tests give the port the positive's pooled vector too, and one test
shows the difference. Families the port does not run (LTXV, Qwen-Image, Lumina2) are checked against
the host's own attention of the negative prompt. Every family: scale 1 is the model itself, alpha 0
the unpatched model, a batch of two is two runs of one, the unconditional rows at cfg > 1 are the
host's, and a step is one forward with the latent's rows only.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from tests_support import count_forwards, rel_diff

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from families import ALL_FAMILIES  # noqa: E402

STRONG = (8.0, 3.0, 0.5)  # scale, tau, alpha: NAG's effect well above rounding on these random models
STEPS = 4
TOKENS = 8
PORT_FAMILIES = ["sd15", "sdxl", "sd3", "sd35", "flux", "chroma", "hidream", "wan", "wan_i2v", "wan_vace", "wan22_5b",
                 "hunyuan_video"]
# where the port itself fails: batch 2 on HiDream (its llama negative is not expanded) and HunyuanVideo (the token
# refiner broadcasts one row), cfg > 1 on Wan I2V (its CLIP tokens are concatenated to the wrong rows), and
# HunyuanVideo's steps outside a window (it calls the host's forward with guidance in another argument's place)
PORT_BATCH_ONE = {"hidream", "hunyuan_video"}
PORT_CFG_ONE = {"wan_i2v", "hunyuan_video"}
PORT_NO_WINDOW = {"hunyuan_video"}


@pytest.fixture(scope="module")
def nag(host):
    return importlib.import_module("negative_guidance_pack.nodes.nag")


def prompts(f, tokens=TOKENS, neg_tokens=None, share_pooled=True):
    pos, neg, nag_neg = f.cond(1, tokens=tokens), f.cond(2, tokens=tokens), f.cond(7, tokens=neg_tokens or tokens)
    for key in ("pooled_output", "clip_vision_output") if share_pooled else ("clip_vision_output",):
        if pos[0][1].get(key) is not None:
            nag_neg[0][1][key] = pos[0][1][key]
    return pos, neg, nag_neg


def patched(nag, model, negative, params=STRONG, norm="L1", window=(0.0, 1.0)):
    return nag.NegativeAttentionGuidance.execute(model, negative, *params, norm, *window)[0]


def sample(host_nodes, model, f, pos, neg, cfg=1.0, latent=None, seed=0):
    return host_nodes.common_ksampler(model, seed, STEPS, cfg, "euler", "normal", pos, neg,
                                      latent or f.latent())[0]["samples"]


def port_sample(nag_port, f, pos, neg, nag_neg, cfg=1.0, latent=None, sigma_end=0.0, params=STRONG):
    # a fresh model each time: the port restores the forwards it replaced only when sampling succeeds
    return nag_port.common_ksampler_with_nag(f.model(), 0, STEPS, cfg, *params, sigma_end, "euler", "normal",
                                             pos, neg, nag_neg, latent or f.latent())[0]["samples"]


def port_cases():
    for name in PORT_FAMILIES:
        for cfg, batch, window in ((1.0, 1, False), (1.0, 2, False), (4.0, 2, False), (1.0, 1, True), (4.0, 1, False)):
            if (batch > 1 and name in PORT_BATCH_ONE) or (cfg > 1 and name in PORT_CFG_ONE):
                continue
            if window and name in PORT_NO_WINDOW:
                continue
            if cfg > 1 and batch == 1 and name not in PORT_BATCH_ONE:
                continue
            yield pytest.param(name, cfg, batch, window, id=f"{name}-cfg{cfg:g}-batch{batch}{'-window' if window else ''}")


@pytest.mark.parametrize("name,cfg,batch,window", list(port_cases()))
def test_the_pack_equals_the_reference_port(nag, nag_port, host_nodes, name, cfg, batch, window):
    """Where the port does not import on this host, the family is checked against the host's own attention."""
    f = ALL_FAMILIES[name]
    if nag_port is None:
        return negative_attention_is_the_hosts(nag, host_nodes, f)
    pos, neg, nag_neg = prompts(f)
    latent = f.latent(batch=batch)
    end = 0.6 if window else 1.0
    sigma_end = float(f.model().get_model_object("model_sampling").percent_to_sigma(end)) if window else 0.0
    want = port_sample(nag_port, f, pos, neg, nag_neg, cfg, latent, sigma_end)
    got = sample(host_nodes, patched(nag, f.model(), nag_neg, window=(0.0, end)), f, pos, neg, cfg, latent)
    plain = sample(host_nodes, f.model(), f, pos, neg, cfg, latent)
    effect = rel_diff(plain, want)
    assert rel_diff(got, want) <= 1e-4 and rel_diff(got, want) < effect / 20, (rel_diff(got, want), effect)


@pytest.mark.parametrize("name", ["flux", "sd3", "hidream", "hunyuan_video"])
def test_where_the_port_uses_the_negatives_pooled_vector_the_pack_keeps_the_positives(nag, nag_port, host_nodes, name):
    """One row carries both texts, so the negative's tokens are modulated with the positive's pooled vector."""
    f = ALL_FAMILIES[name]
    if nag_port is None:
        return negative_attention_is_the_hosts(nag, host_nodes, f)
    pos, neg, nag_neg = prompts(f, share_pooled=False)
    got = sample(host_nodes, patched(nag, f.model(), nag_neg), f, pos, neg)
    theirs = port_sample(nag_port, f, pos, neg, nag_neg)
    _, _, same_pooled = prompts(f)
    same = rel_diff(got, port_sample(nag_port, f, pos, neg, same_pooled))
    assert same <= 1e-4 and rel_diff(got, theirs) > 10 * same


def test_texts_of_different_lengths_on_flux_equal_the_port(nag, nag_port, host_nodes):
    f = ALL_FAMILIES["flux"]
    if nag_port is None:
        return negative_attention_is_the_hosts(nag, host_nodes, f, neg_tokens=5)
    pos, neg, nag_neg = prompts(f, tokens=8, neg_tokens=5)
    want = port_sample(nag_port, f, pos, neg, nag_neg)
    assert rel_diff(sample(host_nodes, patched(nag, f.model(), nag_neg), f, pos, neg), want) <= 1e-4


# ---------------------------------------------------------------------------- every family

ALL = list(ALL_FAMILIES)


@pytest.mark.parametrize("name", ALL)
def test_scale_one_is_the_model_and_alpha_zero_the_unpatched_model(nag, host_nodes, name):
    f = ALL_FAMILIES[name]
    model = f.model()
    pos, neg, nag_neg = prompts(f)
    assert patched(nag, model, nag_neg, params=(1.0, 2.5, 0.5)) is model
    plain = sample(host_nodes, model, f, pos, neg)
    assert rel_diff(sample(host_nodes, patched(nag, model, nag_neg, params=(8.0, 3.0, 0.0)), f, pos, neg), plain) <= 1e-5
    guided = sample(host_nodes, patched(nag, model, nag_neg), f, pos, neg)
    assert torch.isfinite(guided).all() and rel_diff(guided, plain) > 1e-5


@pytest.mark.parametrize("name", ALL)
def test_a_batch_of_two_is_two_runs_of_one(nag, host_nodes, name):
    f = ALL_FAMILIES[name]
    pos, neg, nag_neg = prompts(f)
    model = patched(nag, f.model(), nag_neg)
    both = sample(host_nodes, model, f, pos, neg, cfg=1.0, latent=f.latent(batch=2))
    for i in range(2):
        one = dict(f.latent(batch=1), batch_index=[i])
        assert rel_diff(both[i:i + 1], sample(host_nodes, model, f, pos, neg, latent=one)) <= 1e-5


@pytest.mark.parametrize("name", ALL)
def test_each_step_is_one_forward_of_the_latents_rows(nag, host_nodes, name):
    f = ALL_FAMILIES[name]
    pos, neg, nag_neg = prompts(f)
    model = patched(nag, f.model(), nag_neg)
    with count_forwards(model) as rows:
        sample(host_nodes, model, f, pos, neg, latent=f.latent(batch=2))
    assert rows == [2] * STEPS


@pytest.mark.parametrize("name", ALL)
def test_above_cfg_one_nag_guides_the_positive_rows_and_the_unconditional_rows_are_the_hosts(nag, host_nodes, name):
    f = ALL_FAMILIES[name]
    pos, neg, nag_neg = prompts(f)
    outputs = {}

    def record(key):
        def wrapper(executor, model, conds, x, timestep, model_options):
            out = executor(model, conds, x, timestep, model_options)
            outputs.setdefault(key, [t.clone() for t in out])  # the first step: the same input x for both
            return out
        return wrapper

    import comfy.patcher_extension

    for key, model in (("plain", f.model()), ("nag", patched(nag, f.model(), nag_neg))):
        m = model.clone()
        m.add_wrapper(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, record(key))
        sample(host_nodes, m, f, pos, neg, cfg=4.0)
    assert rel_diff(outputs["nag"][1], outputs["plain"][1]) <= 1e-5   # the sampler's negative, untouched
    assert rel_diff(outputs["nag"][0], outputs["plain"][0]) > 1e-5    # the positive, guided


# ---------------------------------------------------------------------------- the host's own attention as oracle


class Recorder:
    """An attention override of "another node" (the way a sage attention node sets one): it records
    every call and computes it with the host's kernel."""

    def __init__(self):
        self.calls = []

    def __call__(self, func, *args, **kwargs):
        out = func(*args, **kwargs)
        self.calls.append((args[0].shape, args[1].shape, out))
        return out


def _with_recorder(model):
    m = model.clone()
    recorder = Recorder()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recorder
    return m, recorder


def _calls(host_nodes, model, f, pos, neg):
    m, recorder = _with_recorder(model)
    host_nodes.common_ksampler(m, 0, 1, 1.0, "euler", "normal", pos, neg, f.latent())
    return [out for _, _, out in recorder.calls]


@pytest.mark.parametrize("name", ["ltxv", "qwen_image", "lumina2", "wan", "sd15", "flux"])
def test_the_negatives_attention_is_the_hosts_own_attention_of_the_negative_prompt(nag, host_nodes, name):
    negative_attention_is_the_hosts(nag, host_nodes, ALL_FAMILIES[name])


def negative_attention_is_the_hosts(nag, host_nodes, f, neg_tokens=None):
    """In the first attention that reads the text, the negative's part equals the host's own attention run
    with the negative as the prompt; another node's attention override computed both."""
    pos, neg, nag_neg = prompts(f, neg_tokens=neg_tokens)
    as_prompt = _calls(host_nodes, f.model(), f, nag_neg, neg)
    other = _calls(host_nodes, f.model(), f, prompts(f, tokens=neg_tokens or TOKENS)[0], neg)
    reads_text = [a for a, b in zip(as_prompt, other) if a.shape == b.shape and rel_diff(a, b) > 1e-6]
    guided = _calls(host_nodes, patched(nag, f.model(), nag_neg), f, pos, neg)
    first = reads_text[0]
    assert any(o.shape[1:] == first.shape[1:] and rel_diff(o[-1:], first) <= 1e-5 for o in guided), \
        "no attention call of the guided run computed the negative prompt's own attention"


@pytest.mark.parametrize("name", ["lumina2", "qwen_image", "hunyuan_video", "flux", "hidream"])
def test_in_a_joint_attention_the_positive_sees_what_it_sees_alone(nag, host_nodes, name):
    """The positive's part of the first joint attention equals the unpatched model's, at the level of the
    attention output: the negative's tokens take no weight from it, and where the model places text by
    token index (Lumina2 moves the image after the longer caption) the positive is moved back."""
    f = ALL_FAMILIES[name]
    pos, neg, nag_neg = prompts(f, neg_tokens=5)
    alone = _calls(host_nodes, f.model(), f, pos, neg)
    joint = max(o.shape[1] for o in alone)
    first = next(o for o in alone if o.shape[1] == joint)
    guided = _calls(host_nodes, patched(nag, f.model(), nag_neg), f, pos, neg)
    assert any(o.shape[1:] == first.shape[1:] and rel_diff(o[:1], first) <= 1e-5 for o in guided)


def test_nag_calls_through_to_a_block_replacement_and_an_attention_override(nag, host_nodes):
    """Another node's ``patches_replace['dit']`` block (a cache, say) and its attention override both act."""
    f = ALL_FAMILIES["flux"]
    pos, neg, nag_neg = prompts(f)
    seen = []

    def double_block(args, extra):
        seen.append(args["txt"].shape[1])
        out = extra["original_block"](args)
        out["img"] = out["img"] * 1.5
        return out

    def with_block(model):
        m = model.clone()
        m.set_model_patch_replace(double_block, "dit", "double_block", 0)
        return m

    only_block = sample(host_nodes, with_block(f.model()), f, pos, neg)
    only_nag = sample(host_nodes, patched(nag, f.model(), nag_neg), f, pos, neg)
    guided, recorder = _with_recorder(with_block(patched(nag, f.model(), nag_neg)))
    both = sample(host_nodes, guided, f, pos, neg)
    assert set(seen) == {TOKENS, 2 * TOKENS}  # the block ran without NAG, then with the negative's tokens in it
    assert recorder.calls and rel_diff(both, only_block) > 1e-4 and rel_diff(both, only_nag) > 1e-4


# ---------------------------------------------------------------------------- the window and refusals


def test_the_window_limits_where_nag_acts(nag, host_nodes):
    import comfy.patcher_extension
    import comfy.samplers

    f = ALL_FAMILIES["sd15"]
    pos, neg, nag_neg = prompts(f)
    model = patched(nag, f.model(), nag_neg, window=(0.5, 1.0))
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", STEPS)[:-1].tolist()
    start = ms.percent_to_sigma(0.5)
    tokens = []

    def inner(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        tokens.append(c_crossattn.shape[1])
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_inner", inner)
    sample(host_nodes, m, f, pos, neg)
    assert tokens == [2 * TOKENS if s <= start else TOKENS for s in sigmas] and len(set(tokens)) == 2


def test_two_nag_nodes_on_one_model_are_refused(nag):
    f = ALL_FAMILIES["sd15"]
    _, _, nag_neg = prompts(f)
    once = patched(nag, f.model(), nag_neg)
    with pytest.raises(ValueError, match="NegativeAttentionGuidance: input 'model' already has Negative Attention"):
        patched(nag, once, nag_neg)


def test_a_model_whose_cross_attention_another_node_replaced_is_refused(nag):
    f = ALL_FAMILIES["sd15"]
    _, _, nag_neg = prompts(f)
    model = f.model().clone()
    model.set_model_attn2_replace(lambda q, k, v, extra: q, "input", 1)
    with pytest.raises(ValueError, match="has its cross-attention replaced by another node"):
        patched(nag, model, nag_neg)


def test_a_negative_from_another_familys_encoder_is_named(nag):
    f = ALL_FAMILIES["flux"]
    with pytest.raises(ValueError, match=r"input 'negative' must have this model's context width \(4096, Flux\)"):
        patched(nag, f.model(), [[torch.randn(1, 8, 768), {}]])


def test_hidream_needs_the_negatives_llama_states(nag):
    f = ALL_FAMILIES["hidream"]
    with pytest.raises(ValueError, match="must carry 'conditioning_llama3'"):
        patched(nag, f.model(), [[torch.randn(1, 8, 4096), {}]])


def test_a_longer_negative_costs_its_own_tokens_only(nag, host_nodes):
    """No alignment of token counts (the earlier least-common-multiple repetition made 77 vs 100 tokens
    into 7,700 keys): the negative's keys are its own."""
    f = ALL_FAMILIES["sd15"]
    pos, neg, _ = prompts(f)
    long_negative = f.cond(7, tokens=154)
    guided, recorder = _with_recorder(patched(nag, f.model(), long_negative))
    out = sample(host_nodes, guided, f, pos, neg)
    assert torch.isfinite(out).all()
    assert {k[1] for q, k, _ in recorder.calls if q[1] != k[1]} == {TOKENS, 154}


@pytest.mark.parametrize("name,why", [("PixArtMS", "without the host.s transformer options"), ("WanModel_S2V", "audio"),
                                      ("MMDiT", "no adapter yet"), ("ChromaRadiance", "pixels")])
def test_a_family_nag_cannot_reach_is_refused_by_name_with_why(nag, name, why):
    class Patcher:  # a MODEL whose diffusion model is of that class
        def clone(self):
            return self

        def get_model_object(self, key):
            return type(name, (torch.nn.Module,), {})()

    with pytest.raises(ValueError, match=rf"input 'model' is a {name}, which NAG cannot guide: .*{why}"):
        patched(nag, Patcher(), [[torch.randn(1, 8, 64), {}]])


def test_flux_kontext_reference_tokens_are_guided_like_the_port(nag, nag_port, host_nodes):
    f = ALL_FAMILIES["flux"]
    if nag_port is None:
        return negative_attention_is_the_hosts(nag, host_nodes, f)
    reference = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    pos, neg, nag_neg = prompts(f)
    pos = [[pos[0][0], dict(pos[0][1], reference_latents=[reference])]]
    want = port_sample(nag_port, f, pos, neg, nag_neg)
    got = sample(host_nodes, patched(nag, f.model(), nag_neg), f, pos, neg)
    plain = sample(host_nodes, f.model(), f, pos, neg)
    assert rel_diff(got, want) <= 1e-4 < rel_diff(plain, want)


@pytest.mark.parametrize("name", ["sd15", "sdxl", "wan", "ltxv"])
def test_on_cross_attention_models_nag_adds_exactly_one_cross_attention_per_layer(nag, host_nodes, name):
    """The extra FLOPs of a step are the negative's keys, values and attention in each cross-attention, plus
    (Wan, LTXV) its text embedding once per model call: nothing else."""
    from torch.utils.flop_counter import FlopCounterMode

    f = ALL_FAMILIES[name]
    pos, neg, nag_neg = prompts(f, neg_tokens=5)
    model = f.model()
    layers = []  # (image tokens, inner width, context width) of each cross-attention
    cross = [m for n, m in model.model.diffusion_model.named_modules()
             if n.endswith(("attn2", "cross_attn")) and hasattr(m, "q" if name == "wan" else "to_q")]
    hooks = [m.register_forward_pre_hook(lambda mod, args: layers.append(args[0].shape[1])) for m in cross]

    def count(m):
        layers.clear()
        with FlopCounterMode(display=False) as counter:
            host_nodes.common_ksampler(m, 0, 1, 1.0, "euler", "normal", pos, neg, f.latent())
        return counter.get_total_flops(), list(layers)

    try:
        plain, tokens = count(model)
        guided, _ = count(patched(nag, model, nag_neg))
    finally:
        for h in hooks:
            h.remove()
    expected = 0
    for module, n in zip(cross, tokens):
        k = module.k if name == "wan" else module.to_k
        inner, width = k.weight.shape
        expected += 2 * 2 * 5 * width * inner + 2 * 2 * n * 5 * inner  # k and v of 5 tokens; QK^T and PV
    dm = model.model.diffusion_model
    embed = {"wan": lambda: dm.text_embedding, "ltxv": lambda: dm.caption_projection}.get(name)
    if embed is not None:
        expected += sum(2 * 5 * m.weight.shape[0] * m.weight.shape[1] for m in embed().modules()
                        if isinstance(m, torch.nn.Linear))
    assert guided - plain == expected


# ---------------------------------------------------------------------------- never a silent no-op


def _cross_layers(model) -> int:
    """The model's text cross-attention modules, counted from the host's own module names."""
    dm = model.get_model_object("diffusion_model")
    return sum(1 for n, _ in dm.named_modules() if n.endswith("attn2") or n.endswith("cross_attn"))


def _logged(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("NegativeAttentionGuidance on ")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("name,cfg,rows", [("sd15", 1.0, "1 of 1"), ("sd15", 2.0, "1 of 2"), ("wan", 1.0, "1 of 1")])
def test_each_run_logs_the_layers_and_rows_nag_guided(nag, host_nodes, caplog, name, cfg, rows):
    f = ALL_FAMILIES[name]
    pos, neg, nag_neg = prompts(f)
    model = patched(nag, f.model(), nag_neg)
    with caplog.at_level("INFO", logger="negative_guidance_pack"):
        sample(host_nodes, model, f, pos, neg, cfg=cfg)
    assert (f"evaluations inside its window: {STEPS}; guided per evaluation: attention layers {_cross_layers(model)}, "
            f"rows {rows}") in _logged(caplog)


def test_positive_and_negative_in_separate_model_calls_are_guided_as_in_one(nag, host_nodes, caplog):
    """The host splits cond and uncond into separate model calls when memory is short (here: a model whose every
    batch is too large); NAG guides the positive's call as it guides the positive's rows of one call."""
    f = ALL_FAMILIES["sd15"]
    pos, neg, nag_neg = prompts(f)
    together = sample(host_nodes, patched(nag, f.model(), nag_neg), f, pos, neg, cfg=2.0)
    short = f.model().clone()
    short.add_object_patch("memory_usage_factor", 1e30)
    model = patched(nag, short, nag_neg)
    caplog.clear()
    with count_forwards(model) as forwards, caplog.at_level("INFO", logger="negative_guidance_pack"):
        apart = sample(host_nodes, model, f, pos, neg, cfg=2.0)
    assert forwards == [1, 1] * STEPS and rel_diff(apart, together) <= 1e-5
    assert _logged(caplog).endswith(", rows 1 of 2")


def _relabelled(model):
    """A clone whose model calls another node relabels as unconditional (outside NAG's wrapper)."""
    import comfy.patcher_extension

    def relabel(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        options = dict(transformer_options, cond_or_uncond=[1] * len(transformer_options["cond_or_uncond"]))
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_relabel", relabel)
    return m


def _text_cut(model, tokens):
    """A clone whose text another node cuts to its first ``tokens`` tokens after NAG extended it."""
    import comfy.patcher_extension

    def cut(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        return executor(x, t, c_concat, c_crossattn[:, :tokens], control, transformer_options, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_cut", cut)
    return m


def test_nag_that_guides_no_row_stops_at_the_first_evaluation_inside_its_window(nag, host_nodes):
    import comfy.samplers

    f = ALL_FAMILIES["sd15"]
    pos, neg, nag_neg = prompts(f)
    seen, model = [], patched(nag, _relabelled(f.model()), nag_neg, window=(0.5, 1.0))
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", STEPS)[:-1].tolist()
    first_inside = next(i for i, s in enumerate(sigmas) if s <= ms.percent_to_sigma(0.5))
    with pytest.raises(ValueError, match=r"NegativeAttentionGuidance: input 'model' is a UNetModel whose model calls "
                                         r"held no row of the positive prompt"):
        sample(host_nodes, _counting(model, seen), f, pos, neg)
    assert first_inside > 0 and len(seen) == first_inside + 1  # the evaluations before the window, then the first


def test_nag_that_guides_no_layer_stops_the_run_unless_it_is_off(nag, host_nodes):
    f = ALL_FAMILIES["wan"]
    pos, neg, nag_neg = prompts(f)
    with pytest.raises(ValueError, match=r"input 'model' is a WanModel none of whose \d+ attention calls NAG could "
                                         r"guide"):
        sample(host_nodes, _text_cut(patched(nag, f.model(), nag_neg), TOKENS), f, pos, neg)
    off = _text_cut(patched(nag, f.model(), nag_neg, params=(8.0, 3.0, 0.0)), TOKENS)
    assert torch.isfinite(sample(host_nodes, off, f, pos, neg)).all()


def _counting(model, seen):
    """A clone that records the sigma of every evaluation (a CALC_COND_BATCH wrapper outside NAG's)."""
    import comfy.patcher_extension

    def count(executor, model_, conds, x, timestep, model_options, *args, **kwargs):
        seen.append(float(timestep[0]))
        return executor(model_, conds, x, timestep, model_options, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test_count", count)
    return m


def test_evaluations_another_nodes_cache_skipped_are_not_errors(nag, host_nodes, caplog):
    """A cache that returns without running the diffusion model (a DIFFUSION_MODEL wrapper, as the host's EasyCache)
    at the first evaluations: NAG reached no attention there, which is not a no-op of NAG's."""
    import comfy.patcher_extension

    f = ALL_FAMILIES["flux"]
    pos, neg, nag_neg = prompts(f)
    calls = []

    def cache(executor, x, *args, **kwargs):
        calls.append(x.shape[0])
        return torch.zeros_like(x) if len(calls) <= 2 else executor(x, *args, **kwargs)

    model = patched(nag, f.model(), nag_neg).clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_cache", cache)
    with caplog.at_level("INFO", logger="negative_guidance_pack"):
        out = sample(host_nodes, model, f, pos, neg)
    assert torch.isfinite(out).all() and len(calls) == STEPS
    assert f"evaluations inside its window: {STEPS - 2} (and 2 whose model another node skipped);" in _logged(caplog)


def _apart(order):
    """A ``sampler_calc_cond_batch_function`` of another node that predicts cond and uncond in separate host calls,
    each with the other left None (as the host's SkipLayerGuidanceDiTSimple does), in the given order."""
    import comfy.samplers

    def calc(args):
        cond, uncond = args["conds"]
        model, x, sigma, options = args["model"], args["input"], args["sigma"], args["model_options"]
        out = {}
        for which in order:
            conds = [cond, None] if which == "cond" else [None, uncond]
            out[which] = comfy.samplers.calc_cond_batch(model, conds, x, sigma, options)[0 if which == "cond" else 1]
        return [out["cond"], out["uncond"]]
    return calc


@pytest.mark.parametrize("order", [("cond", "uncond"), ("uncond", "cond")])
def test_a_call_with_no_positive_is_not_a_no_op_of_nags(nag, host_nodes, caplog, order):
    """Another node predicting the uncond in a call of its own, before or after the cond's, with the host's
    SkipLayerGuidanceDiTSimple's layout: NAG guides the cond's call and the run is not stopped."""
    f = ALL_FAMILIES["sd15"]
    pos, neg, nag_neg = prompts(f)
    together = sample(host_nodes, patched(nag, f.model(), nag_neg), f, pos, neg, cfg=2.0)
    model = patched(nag, f.model(), nag_neg).clone()
    model.set_model_sampler_calc_cond_batch_function(_apart(order))
    caplog.clear()
    with caplog.at_level("INFO", logger="negative_guidance_pack"):
        apart = sample(host_nodes, model, f, pos, neg, cfg=2.0)
    assert rel_diff(apart, together) <= 1e-5
    assert _logged(caplog).endswith(f"evaluations inside its window: {STEPS}; guided per evaluation: attention layers "
                                    f"{_cross_layers(model)}, rows 1 of 1")


def test_nag_runs_beside_the_hosts_skip_layer_guidance(nag, host_nodes):
    """The host's SkipLayerGuidanceDiTSimple (its uncond in a call of its own) on Flux with NAG at cfg 2."""
    slg = importlib.import_module("comfy_extras.nodes_slg")
    f = ALL_FAMILIES["flux"]
    pos, neg, nag_neg = prompts(f)
    nag_only = sample(host_nodes, patched(nag, f.model(), nag_neg), f, pos, neg, cfg=2.0)
    both = slg.SkipLayerGuidanceDiTSimple.execute(patched(nag, f.model(), nag_neg), 0.0, 1.0, "0", "0")[0]
    out = sample(host_nodes, both, f, pos, neg, cfg=2.0)
    assert torch.isfinite(out).all() and rel_diff(out, nag_only) > 1e-4
