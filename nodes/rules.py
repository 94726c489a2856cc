"""Rule nodes: each outputs a combine rule (socket type ``NG_RULE``) for the three entry points.

With no rule connected the entry points use plain CFG. The skipping rules (minimum sigma,
guidance interval) take an optional inner rule, so e.g. APG can run inside a guidance interval.
"""
from __future__ import annotations

import math

from comfy_api.latest import io

from ..samplers import rules
from .guidance import CATEGORY, Rule
from .validation import check_number, check_rule, inputs_of

RULE_CATEGORY = f"{CATEGORY}/rules"
NO_LIMIT = 100.0  # the cached negative's max_log_sigma_drop that lifts its limit


def build_rule(node: str, cls, renamed: dict | None = None, **params):
    """Construct a rule; a parameter it refuses is named as the node's input (its ``inner`` rule is 'rule', and
    ``renamed`` maps other parameters to their inputs)."""
    check_rule(node, params.get("inner"))
    with inputs_of(node, {"inner": "rule", **(renamed or {})}):
        return cls(**params)


def _rule_output():
    return [Rule.Output(display_name="rule", tooltip="Connect to the 'rule' input of a Negative Guidance node.")]


def _schema(node_id, display_name, description, inputs):
    return io.Schema(node_id=node_id, display_name=display_name, category=RULE_CATEGORY,
                     description=description, inputs=inputs, outputs=_rule_output())


def _inner_input():
    return Rule.Input("rule", optional=True,
                      tooltip="The combine rule used on the steps that keep guidance (plain CFG if empty).")


class NegativeRulePerpNeg(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "NegativeRulePerpNeg", "Rule: Perp-Neg",
            "Perp-Neg (Armandpour et al. 2023): negatives only push perpendicular to the positive direction, "
            "per sample, so a negative that overlaps the positive does not erase it. Needs the 'unconditional' "
            "input of the guidance node (an empty prompt).",
            [io.Float.Input("neg_scale", default=1.0, min=0.0, max=100.0, step=0.01,
                            tooltip="Weight of the main negative, as a multiple of cfg (0..100; 1 = as ComfyUI's "
                            "PerpNegGuider).")],
        )

    @classmethod
    def execute(cls, neg_scale) -> io.NodeOutput:
        return io.NodeOutput(build_rule("NegativeRulePerpNeg", rules.PerpNeg, neg_scale=neg_scale))


class NegativeRuleAPG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "NegativeRuleAPG", "Rule: APG",
            "Adaptive Projected Guidance (Sadat et al. 2024): drops most of the guidance parallel to the "
            "prediction, caps its norm and adds negative momentum, allowing high cfg without oversaturation.",
            [
                io.Float.Input("eta", default=0.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Weight of the parallel part (-10..10). 0 = the paper's choice; 1 with "
                               "norm_threshold 0 and momentum 0 is plain CFG."),
                io.Float.Input("norm_threshold", default=15.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="Cap r on the per-sample norm of the guidance (0..1000; 0 = no cap)."),
                io.Float.Input("momentum", default=-0.5, min=-1.0, max=1.0, step=0.01,
                               tooltip="Momentum beta over the run (-1..1); the paper uses -0.5; 0 = off."),
            ],
        )

    @classmethod
    def execute(cls, eta, norm_threshold, momentum) -> io.NodeOutput:
        return io.NodeOutput(build_rule("NegativeRuleAPG", rules.APG, eta=eta, norm_threshold=norm_threshold,
                                        momentum=momentum))


class NegativeRuleRescale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "NegativeRuleRescale", "Rule: CFG rescale",
            "CFG rescale (Lin et al. 2023): brings the guided prediction's per-sample std back to the "
            "positive's, in v-prediction space, against overexposure at high cfg.",
            [io.Float.Input("phi", default=0.7, min=0.0, max=1.0, step=0.01,
                            tooltip="Share of the rescaled result (0..1); 0.7 as the paper recommends; 0 = CFG.")],
        )

    @classmethod
    def execute(cls, phi) -> io.NodeOutput:
        return io.NodeOutput(build_rule("NegativeRuleRescale", rules.Rescale, phi=phi))


class NegativeRuleCFGZeroStar(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "NegativeRuleCFGZeroStar", "Rule: CFG-Zero*",
            "CFG-Zero* (Fan et al. 2025): scales the negative by its optimal projection on the positive, per "
            "sample, and leaves the first steps unguided and unmoved (zero-init). Made for flow models; on eps "
            "models it acts on the predicted noise.",
            [io.Int.Input("zero_init_steps", default=1, min=0, max=1000,
                          tooltip="Steps at the start of the schedule whose velocity is zeroed (0..1000; the "
                          "authors' default zeroes the first step; 0 = off).")],
        )

    @classmethod
    def execute(cls, zero_init_steps) -> io.NodeOutput:
        return io.NodeOutput(build_rule("NegativeRuleCFGZeroStar", rules.CFGZeroStar, zero_init_steps=zero_init_steps))


class NegativeRuleDynamic(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "NegativeRuleDynamic", "Rule: Dynamic negative guidance",
            "Dynamic negative guidance (Koulischer et al. 2025): the negative acts only as much as the sample "
            "seems to show it, by a running per-sample posterior. Needs the 'unconditional' input (empty prompt).",
            [
                io.Float.Input("scale", default=20.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="Multiplier on the posterior odds p/(1-p) (0..1000); the paper's Stable "
                               "Diffusion runs use 12..27."),
                io.Float.Input("prior", default=0.01, min=0.0, max=0.999999, step=0.001,
                               tooltip="Share of images that would show the negative concept without it (within "
                               "p_min..p_max): the starting posterior. Needs an ancestral or SDE sampler, whose "
                               "noise is the evidence."),
                io.Float.Input("temperature", default=1.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the evidence per step (0..100); 1 = Bayes' rule."),
                io.Float.Input("offset", default=0.0, min=-1000.0, max=1000.0, step=0.0001,
                               tooltip="Constant added to the log-evidence before dividing by the step variance "
                               "(-1000..1000); 0 = none."),
                io.Float.Input("p_min", default=1e-6, min=0.0, max=1.0, step=1e-6,
                               tooltip="Lowest posterior (0..1)."),
                io.Float.Input("p_max", default=0.99, min=0.0, max=0.999999, step=0.01,
                               tooltip="Highest posterior (below 1); it bounds the weight at scale*p_max/(1-p_max)."),
            ],
        )

    @classmethod
    def execute(cls, scale, prior, temperature, offset, p_min, p_max) -> io.NodeOutput:
        return io.NodeOutput(build_rule("NegativeRuleDynamic", rules.DynamicNegative, scale=scale, prior=prior,
                                        temperature=temperature, offset=offset, p_min=p_min, p_max=p_max))


class NegativeRuleMinSigma(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "NegativeRuleMinSigma", "Rule: Negative guidance minimum sigma",
            "AUTOMATIC1111's speed option: below a sigma, skip the negative branches on every other model "
            "evaluation (or all of them); a skipped evaluation costs one branch and follows the positive alone.",
            [
                io.Float.Input("min_sigma", default=1.0, min=0.0, max=10000.0, step=0.01,
                               tooltip="Skip below this sigma (0..10000; 0 = never), in the model's units: SD1.5 and "
                               "SDXL sigmas run from about 14.6 down to 0.03, flow models' (SD3, Flux, Wan) from 1 "
                               "down to 0."),
                io.Boolean.Input("all_steps", default=False,
                                 tooltip="Skip on every evaluation below min_sigma, not every other one."),
                _inner_input(),
            ],
        )

    @classmethod
    def execute(cls, min_sigma, all_steps, rule=None) -> io.NodeOutput:
        return io.NodeOutput(build_rule("NegativeRuleMinSigma", rules.MinSigma, min_sigma=min_sigma,
                                        all_steps=bool(all_steps), inner=rule))


class NegativeRuleInterval(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "NegativeRuleInterval", "Rule: Guidance interval",
            "Guidance interval (Kynkäänniemi et al. 2024): guide only for sigma in (sigma_low, sigma_high]; "
            "elsewhere one branch, the positive alone. The paper's SDXL interval is (0.28, 5.42]; flow models' "
            "(SD3, Flux, Wan) sigmas run from 1 down to 0, so give their interval in that range.",
            [
                io.Float.Input("sigma_low", default=0.28, min=0.0, max=10000.0, step=0.01,
                               tooltip="Lower end, excluded (0..10000)."),
                io.Float.Input("sigma_high", default=5.42, min=0.0, max=10000.0, step=0.01,
                               tooltip="Upper end, included (0..10000); above it the early steps are unguided."),
                _inner_input(),
            ],
        )

    @classmethod
    def execute(cls, sigma_low, sigma_high, rule=None) -> io.NodeOutput:
        return io.NodeOutput(build_rule("NegativeRuleInterval", rules.GuidanceInterval, sigma_low=sigma_low,
                                        sigma_high=sigma_high, inner=rule))


class NegativeRuleCachedNegative(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            "NegativeRuleCachedNegative", "Rule: Cached negative",
            "The negative at a fraction of its cost (FasterCache's CFG cache, Lv et al. 2024): on small steps the "
            "negative branches are predicted on every k-th model evaluation only; in between the positive alone is "
            "predicted and each negative is rebuilt from its last difference to the positive. Large steps (few-step "
            "schedules, the second evaluation of heun or dpm_2) always predict them. Works with windows, extra "
            "negatives and every rule (connect it to 'rule').",
            [
                io.Int.Input("every", default=3, min=1, max=1000,
                             tooltip="Predict the negatives at least on every k-th model evaluation (1..1000; 1 = "
                             "always, plain full CFG bit for bit)."),
                io.Float.Input("growth", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Factor on the cached difference per rebuilt evaluation (0..10; 1 keeps it as "
                               "measured, FasterCache grows it by about 1.06)."),
                io.Int.Input("full_start", default=2, min=0, max=1000,
                             tooltip="Model evaluations at the start that always predict the negatives (0..1000)."),
                io.Boolean.Input("frequency_split", default=False,
                                 tooltip="Grow the low and high spatial frequencies of the cached difference apart "
                                 "(FasterCache's split): 'growth' for the low band, 'high_growth' for the high one."),
                io.Float.Input("cutoff", default=0.25, min=0.0, max=1.0, step=0.01,
                               tooltip="With the split: the share of the highest spatial frequency below which a "
                               "frequency counts as low (0..1)."),
                io.Float.Input("high_growth", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="With the split: the growth of the high band per skipped evaluation (0..10)."),
                _inner_input(),
                io.Boolean.Input("bounded", default=True, optional=True,
                                 tooltip="Never let a rebuilt D_pos - D_neg grow longer, per sample, than the longer "
                                 "of the last two measured ones (off: the growth extrapolates without bound)."),
                io.Float.Input("cache_start_percent", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Predict the negatives on every evaluation until this point of the model's "
                               "schedule (0..1, as the host's start_percent); cache only after it. 0 caches from the "
                               "first evaluations."),
                io.Float.Input("sigma_power", default=0.5, min=0.0, max=2.0, step=0.05, optional=True,
                               tooltip="How the cached difference D_pos - D_neg follows sigma: as sigma^p (0..2). "
                               "1 keeps it in noise space (FasterCache), 0 keeps the denoised difference as it was."),
                io.Float.Input("max_log_sigma_drop", default=0.3, min=0.0, max=NO_LIMIT, step=0.05, optional=True,
                               tooltip="Rebuild a negative only while ln(sigma) has fallen by at most this much since "
                               "it was last predicted, and only on an evaluation whose sigma fell (0..100; 0 predicts "
                               f"every evaluation, {NO_LIMIT:g} lifts the limit: the fixed every-k cadence)."),
            ],
        )

    @classmethod
    def execute(cls, every, growth, full_start, frequency_split, cutoff, high_growth, rule=None, bounded=True,
                cache_start_percent=0.0, sigma_power=0.5, max_log_sigma_drop=0.3) -> io.NodeOutput:
        renamed = {"bands": "frequency_split", "from_percent": "cache_start_percent"}
        drop = check_number("NegativeRuleCachedNegative", "max_log_sigma_drop", max_log_sigma_drop, 0.0, NO_LIMIT,
                            hint=f" ({NO_LIMIT:g}: no limit)")
        drop = math.inf if drop >= NO_LIMIT else drop
        return io.NodeOutput(build_rule("NegativeRuleCachedNegative", rules.CachedNegative, renamed, every=every, growth=growth,
                                        full_start=full_start, bands=bool(frequency_split), cutoff=cutoff,
                                        high_growth=high_growth, inner=rule, bounded=bool(bounded),
                                        from_percent=cache_start_percent, sigma_power=sigma_power,
                                        max_log_sigma_drop=drop))


NODES = [NegativeRulePerpNeg, NegativeRuleAPG, NegativeRuleRescale, NegativeRuleCFGZeroStar, NegativeRuleDynamic,
         NegativeRuleMinSigma, NegativeRuleInterval, NegativeRuleCachedNegative]
