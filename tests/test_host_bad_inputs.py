"""Bad inputs and no mutation, for all eighteen nodes of the pack.

1. One table of bad inputs. Each row must raise the pack's ``InputError`` whose message starts
   ``"<node id>: input '<input name>'"`` and says what was expected, from ``execute`` (or, for a
   patched model, when sampling starts) and before any model forward (``count_forwards``), any diff
   or any drawing. Every float input of every node is also tried with NaN, +inf and -inf.
2. No node mutates its inputs: conditioning lists, their dicts and tensors, latents, chains, rules,
   traces, the CLIP object and the model patcher's state (model options with transformer options,
   wrappers, callbacks, patches) compare equal after ``execute`` and, where a node returns a model
   or a guider, after sampling with it (tiny model, 2 steps, 8x8 latent).

Token lengths: the host batches two prompts only when repeating tokens up to their least common
multiple stays within 4 repeats (comfy/conds.py ``CONDCrossAttn.can_concat``); otherwise it runs
them as separate forwards, so the entry points need no error for it (checked below). The pack's
own alignment is in ConditioningDiff (refused beyond the host's limit, rows below) and NAG (it
aligns any two lengths itself, inside one attention call).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import types

import pytest
import torch
from tests_support import cond, count_forwards, latent

NAN, INF = math.nan, math.inf


# ---------------------------------------------------------------------------- shared inputs


def nan_cond(seed=1, where="tensor", value=NAN, width=768):
    c = cond(seed, width=width)
    if where == "pooled":
        c[0][1]["pooled_output"] = torch.full((1, width), value)
    else:
        c[0][0][0, 3, 5] = value
    return c


def rich_cond(seed, tokens=77):
    """A conditioning with a pooled vector and a nested value, as an SDXL-style encoder gives."""
    gen = torch.Generator().manual_seed(seed + 1000)
    return [[torch.randn(1, tokens, 768, generator=gen),
             {"pooled_output": torch.randn(1, 768, generator=gen), "note": {"kept": [1, 2]}}]]


class FakeClip:
    """What NegationSplitterEncode reads of a CLIP: tokenize and the scheduled encode (no weights)."""

    def __init__(self):
        self.layer_idx = None
        self.tokenizer_options = {"clip_l": {"pad": True}}

    def tokenize(self, text):
        return {"l": [[(len(text), 1.0)]]}

    def encode_from_tokens_scheduled(self, tokens):
        return [[torch.full((1, 77, 768), float(tokens["l"][0][0][0])), {"pooled_output": torch.zeros(1, 768)}]]


class FakeVae:
    def decode(self, lat):
        return torch.full((lat.shape[0], lat.shape[2] * 8, lat.shape[3] * 8, 3), 0.5)


def other_wrapper(executor, *args, **kwargs):
    """Another node's OUTER_SAMPLE wrapper: passes through."""
    return executor(*args, **kwargs)


def other_attn2_patch(n, context, value, extra_options):
    return n, context, value


def other_post_cfg(args):
    return args["denoised"]


@pytest.fixture(scope="module")
def kit(host, tiny_model):
    """The pack's node modules, the host's, the tiny model and two recorded runs for the visualizer."""
    pack = "negative_guidance_pack.nodes"
    k = types.SimpleNamespace(
        g=importlib.import_module(f"{pack}.guidance"),
        r=importlib.import_module(f"{pack}.rules"),
        viz=importlib.import_module(f"{pack}.visualize"),
        nag=importlib.import_module(f"{pack}.nag"),
        toy=importlib.import_module(f"{pack}.toy_model"),
        cd=importlib.import_module(f"{pack}.conditioning"),
        host=importlib.import_module(f"{pack}.validation"),
        rules=importlib.import_module("negative_guidance_pack.samplers.rules"),
        trace_mod=importlib.import_module("negative_guidance_pack.samplers.trace"),
        host_nodes=importlib.import_module("nodes"),
        custom=importlib.import_module("comfy_extras.nodes_custom_sampler"),
        model=tiny_model,
    )
    k.lat, k.trace = sample(k, record_trace=True)
    k.other_lat, _ = sample(k, record_trace=True, seed=1)
    return k


@pytest.fixture()
def temp_dir(host, tmp_path, monkeypatch):
    """Previews (ConditioningDiff's chart, the visualizer's picture) go to a throwaway folder."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))
    return tmp_path


def sample(k, model=None, steps=2, **kw):
    """NegativeGuidanceSampler with good inputs, any of them replaced by ``kw``."""
    args = dict(model=model or k.model, seed=0, steps=steps, cfg=7.0, sampler_name="euler", scheduler="normal",
                positive=cond(1), negative=cond(2), latent_image=latent(), denoise=1.0, negative_start_percent=0.0,
                negative_end_percent=1.0)
    args.update(kw)
    return k.g.NegativeGuidanceSampler.execute(**args).result


def ksample(k, model, positive=None, negative=None, lat=None, cfg=7.0):
    """The host's KSampler on a (patched) model: where a patch's checks run."""
    return k.host_nodes.common_ksampler(model, 0, 2, cfg, "euler", "normal", positive or cond(1),
                                        negative or cond(2), lat or latent())[0]


def toy_sample(k, outputs):
    """Sample the toy model with prompts from its own text encoder."""
    model, clip, _ = outputs
    encode = lambda text: k.host_nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    return k.host_nodes.common_ksampler(model, 0, 2, 4.0, "euler", "normal", encode("a man"), encode("mustache"),
                                        {"samples": torch.zeros(1, 3, 8, 8)})[0]


def chain(k, *conditionings, weight=1.0):
    negs = None
    for c in conditionings:
        negs = k.g.WeightedNegative.execute(c, weight, 0.0, 1.0, negatives=negs).result[0]
    return negs


# Good inputs of every node; a row replaces some of them.
GOOD = {
    "WeightedNegative": lambda k: dict(conditioning=cond(3), weight=1.0, start_percent=0.0, end_percent=1.0),
    "NegativeGuidance": lambda k: dict(model=k.model, negative_start_percent=0.0, negative_end_percent=1.0),
    "NegativeGuider": lambda k: dict(model=k.model, positive=cond(1), negative=cond(2), cfg=7.0,
                                     negative_start_percent=0.0, negative_end_percent=1.0),
    "NegativeGuidanceSampler": lambda k: dict(model=k.model, seed=0, steps=2, cfg=7.0, sampler_name="euler",
                                              scheduler="normal", positive=cond(1), negative=cond(2),
                                              latent_image=latent(), denoise=1.0, negative_start_percent=0.0,
                                              negative_end_percent=1.0),
    "NegativeRulePerpNeg": lambda k: dict(neg_scale=1.0),
    "NegativeRuleAPG": lambda k: dict(eta=0.0, norm_threshold=15.0, momentum=-0.5),
    "NegativeRuleRescale": lambda k: dict(phi=0.7),
    "NegativeRuleCFGZeroStar": lambda k: dict(zero_init_steps=1),
    "NegativeRuleDynamic": lambda k: dict(scale=20.0, prior=0.01, temperature=1.0, offset=0.0, p_min=1e-6, p_max=0.99),
    "NegativeRuleMinSigma": lambda k: dict(min_sigma=1.0, all_steps=False),
    "NegativeRuleInterval": lambda k: dict(sigma_low=0.28, sigma_high=5.42),
    "NegativeRuleCachedNegative": lambda k: dict(every=4, growth=1.06, full_start=2, frequency_split=False,
                                                 cutoff=0.25, high_growth=1.0),
    "GuidanceVisualizer": lambda k: dict(trace=k.trace, latent=k.lat, steps=2),
    "ConditioningDiff": lambda k: dict(a=cond(1), b=cond(2), mode="subtract", scale=1.0),
    "NegationSplitter": lambda k: dict(text="a man without hat", extra_negative=""),
    "NegationSplitterEncode": lambda k: dict(text="a man without hat", clip=FakeClip(), extra_negative=""),
    "NegativeAttentionGuidance": lambda k: dict(model=k.model, negative=cond(7), scale=5.0, tau=2.5, alpha=0.25,
                                                norm="L2", start_percent=0.0, end_percent=1.0),
    "NegativeGuidanceToyModel": lambda k: dict(independent_halves=False),
}


def node_class(k, node):
    for module in (k.g, k.r, k.viz, k.cd, k.nag, k.toy):
        for cls in module.NODES:
            if cls.define_schema().node_id == node:
                return cls
    raise KeyError(node)


def run(node, **changes):
    """A row's call: the node's execute on its good inputs with ``changes`` (callables get the kit)."""
    def call(k):
        args = GOOD[node](k)
        args.update({name: value(k) if callable(value) and not isinstance(value, type) else value
                     for name, value in changes.items()})
        return node_class(k, node).execute(**args)
    return call


def at_sampling(node, sample_with, **changes):
    """A row whose error comes when the patched model is sampled: ``sample_with(k, patched_model)``."""
    def call(k):
        patched = run(node, **changes)(k).result[0]
        return sample_with(k, patched)
    return call


def dit_like(k):
    class DiTLike:
        def clone(self):
            return self

        def get_model_object(self, name):
            return torch.nn.Linear(2, 2)

    return DiTLike()


def wide_extra(width):
    return lambda k: chain(k, cond(3, width=width))


# ---------------------------------------------------------------------------- 1. the table of bad inputs

# (node, input named in the message, what the message says was expected, the call)
BAD = [
    # WeightedNegative
    ("WeightedNegative", "conditioning", "non-empty CONDITIONING list", run("WeightedNegative", conditioning=[])),
    ("WeightedNegative", "conditioning", "non-empty CONDITIONING list, got dict", run("WeightedNegative", conditioning={"a": 1})),
    ("WeightedNegative", "conditioning", "list of [tensor, dict] pairs", run("WeightedNegative", conditioning=[torch.zeros(1, 77, 768)])),
    ("WeightedNegative", "conditioning", "[batch, tokens, width], got NoneType", run("WeightedNegative", conditioning=[[None, {}]])),
    ("WeightedNegative", "conditioning", "[batch, tokens, width], got [77, 768]", run("WeightedNegative", conditioning=[[torch.zeros(77, 768), {}]])),
    ("WeightedNegative", "conditioning", "at least one batch row, token and feature", run("WeightedNegative", conditioning=[[torch.zeros(1, 0, 768), {}]])),
    ("WeightedNegative", "conditioning", "different embedding widths", run("WeightedNegative", conditioning=lambda k: cond(1) + cond(2, width=1024))),
    ("WeightedNegative", "conditioning", "contains NaN", run("WeightedNegative", conditioning=lambda k: nan_cond())),
    ("WeightedNegative", "conditioning", "contains NaN or infinite", run("WeightedNegative", conditioning=lambda k: nan_cond(where="pooled", value=INF))),
    ("WeightedNegative", "conditioning", "tensor as 'pooled_output'", run("WeightedNegative", conditioning=lambda k: [[cond(1)[0][0], {"pooled_output": [0.0]}]])),
    ("WeightedNegative", "weight", "finite number, got True", run("WeightedNegative", weight=True)),
    ("WeightedNegative", "start_percent", "not be after end_percent", run("WeightedNegative", start_percent=0.7, end_percent=0.2)),
    ("WeightedNegative", "start_percent", "in [0, 1]", run("WeightedNegative", start_percent=-0.1)),
    ("WeightedNegative", "negatives", "chain made by the Weighted Negative node, got str", run("WeightedNegative", negatives="oops")),
    ("WeightedNegative", "negatives", "chain made by the Weighted Negative node, got int", run("WeightedNegative", negatives=(1, 2))),
    # NegativeGuidance (model patch): its own inputs at execute, the sampler's prompts when sampling starts
    ("NegativeGuidance", "model", "must be a MODEL", run("NegativeGuidance", model=None)),
    ("NegativeGuidance", "model", "already has negative guidance", run("NegativeGuidance", negatives=wide_extra(768), model=lambda k: run("NegativeGuidance", negatives=wide_extra(768))(k).result[0])),
    ("NegativeGuidance", "negative_start_percent", "not be after negative_end_percent", run("NegativeGuidance", negative_start_percent=0.8, negative_end_percent=0.2)),
    ("NegativeGuidance", "negatives", "chain made by the Weighted Negative node", run("NegativeGuidance", negatives="oops")),
    ("NegativeGuidance", "negatives", "chain made by the Weighted Negative node", run("NegativeGuidance", negatives={"weight": 1.0})),
    ("NegativeGuidance", "unconditional", "non-empty CONDITIONING list", run("NegativeGuidance", unconditional=[])),
    ("NegativeGuidance", "unconditional", "contains NaN", run("NegativeGuidance", unconditional=lambda k: nan_cond())),
    ("NegativeGuidance", "rule", "one of this pack's rule nodes", run("NegativeGuidance", rule="APG")),
    ("NegativeGuidance", "unconditional", "required by the Perp-Neg rule", run("NegativeGuidance", rule=lambda k: k.rules.PerpNeg())),
    ("NegativeGuidance", "negatives[0]", "this model's context width (768, SD15)", run("NegativeGuidance", negatives=wide_extra(2048))),
    ("NegativeGuidance", "unconditional", "this model's context width (768, SD15)", run("NegativeGuidance", negatives=wide_extra(768), unconditional=lambda k: cond(4, width=1024))),
    ("NegativeGuidance", "positive", "this model's context width (768, SD15)", at_sampling("NegativeGuidance", lambda k, m: ksample(k, m, positive=cond(1, width=1024), negative=cond(2, width=1024)), negatives=wide_extra(768))),
    ("NegativeGuidance", "negative", "this model's context width (768, SD15)", at_sampling("NegativeGuidance", lambda k, m: ksample(k, m, negative=cond(2, width=1024)), negatives=wide_extra(768))),
    ("NegativeGuidance", "positive", "contains NaN", at_sampling("NegativeGuidance", lambda k, m: ksample(k, m, positive=nan_cond()), negatives=wide_extra(768))),
    ("NegativeGuidance", "negative", "contains NaN or infinite", at_sampling("NegativeGuidance", lambda k, m: ksample(k, m, negative=nan_cond(where="pooled", value=-INF)), negatives=wide_extra(768))),
    # NegativeGuider
    ("NegativeGuider", "model", "must be a MODEL", run("NegativeGuider", model="model.safetensors")),
    ("NegativeGuider", "positive", "non-empty CONDITIONING list, got dict", run("NegativeGuider", positive={})),
    ("NegativeGuider", "positive", "[batch, tokens, width]", run("NegativeGuider", positive=[[None, {}]])),
    ("NegativeGuider", "positive", "contains NaN", run("NegativeGuider", positive=lambda k: nan_cond())),
    ("NegativeGuider", "negative", "contains NaN", run("NegativeGuider", negative=lambda k: nan_cond(where="pooled"))),
    ("NegativeGuider", "negative", "embedding width of 'positive' (768)", run("NegativeGuider", negative=lambda k: cond(2, width=2048))),
    ("NegativeGuider", "negatives[0]", "embedding width of 'positive' (768)", run("NegativeGuider", negatives=wide_extra(2048))),
    ("NegativeGuider", "positive", "this model's context width (768, SD15)", run("NegativeGuider", positive=lambda k: cond(1, width=2048), negative=lambda k: cond(2, width=2048))),
    ("NegativeGuider", "unconditional", "embedding width of 'positive' (768)", run("NegativeGuider", unconditional=lambda k: cond(4, width=1280))),
    ("NegativeGuider", "negative_start_percent", "not be after negative_end_percent", run("NegativeGuider", negative_start_percent=0.9, negative_end_percent=0.1)),
    ("NegativeGuider", "rule", "one of this pack's rule nodes", run("NegativeGuider", rule=lambda k: object())),
    ("NegativeGuider", "unconditional", "required by the Dynamic negative guidance rule", run("NegativeGuider", rule=lambda k: k.rules.DynamicNegative())),
    # NegativeGuidanceSampler
    ("NegativeGuidanceSampler", "model", "must be a MODEL", run("NegativeGuidanceSampler", model=None)),
    ("NegativeGuidanceSampler", "steps", "whole number of at least 1", run("NegativeGuidanceSampler", steps=0)),
    ("NegativeGuidanceSampler", "steps", "whole number of at least 1", run("NegativeGuidanceSampler", steps=2.5)),
    ("NegativeGuidanceSampler", "sampler_name", "one of the host's names", run("NegativeGuidanceSampler", sampler_name="euler_typo")),
    ("NegativeGuidanceSampler", "scheduler", "one of the host's names", run("NegativeGuidanceSampler", scheduler="linear")),
    ("NegativeGuidanceSampler", "denoise", "in [0, 1]", run("NegativeGuidanceSampler", denoise=1.5)),
    ("NegativeGuidanceSampler", "positive", "non-empty CONDITIONING list", run("NegativeGuidanceSampler", positive=[])),
    ("NegativeGuidanceSampler", "positive", "contains NaN", run("NegativeGuidanceSampler", positive=lambda k: nan_cond())),
    ("NegativeGuidanceSampler", "negative", "contains NaN", run("NegativeGuidanceSampler", negative=lambda k: nan_cond())),
    ("NegativeGuidanceSampler", "negative", "list of [tensor, dict] pairs", run("NegativeGuidanceSampler", negative=lambda k: [cond(2)[0][0]])),
    ("NegativeGuidanceSampler", "negative", "embedding width of 'positive' (768)", run("NegativeGuidanceSampler", negative=lambda k: cond(2, width=2048))),
    ("NegativeGuidanceSampler", "negatives[0]", "embedding width of 'positive' (768)", run("NegativeGuidanceSampler", negatives=wide_extra(2048))),
    ("NegativeGuidanceSampler", "positive", "this model's context width (768, SD15)", run("NegativeGuidanceSampler", positive=lambda k: cond(1, width=2048), negative=lambda k: cond(2, width=2048))),
    ("NegativeGuidanceSampler", "unconditional", "embedding width of 'positive' (768)", run("NegativeGuidanceSampler", unconditional=lambda k: cond(3, width=1280))),
    ("NegativeGuidanceSampler", "unconditional", "contains NaN", run("NegativeGuidanceSampler", negatives=wide_extra(768), unconditional=lambda k: nan_cond(where="pooled"))),
    ("NegativeGuidanceSampler", "latent_image", "has 16 channels but this model's latents have 4", run("NegativeGuidanceSampler", latent_image=lambda k: {"samples": torch.randn(1, 16, 8, 8)})),
    ("NegativeGuidanceSampler", "latent_image", "contains NaN", run("NegativeGuidanceSampler", latent_image=lambda k: {"samples": torch.full((1, 4, 8, 8), NAN)})),
    ("NegativeGuidanceSampler", "latent_image", "must be a LATENT", run("NegativeGuidanceSampler", latent_image=lambda k: [torch.zeros(1, 4, 8, 8)])),
    ("NegativeGuidanceSampler", "latent_image", "must be a LATENT", run("NegativeGuidanceSampler", latent_image=lambda k: {"samples": None})),
    ("NegativeGuidanceSampler", "negative_start_percent", "not be after negative_end_percent", run("NegativeGuidanceSampler", negative_start_percent=0.9, negative_end_percent=0.1)),
    ("NegativeGuidanceSampler", "unconditional", "required by the Perp-Neg rule", run("NegativeGuidanceSampler", rule=lambda k: k.rules.PerpNeg())),
    # rule nodes (their float inputs' NaN and inf are in FLOATS below)
    ("NegativeRuleAPG", "momentum", "in [-1.0, 1.0]", run("NegativeRuleAPG", momentum=3.0)),
    ("NegativeRuleCFGZeroStar", "zero_init_steps", "whole number in [0, 1000]", run("NegativeRuleCFGZeroStar", zero_init_steps=NAN)),
    ("NegativeRuleCFGZeroStar", "zero_init_steps", "whole number in [0, 1000]", run("NegativeRuleCFGZeroStar", zero_init_steps=-2)),
    ("NegativeRuleDynamic", "prior", "in [1e-06, 0.99]", run("NegativeRuleDynamic", prior=0.995)),
    ("NegativeRuleDynamic", "p_min", "must not exceed p_max (0.2)", run("NegativeRuleDynamic", p_min=0.5, p_max=0.2)),
    ("NegativeRuleInterval", "sigma_low", "must be below sigma_high (1.0)", run("NegativeRuleInterval", sigma_low=5.0, sigma_high=1.0)),
    ("NegativeRuleInterval", "rule", "one of this pack's rule nodes", run("NegativeRuleInterval", rule="APG")),
    ("NegativeRuleCachedNegative", "every", "whole number in [1, 1000]", run("NegativeRuleCachedNegative", every=0)),
    ("NegativeRuleCachedNegative", "full_start", "whole number in [0, 1000]", run("NegativeRuleCachedNegative", full_start=-1)),
    ("NegativeRuleCachedNegative", "growth", "in [0.0, 10.0]", run("NegativeRuleCachedNegative", growth=11.0)),
    ("NegativeRuleCachedNegative", "cutoff", "in [0.0, 1.0]", run("NegativeRuleCachedNegative", cutoff=2.0)),
    ("NegativeRuleCachedNegative", "cache_start_percent", "in [0.0, 1.0]",
     run("NegativeRuleCachedNegative", cache_start_percent=1.5)),
    ("NegativeRuleCachedNegative", "sigma_power", "in [0.0, 2.0]", run("NegativeRuleCachedNegative", sigma_power=3.0)),
    ("NegativeRuleCachedNegative", "max_log_sigma_drop", "in [0.0, 100.0]",
     run("NegativeRuleCachedNegative", max_log_sigma_drop=-0.3)),
    ("NegativeRuleCachedNegative", "rule", "must not be another cached negative",
     run("NegativeRuleCachedNegative", rule=lambda k: k.rules.CachedNegative())),
    ("NegativeRuleMinSigma", "rule", "must not be a cached negative", run("NegativeRuleMinSigma", rule=lambda k: k.rules.CachedNegative())),
    ("NegativeRuleMinSigma", "rule", "one of this pack's rule nodes", run("NegativeRuleMinSigma", rule=lambda k: {"eta": 0.0})),
    # GuidanceVisualizer
    ("GuidanceVisualizer", "trace", "is empty: turn on 'record_trace'", run("GuidanceVisualizer", trace=None)),
    ("GuidanceVisualizer", "trace", "must come from NegativeGuidanceSampler or NegativeGuider", run("GuidanceVisualizer", trace=lambda k: {"steps": []})),
    ("GuidanceVisualizer", "trace", "holds no recorded step", run("GuidanceVisualizer", trace=lambda k: k.trace_mod.Trace())),
    ("GuidanceVisualizer", "trace", "holds no recorded step", run("GuidanceVisualizer", trace=lambda k: k.g.NegativeGuider.execute(k.model, cond(1), cond(2), 7.0, 0.0, 1.0, record_trace=True).result[1])),
    ("GuidanceVisualizer", "latent", "does not come from the run this trace recorded", run("GuidanceVisualizer", latent=lambda k: k.other_lat)),
    ("GuidanceVisualizer", "latent", "shape of the latent the trace's run produced [1, 4, 8, 8]", run("GuidanceVisualizer", latent=lambda k: {"samples": torch.zeros(1, 16, 8, 8)})),
    ("GuidanceVisualizer", "latent", "contains NaN", run("GuidanceVisualizer", latent=lambda k: {"samples": torch.full((1, 4, 8, 8), NAN)})),
    ("GuidanceVisualizer", "latent", "LATENT output of the sampler", run("GuidanceVisualizer", latent=None)),
    ("GuidanceVisualizer", "steps", "whole number of at least 1", run("GuidanceVisualizer", steps=0)),
    ("GuidanceVisualizer", "steps", "whole number of at least 1", run("GuidanceVisualizer", steps=NAN)),
    ("GuidanceVisualizer", "vae", "must be a VAE", run("GuidanceVisualizer", vae=lambda k: object())),
    # ConditioningDiff
    ("ConditioningDiff", "b", "width of 'a' (768)", run("ConditioningDiff", b=lambda k: cond(2, width=2048))),
    ("ConditioningDiff", "b", "385 tokens where 'a' has 77", run("ConditioningDiff", b=lambda k: cond(2, tokens=385))),
    ("ConditioningDiff", "b", "100 tokens where 'a' has 77", run("ConditioningDiff", b=lambda k: cond(2, tokens=100))),
    ("ConditioningDiff", "b", "batch size of 'a' (2) or 1", run("ConditioningDiff", a=lambda k: cond(1, batch=2), b=lambda k: cond(2, batch=3))),
    ("ConditioningDiff", "b", "as many as 'a' (3)", run("ConditioningDiff", a=lambda k: cond(1) + cond(2) + cond(3), b=lambda k: cond(4) + cond(5))),
    ("ConditioningDiff", "b", "pooled_output of the shape of a's [1, 1280]", run(
        "ConditioningDiff", a=lambda k: [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 1280)}]],
        b=lambda k: [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]])),
    ("ConditioningDiff", "mode", "subtract, project_out", run("ConditioningDiff", mode="divide")),
    ("ConditioningDiff", "a", "non-empty CONDITIONING list", run("ConditioningDiff", a=[])),
    ("ConditioningDiff", "a", "non-empty CONDITIONING list, got dict", run("ConditioningDiff", a={})),
    ("ConditioningDiff", "a", "[batch, tokens, width]", run("ConditioningDiff", a=[[torch.zeros(77, 768), {}]], b=[[torch.zeros(77, 768), {}]])),
    ("ConditioningDiff", "a", "at least one batch row, token and feature", run("ConditioningDiff", a=[[torch.zeros(1, 0, 768), {}]])),
    ("ConditioningDiff", "b", "[batch, tokens, width], got NoneType", run("ConditioningDiff", b=[[None, {}]])),
    ("ConditioningDiff", "a", "contains NaN", run("ConditioningDiff", a=lambda k: nan_cond())),
    ("ConditioningDiff", "b", "contains NaN", run("ConditioningDiff", b=lambda k: nan_cond(where="pooled"))),
    # NegationSplitter and NegationSplitterEncode
    ("NegationSplitter", "text", "must be a string", run("NegationSplitter", text=None)),
    ("NegationSplitter", "text", "must be a string, got list", run("NegationSplitter", text=["a man"])),
    ("NegationSplitter", "extra_negative", "must be a string", run("NegationSplitter", extra_negative=3)),
    ("NegationSplitterEncode", "clip", "must be a CLIP model", run("NegationSplitterEncode", clip=None)),
    ("NegationSplitterEncode", "clip", "must be a CLIP model", run("NegationSplitterEncode", clip=lambda k: object())),
    ("NegationSplitterEncode", "text", "must be a string", run("NegationSplitterEncode", text=None)),
    ("NegationSplitterEncode", "extra_negative", "must be a string", run("NegationSplitterEncode", extra_negative=b"blurry")),
    # NegativeAttentionGuidance
    ("NegativeGuidanceToyModel", "independent_halves", "must be true or false", run("NegativeGuidanceToyModel", independent_halves="yes")),
    ("NegativeAttentionGuidance", "model", "must be a MODEL", run("NegativeAttentionGuidance", model=None)),
    ("NegativeAttentionGuidance", "model", "a family NAG does not reach", run("NegativeAttentionGuidance", model=dit_like)),
    ("NegativeAttentionGuidance", "negative", "context width (768, SD15)", run("NegativeAttentionGuidance", negative=lambda k: cond(7, width=2048))),
    ("NegativeAttentionGuidance", "negative", "single-entry conditioning", run("NegativeAttentionGuidance", negative=lambda k: cond(7) + cond(8))),
    ("NegativeAttentionGuidance", "negative", "non-empty CONDITIONING list, got dict", run("NegativeAttentionGuidance", negative={})),
    ("NegativeAttentionGuidance", "negative", "[batch, tokens, width]", run("NegativeAttentionGuidance", negative=[[None, {}]])),
    ("NegativeAttentionGuidance", "negative", "contains NaN", run("NegativeAttentionGuidance", negative=lambda k: nan_cond())),
    ("NegativeAttentionGuidance", "scale", "in [1.0, 100.0]", run("NegativeAttentionGuidance", scale=0.5)),
    ("NegativeAttentionGuidance", "alpha", "in [0.0, 1.0]", run("NegativeAttentionGuidance", alpha=2.0)),
    ("NegativeAttentionGuidance", "norm", "one of ['L1', 'L2']", run("NegativeAttentionGuidance", norm="L3")),
    ("NegativeAttentionGuidance", "start_percent", "not be after end_percent", run("NegativeAttentionGuidance", start_percent=0.8, end_percent=0.2)),
]

# Every float input of every node (test_every_float_input_is_listed keeps this in step with the schemas).
FLOATS = {
    "WeightedNegative": ["weight", "start_percent", "end_percent"],
    "NegativeGuidance": ["negative_start_percent", "negative_end_percent"],
    "NegativeGuider": ["cfg", "negative_start_percent", "negative_end_percent"],
    "NegativeGuidanceSampler": ["cfg", "denoise", "negative_start_percent", "negative_end_percent"],
    "NegativeRulePerpNeg": ["neg_scale"],
    "NegativeRuleAPG": ["eta", "norm_threshold", "momentum"],
    "NegativeRuleRescale": ["phi"],
    "NegativeRuleCFGZeroStar": [],
    "NegativeRuleDynamic": ["scale", "prior", "temperature", "offset", "p_min", "p_max"],
    "NegativeRuleMinSigma": ["min_sigma"],
    "NegativeRuleInterval": ["sigma_low", "sigma_high"],
    "NegativeRuleCachedNegative": ["growth", "cutoff", "high_growth", "cache_start_percent", "sigma_power",
                                   "max_log_sigma_drop"],
    "GuidanceVisualizer": [],
    "ConditioningDiff": ["scale"],
    "NegationSplitter": [],
    "NegationSplitterEncode": [],
    "NegativeAttentionGuidance": ["scale", "tau", "alpha", "start_percent", "end_percent"],
    "NegativeGuidanceToyModel": [],
}
NON_FINITE = [(node, name, value) for node, names in FLOATS.items() for name in names for value in (NAN, INF, -INF)]


@pytest.fixture()
def no_work(kit, monkeypatch):
    """Make the work after validation fail loudly: a row must stop before it."""
    def must_not_run(*args, **kwargs):
        raise AssertionError("the node started its work before naming the bad input")

    monkeypatch.setattr(kit.cd.condiff, "diff_conditionings", must_not_run)
    monkeypatch.setattr(kit.viz.drawing, "render", must_not_run)
    monkeypatch.setattr(FakeClip, "encode_from_tokens_scheduled", must_not_run)


def assert_named(k, call, node, name, expected):
    with count_forwards(k.model) as rows, pytest.raises(k.host.InputError) as err:
        call(k)
    message = str(err.value)
    assert message.startswith(f"{node}: input '{name}' "), message
    assert expected in message, f"{expected!r} missing from: {message}"
    assert rows == [], f"{rows} forwards ran before: {message}"


@pytest.mark.parametrize("node,name,expected,call", BAD, ids=[f"{n}-{i}-{x}" for i, (n, x, _, _) in enumerate(BAD)])
def test_bad_input_is_named_before_any_work(kit, no_work, node, name, expected, call):
    assert_named(kit, call, node, name, expected)


@pytest.mark.parametrize("node,name,value", NON_FINITE, ids=[f"{n}-{x}-{v}" for n, x, v in NON_FINITE])
def test_every_float_input_refuses_nan_and_inf(kit, no_work, node, name, value):
    assert_named(kit, run(node, **{name: value}), node, name, "must be a finite number")


def test_every_node_and_float_input_is_in_the_table(kit):
    """All eighteen nodes the pack registers have rows, and FLOATS lists exactly their FLOAT inputs."""
    pack = importlib.import_module("negative_guidance_pack")
    import asyncio

    nodes = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
    schemas = {n.define_schema().node_id: n.define_schema() for n in nodes}
    assert len(schemas) == 18
    assert set(schemas) == set(FLOATS) == set(GOOD)
    assert {row[0] for row in BAD} | {n for n, _, _ in NON_FINITE} == set(schemas)
    for node, schema in schemas.items():
        floats = [i.id for i in schema.inputs if i.get_io_type() == "FLOAT"]
        assert floats == FLOATS[node], node


@pytest.mark.parametrize("node", sorted(GOOD))
def test_the_good_inputs_of_the_table_run(kit, temp_dir, node):
    """Every row is one bad value in otherwise good inputs: the good inputs alone pass."""
    run(node)(kit)


def test_token_lengths_the_host_cannot_batch_run_as_separate_forwards(kit):
    """77 and 100 tokens: the host's can_concat refuses (a repeat factor of 100), runs the prompts apart."""
    negs = chain(kit, cond(3, tokens=100))
    with count_forwards(kit.model) as rows:
        out = sample(kit, negatives=negs, negative=cond(2, tokens=100))[0]["samples"]
    assert torch.isfinite(out).all()
    assert sorted(rows) == [1, 1, 2, 2]  # each step: the positive alone, the negative and the extra (100 each) together


# ---------------------------------------------------------------------------- 2. no mutation


def snapshot(x):
    """Containers copied, tensors cloned, dataclasses field by field; anything else kept by reference."""
    if isinstance(x, torch.Tensor):
        return ("tensor", x.detach().clone())
    if isinstance(x, dict):
        return ("dict", type(x), {key: snapshot(value) for key, value in x.items()})
    if isinstance(x, (list, tuple)):
        return ("seq", type(x), [snapshot(value) for value in x])
    if isinstance(x, (set, frozenset)):
        return ("set", set(x))
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return ("dataclass", x, {f.name: snapshot(getattr(x, f.name)) for f in dataclasses.fields(x)})
    return ("leaf", x)


def assert_unchanged(x, snap, path="input"):
    kind = snap[0]
    if kind == "tensor":
        assert isinstance(x, torch.Tensor) and x.shape == snap[1].shape and x.dtype == snap[1].dtype, path
        assert torch.equal(x, snap[1]), f"{path}: tensor changed in place"
    elif kind == "dict":
        assert type(x) is snap[1] and list(x) == list(snap[2]), f"{path}: keys changed"
        for key, value in x.items():
            assert_unchanged(value, snap[2][key], f"{path}[{key!r}]")
    elif kind == "seq":
        assert type(x) is snap[1] and len(x) == len(snap[2]), f"{path}: length changed"
        for i, value in enumerate(x):
            assert_unchanged(value, snap[2][i], f"{path}[{i}]")
    elif kind == "set":
        assert x == snap[1], path
    elif kind == "dataclass":
        assert x is snap[1], f"{path}: replaced"
        for name, value in snap[2].items():
            assert_unchanged(getattr(x, name), value, f"{path}.{name}")
    else:
        assert x is snap[1] or x == snap[1], f"{path}: replaced"


PATCHER_STATE = ("model_options", "wrappers", "callbacks", "patches", "object_patches", "weight_wrapper_patches",
                 "attachments", "additional_models", "injections", "hook_patches")


def patcher_state(model) -> dict:
    state = {name: getattr(model, name) for name in PATCHER_STATE if hasattr(model, name)}
    state["model"], state["parent"] = model.model, model.parent
    return state


@pytest.fixture()
def busy_model(host, tiny_model):
    """A clone carrying other nodes' patches: a post-cfg hook, an attn2 patch, a wrapper, transformer options."""
    import comfy.patcher_extension

    m = tiny_model.clone()
    m.set_model_sampler_post_cfg_function(other_post_cfg)
    m.set_model_attn2_patch(other_attn2_patch)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "another_node", other_wrapper)
    m.model_options["transformer_options"]["another_node"] = {"flags": [1, 2], "scale": torch.ones(2)}
    return m


def guider_sample(k, guider):
    sigmas = k.custom.BasicScheduler().get_sigmas(guider.model_patcher, "normal", 2, 1.0)[0]
    return k.custom.SamplerCustomAdvanced().sample(k.custom.Noise_RandomNoise(0), guider,
                                                   k.custom.comfy.samplers.sampler_object("euler"), sigmas, latent())


def mutation_case(k, node, model):
    """Rich inputs for ``node`` and what to do with its result (sample with a returned model or guider)."""
    pos, neg, empty, diff_b = rich_cond(1), rich_cond(2), rich_cond(3), rich_cond(6, tokens=154)
    negs = chain(k, rich_cond(4), rich_cond(5, tokens=154), weight=1.5)
    lat = {"samples": torch.randn(1, 4, 8, 8) * 0.1, "batch_index": [0], "noise_mask": torch.ones(1, 1, 8, 8)}
    rules = k.rules
    guided = dict(negatives=negs, unconditional=empty, negative_start_percent=0.2, negative_end_percent=0.9)
    cases = {
        "WeightedNegative": (dict(conditioning=pos, weight=2.0, start_percent=0.1, end_percent=0.8, negatives=negs), None),
        "NegativeGuidance": (dict(model=model, rule=rules.APG(), **guided),
                             lambda out: ksample(k, out[0], pos, neg, lat)),
        "NegativeGuider": (dict(model=model, positive=pos, negative=neg, cfg=5.0, rule=rules.PerpNeg(neg_scale=0.5),
                                record_trace=True, **guided), lambda out: guider_sample(k, out[0])),
        "NegativeGuidanceSampler": (dict(model=model, seed=3, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal",
                                         positive=pos, negative=neg, latent_image=lat, denoise=0.9,
                                         rule=rules.MinSigma(min_sigma=5.0, inner=rules.DynamicNegative()),
                                         record_trace=True, **guided), None),
        "NegativeRulePerpNeg": (dict(neg_scale=0.5), None),
        "NegativeRuleAPG": (dict(eta=0.1, norm_threshold=5.0, momentum=-0.3), None),
        "NegativeRuleRescale": (dict(phi=0.5), None),
        "NegativeRuleCFGZeroStar": (dict(zero_init_steps=2), None),
        "NegativeRuleDynamic": (dict(scale=10.0, prior=0.05, temperature=0.5, offset=0.1, p_min=1e-4, p_max=0.9), None),
        "NegativeRuleMinSigma": (dict(min_sigma=2.0, all_steps=True, rule=rules.APG()), None),
        "NegativeRuleInterval": (dict(sigma_low=0.5, sigma_high=4.0, rule=rules.PerpNeg()), None),
        "NegativeRuleCachedNegative": (dict(every=3, growth=1.1, full_start=1, frequency_split=True, cutoff=0.3,
                                            high_growth=1.05, rule=rules.APG(), bounded=False,
                                            cache_start_percent=0.2, sigma_power=0.5, max_log_sigma_drop=1.0),
                                       None),
        "GuidanceVisualizer": (dict(trace=k.trace, latent=k.lat, steps=2, vae=FakeVae()), None),
        "ConditioningDiff": (dict(a=pos + neg, b=diff_b, mode="project_out", scale=2.0),
                             lambda out: k.cd.ConditioningDiff.execute(pos + neg, diff_b, "subtract", -1.5)),
        "NegationSplitter": (dict(text="a man without (mustache:1.2), no hat", extra_negative="blurry"), None),
        "NegativeGuidanceToyModel": (dict(independent_halves=True), lambda out: toy_sample(k, out)),
        "NegationSplitterEncode": (dict(text="a man without hat", clip=FakeClip(), extra_negative="blurry"), None),
        "NegativeAttentionGuidance": (dict(model=model, negative=rich_cond(7, tokens=154), scale=4.0, tau=2.5, alpha=0.5,
                                           norm="L1", start_percent=0.1, end_percent=0.9),
                                      lambda out: ksample(k, out[0], pos, neg, lat, cfg=1.0)),
    }
    return cases[node]


def _watch(inputs: dict) -> dict:
    """What to compare for each input: the patcher's state for a MODEL, the CLIP's attributes, else the value."""
    watched = {}
    for name, value in inputs.items():
        if name == "model":
            watched[name] = patcher_state(value)
        elif isinstance(value, FakeClip):
            watched[name] = dict(vars(value))
        else:
            watched[name] = value
    return watched


@pytest.mark.parametrize("node", sorted(GOOD))
def test_nodes_never_mutate_their_inputs(kit, busy_model, temp_dir, node):
    inputs, then = mutation_case(kit, node, busy_model)
    watched = _watch(inputs)
    before = snapshot(watched)
    out = node_class(kit, node).execute(**inputs).result
    if then is not None:
        then(out)
    assert_unchanged(_watch(inputs), before, node)
    if node in ("NegativeGuidance", "NegativeAttentionGuidance"):
        assert out[0] is not busy_model, "the patch went onto the input model instead of a clone"
