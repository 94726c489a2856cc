"""The three entry points through the real host against the step reference (``step_reference.py``), per model
evaluation: drawn combinations of windows, extras (weight, window, mask), the unconditional, nested rules and the
cached negative, with the host's samplers (first and second order, ancestral), on a tiny SD1.5 UNet, a tiny SD3
and the toy model. Each evaluation's branches are predicted again by the host one at a time (``calc_cond_batch``
on one conditioning, at the x and sigma the host passed), and the reference, fed those, must give what the host's
sampler was given."""
from __future__ import annotations

import importlib
import math
import random
from dataclasses import dataclass, field

import pytest
import torch
from step_cases import COMBINERS, to_rule
from step_reference import ALWAYS, Combo, ExtraDesc, Reference, RuleDesc
from tests_support import families

ENTRY_POINTS = ("patch", "guider", "sampler")
CASES = 40
SAMPLERS = ("euler", "heun", "euler_ancestral", "dpmpp_2m")
TOLERANCE = 1e-5


@dataclass
class HostCase:
    family: str
    sampler: str
    scheduler: str
    steps: int
    cfg: float
    window: tuple  # percents
    uncond: bool
    extras: list  # (weight, start, end, masked)
    rule: RuleDesc
    seed: int
    notes: list = field(default_factory=list)


@pytest.fixture(scope="module")
def models(host):
    toy_model = importlib.import_module("negative_guidance_pack.nodes.toy_model")
    toy_parts = toy_model.NegativeGuidanceToyModel.execute().result
    return {"sd15": families.FAMILIES["sd15"], "sd3": families.FAMILIES["sd3"], "toy": toy_parts,
            "built": {"sd15": families.FAMILIES["sd15"].model(), "sd3": families.FAMILIES["sd3"].model()}}


def schedule(model, scheduler, steps):
    import comfy.samplers

    return [float(s) for s in comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler,
                                                               steps)]


def draw(entry: str, i: int, models) -> HostCase:
    """Case ``i`` of an entry point, drawn from a generator seeded by both. Dynamic guidance runs with a constant
    posterior here (offset 0, temperature 0): a saturated one multiplies the model calls' own rounding (a batch
    against one prompt alone) by scale * p / (1 - p), about 2000; the pure set checks its tracking."""
    rnd = random.Random(f"{entry}-{i}")
    family = rnd.choice(["sd15", "sd3", "toy"])
    steps = rnd.choice([3, 4])
    scheduler = rnd.choice(["normal", "karras"] if family != "sd3" else ["normal", "simple"])
    model = models["toy"][0] if family == "toy" else models["built"][family]
    points = schedule(model, scheduler, steps)[:-1]
    percent = lambda: rnd.choice([0.0, 0.25, 0.5, 0.75, 1.0])  # noqa: E731
    window = (0.0, 1.0) if rnd.random() < 0.4 else tuple(sorted((percent(), percent())))
    kind = rnd.choice(COMBINERS)
    rule = RuleDesc(kind, {"apg": {"momentum": rnd.choice([-0.5, 0.5])}, "cfg_zero_star": {"zero_init_steps": 1},
                           "dynamic": {"temperature": 0.0, "offset": 0.0, "prior": 0.2, "scale": 3.0}}.get(kind, {}))
    for _ in range(rnd.choice([0, 0, 1, 2])):
        if rnd.random() < 0.5:
            rule = RuleDesc("min_sigma", {"min_sigma": rnd.choice(points[1:]), "all_steps": rnd.random() < 0.5}, rule)
        else:
            low, high = sorted(rnd.sample(points, 2)) if len(points) > 1 else (0.0, points[0])
            rule = RuleDesc("interval", {"sigma_low": low * 0.99, "sigma_high": high}, rule)
    if rnd.random() < 0.4:
        rule = RuleDesc("cached", {"every": rnd.choice([2, 3]), "full_start": rnd.choice([0, 1]), "growth": 1.05,
                                   "max_log_sigma_drop": rnd.choice([math.inf, 0.3, 2.0])}, rule)
    extras = [(rnd.choice([1.0, -0.5, 2.0]), *sorted((percent(), percent())), rnd.random() < 0.4)
              for _ in range(rnd.choice([0, 1, 2]))]
    extras = [(w, 0.0, 1.0, m) if rnd.random() < 0.5 else (w, s, e, m) for w, s, e, m in extras]
    needs = rule_combiner(rule).kind in ("perp_neg", "dynamic")
    return HostCase(family, rnd.choice(SAMPLERS), scheduler, steps, rnd.choice([1.0, 2.5, 6.0]), window,
                    needs or rnd.random() < 0.4, extras, rule, rnd.randrange(1000))


def rule_combiner(rule):
    while rule.kind in ("min_sigma", "interval", "cached"):
        rule = rule.inner or RuleDesc()
    return rule


class Recorder:
    """Host hooks on the model: the run's conditionings (a SAMPLER_SAMPLE wrapper sees the guider after it prepared
    them) and, at each evaluation, the x, sigma, guided prediction and every branch predicted alone."""

    def __init__(self):
        self.conds, self.evaluations = None, []

    def install(self, model):
        import comfy.patcher_extension

        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, "step_reference", self.wrapper)
        m.set_model_sampler_post_cfg_function(lambda args: self.post_cfg(args))  # a lambda: clone() deep-copies methods
        return m

    def wrapper(self, executor, *args, **kwargs):
        self.conds = args[0].conds
        return executor(*args, **kwargs)

    def post_cfg(self, args):
        import comfy.samplers

        from negative_guidance_pack.nodes.hooks import EXTRA_COND_KEY, UNCOND_COND_KEY

        keys = {"positive": "positive", "primary": "negative", "uncond": UNCOND_COND_KEY}
        keys.update({i: EXTRA_COND_KEY.format(i) for i in range(4)})
        x, sigma, options = args["input"], args["sigma"], args["model_options"]
        alone = {b: comfy.samplers.calc_cond_batch(args["model"], [self.conds[k]], x, sigma, options)[0]
                 for b, k in keys.items() if k in self.conds}
        self.evaluations.append((x.clone(), float(sigma.reshape(-1)[0]), args["denoised"].clone(), alone,
                                 options.get("transformer_options", {}).get("sample_sigmas")))
        return args["denoised"]


def left_half_mask(latent):
    h, w = latent["samples"].shape[-2:]
    mask = torch.zeros(1, h * 8, w * 8)
    mask[:, :, : w * 4] = 1.0
    return mask


def prompts(case: HostCase, models, host_nodes):
    """(model, positive, negative, latent, extra conditionings, unconditional) for the case's family."""
    if case.family == "toy":
        model, clip, _ = models["toy"]
        enc = lambda text: host_nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
        lat = {"samples": torch.zeros(1, 3, 16, 16)}
        texts = ["portrait of a man", "mustache", "woman", "cat", ""]
        pos, neg, e1, e2, empty = (enc(t) for t in texts)
        extras = [e1, e2]
    else:
        family, model = models[case.family], models["built"][case.family]
        lat = family.latent()
        pos, neg, empty = family.cond(1), family.cond(2), family.cond(9)
        extras = [family.cond(3), family.cond(4)]
    out = []
    for (weight, start, end, masked), c in zip(case.extras, extras):
        if masked:
            mask = left_half_mask(lat) if case.family != "toy" else torch.ones(1, 16, 16).index_fill_(
                2, torch.arange(8, 16), 0.0)
            c = host_nodes.ConditioningSetMask().append(c, mask, "default", 1.0)[0]
        out.append(c)
    return model, pos, neg, lat, out, empty if case.uncond else None


def run(entry, case, models, pack_nodes, host_nodes, custom):
    model, pos, neg, lat, extras, uncond = prompts(case, models, host_nodes)
    g = pack_nodes
    negs = None
    for (weight, start, end, _), c in zip(case.extras, extras):
        negs = g.WeightedNegative.execute(c, weight, start, end, negatives=negs)[0]
    recorder = Recorder()
    m = recorder.install(model)
    kw = {"negatives": negs, "unconditional": uncond, "rule": to_rule(case.rule)}
    kw = {k: v for k, v in kw.items() if v is not None}
    if entry == "patch":
        patched = g.NegativeGuidance.execute(m, *case.window, **kw)[0]
        host_nodes.common_ksampler(patched, case.seed, case.steps, case.cfg, case.sampler, case.scheduler, pos, neg,
                                   lat)
    elif entry == "guider":
        guider = g.NegativeGuider.execute(m, pos, neg, case.cfg, *case.window, **kw)[0]
        sigmas = custom.BasicScheduler().get_sigmas(m, case.scheduler, case.steps, 1.0)[0]
        custom.SamplerCustomAdvanced().sample(custom.Noise_RandomNoise(case.seed), guider,
                                              custom.comfy.samplers.sampler_object(case.sampler), sigmas, lat)
    else:
        g.NegativeGuidanceSampler.execute(m, case.seed, case.steps, case.cfg, case.sampler, case.scheduler, pos, neg,
                                          lat, 1.0, *case.window, **kw)
    return model, recorder


def sigma_window(model, start, end):
    """A percent window as the host's own ``percent_to_sigma`` maps it (0 and 1: open ends)."""
    ms = model.get_model_object("model_sampling")
    return (math.inf if start <= 0 else float(ms.percent_to_sigma(start)),
            -math.inf if end >= 1 else float(ms.percent_to_sigma(end)))


def combines(case: HostCase) -> bool:
    """Whether the pack's cfg function does the combine (a rule of its own or an active extra)."""
    return case.rule.kind != "cfg" or any(w != 0 for w, *_ in case.extras)


def combo_of(case: HostCase, model) -> Combo:
    import comfy.model_sampling

    flow = isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)
    extras = [ExtraDesc(w, sigma_window(model, s, e) if (s, e) != (0.0, 1.0) else ALWAYS)
              for w, s, e, _ in case.extras]
    window = sigma_window(model, *case.window) if case.window != (0.0, 1.0) else ALWAYS
    return Combo(case.cfg, case.rule, window, uncond=case.uncond, extras=extras, flow=flow)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_computes_the_written_meaning_through_the_host(entry, models, pack_nodes, host_nodes,
                                                                         custom):
    for i in range(CASES):
        case = draw(entry, i, models)
        model, recorder = run(entry, case, models, pack_nodes, host_nodes, custom)
        reference = Reference(combo_of(case, model))
        assert recorder.evaluations, f"case {i}: no evaluation recorded"
        for n, (x, sigma, guided, alone, sample_sigmas) in enumerate(recorder.evaluations):
            want, _ = reference.evaluate(x, sigma, sample_sigmas, alone.__getitem__)
            if combines(case):  # the pack's cfg function returns x - D, which the host turns back into D
                want = x - (x - want)
            rel = float((guided - want).abs().max()) / max(float(want.abs().max()), 1e-12)
            assert rel <= TOLERANCE, f"case {i} {case}: evaluation {n} (sigma {sigma:.4g}) differs by {rel:.3g}"
