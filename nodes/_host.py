"""Adapters between ComfyUI's sampling hooks and the pure engine in ``samplers/``.

This is the one module that knows the host's hook names and argument keys. What it installs:

- on the model clone, one ``OUTER_SAMPLE`` wrapper (``add_wrapper_with_key``, key
  ``negative_guidance``). At the start of each sampling run it
  - adds the extra negatives (and the unconditional conditioning, if any) to the guider's
    conditionings, so the host prepares them exactly like the negative prompt (areas, masks,
    model-specific conds, ControlNets);
  - turns percent windows into sigmas with the model's own ``percent_to_sigma``;
  - sets, in that run's copy of the model options only, a ``sampler_calc_cond_batch_function``
    (branch plan + one batched model call) and, when extra negatives exist, a
    ``sampler_cfg_function`` that wraps whatever cfg function another node put there.
- nothing else: no pre/post-cfg hook, no ``disable_cfg1_optimization`` flag, no reassigned host
  function. Post-cfg hooks of other nodes run as usual.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import node_helpers
import torch

from ..samplers import rules
from ..samplers.engine import ExtraNegative, GuidanceSpec, combine_step, negative_for, outside_as_reference
from ..samplers.schedule import SigmaWindow, is_full_window
from ..samplers.trace import Trace

log = logging.getLogger(__name__)

WRAPPER_KEY = "negative_guidance"
EXTRA_COND_KEY = "negative_guidance_extra_{}"
UNCOND_COND_KEY = "negative_guidance_uncond"


class InputError(ValueError):
    """Bad input to one of the pack's nodes; the message names the node and the input."""

    def __init__(self, node: str, name: str, expected: str, got=None):
        detail = "" if got is None else f", got {got}"
        super().__init__(f"{node}: input '{name}' {expected}{detail}")


@dataclass(frozen=True, eq=False)
class NegativeEntry:
    """One extra negative of a chain: a conditioning, its weight and its percent window."""

    conditioning: list
    weight: float
    start_percent: float = 0.0
    end_percent: float = 1.0


@dataclass(frozen=True, eq=False)
class GuidanceRequest:
    """What a node asks of the engine, still in host terms (conditionings, percents)."""

    node: str
    extras: tuple = ()
    negative_start_percent: float = 0.0
    negative_end_percent: float = 1.0
    unconditional: list | None = None
    rule: rules.CFG | None = None
    trace: Trace | None = None

    @property
    def is_plain_cfg(self) -> bool:
        active = [e for e in self.extras if e.weight != 0.0]
        plain_rule = self.rule is None or type(self.rule) is rules.CFG
        window = is_full_window(self.negative_start_percent, self.negative_end_percent)
        return not active and plain_rule and window and self.trace is None


# ---------------------------------------------------------------------------- validation


def conditioning_width(conditioning, node: str, name: str) -> int:
    """The embedding width of a CONDITIONING, checking it is a non-empty list of [tensor, dict]."""
    if not isinstance(conditioning, (list, tuple)) or len(conditioning) == 0:
        raise InputError(node, name, "must be a non-empty CONDITIONING list", type(conditioning).__name__)
    widths = set()
    for entry in conditioning:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[1], dict):
            raise InputError(node, name, "must be a CONDITIONING: a list of [tensor, dict] pairs")
        tensor = entry[0]
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
            got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise InputError(node, name, "must carry an embedding tensor of shape [batch, tokens, width]", got)
        if tensor.numel() == 0:
            raise InputError(node, name, "must carry an embedding tensor with at least one batch row, token and "
                             "feature", list(tensor.shape))
        pooled = entry[1].get("pooled_output")
        if pooled is not None and not isinstance(pooled, torch.Tensor):
            raise InputError(node, name, "must have a tensor as 'pooled_output'", type(pooled).__name__)
        if not bool(torch.isfinite(tensor).all()) or (pooled is not None and not bool(torch.isfinite(pooled).all())):
            raise InputError(node, name, "contains NaN or infinite values (a broken text encoder or LoRA upstream?)")
        widths.add(int(tensor.shape[-1]))
    if len(widths) != 1:
        raise InputError(node, name, "has entries of different embedding widths", sorted(widths))
    return widths.pop()


def check_same_width(node: str, reference, reference_name: str, other, other_name: str) -> None:
    want = conditioning_width(reference, node, reference_name)
    got = conditioning_width(other, node, other_name)
    if want != got:
        raise InputError(
            node, other_name,
            f"must have the embedding width of '{reference_name}' ({want}); it comes from a different "
            "text encoder or model family", got,
        )


def check_latent(node: str, name: str, latent, model) -> None:
    """A LATENT dict whose samples have the model's channel count (an empty latent the host adapts itself)."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim < 3:
        raise InputError(node, name, "must be a LATENT: a dict with a 'samples' tensor of shape [batch, channels, ...]")
    latent_format = model.get_model_object("latent_format")
    dims = getattr(latent_format, "latent_dimensions", None)
    # the host itself turns a 4-D latent into a one-frame video (fix_empty_latent_channels)
    if dims is not None and samples.ndim != 2 + dims and not (dims == 3 and samples.ndim == 4):
        shape = {1: "[batch, channels, length] (audio)", 2: "[batch, channels, height, width] (images)",
                 3: "[batch, channels, frames, height, width] (video)"}.get(dims, f"{2 + dims} dimensions")
        raise InputError(node, name, f"has {samples.ndim} dimensions but this model's latents are {shape}: it was made "
                         "for another model family", list(samples.shape))
    want = getattr(latent_format, "latent_channels", None)
    if want is not None and samples.shape[1] != want and bool(torch.count_nonzero(samples) > 0):
        raise InputError(node, name, f"has {samples.shape[1]} channels but this model's latents have {want}: it was made "
                         "by another model family's VAE", samples.shape[1])
    if not bool(torch.isfinite(samples).all()):
        raise InputError(node, name, "contains NaN or infinite values")


def needs_pooled(model) -> bool:
    """Whether the model's extra conditioning reads every prompt's ``pooled_output`` (SDXL, SD3, Flux).

    Asked of the host itself: its ``encode_adm`` raises ``KeyError('pooled_output')`` for exactly
    those families when called without one.
    """
    try:
        model.model.encode_adm()
    except KeyError as err:
        return err.args == ("pooled_output",)
    except Exception:  # other families need other arguments to answer; they read no pooled vector
        return False
    return False


def model_context_width(model) -> int | None:
    """The embedding width a UNet's cross-attention takes; None for families whose config does not say it plainly."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    if not isinstance(model.get_model_object("diffusion_model"), UNetModel):
        return None
    width = getattr(getattr(model.model, "model_config", None), "unet_config", {}).get("context_dim")
    return width if isinstance(width, int) and width > 1 else None


def check_prompts_fit_model(node: str, model, named, pooled: bool = True) -> None:
    """Each ``(name, conditioning)`` has what the model reads: its context width (UNets) and, where the
    family needs one, a ``pooled_output``.

    Entries may be raw ``[tensor, dict]`` pairs or the host's converted dicts. Without this, the
    host stops inside the model's first forward (a shape error, or ``KeyError: 'pooled_output'``).
    """
    family = type(getattr(model.model, "model_config", None)).__name__
    want = model_context_width(model)
    pooled = pooled and needs_pooled(model)
    for name, conditioning in named:
        for entry in conditioning or ():
            values = entry if isinstance(entry, dict) else entry[1]
            tensor = values.get("cross_attn") if isinstance(entry, dict) else entry[0]
            if want is not None and tensor is not None and int(tensor.shape[-1]) != want:
                raise InputError(node, name, f"must have this model's context width ({want}, {family}): it was "
                                 "encoded by another family's text encoder", int(tensor.shape[-1]))
            if pooled and values.get("pooled_output") is None and "unclip_conditioning" not in values:
                raise InputError(
                    node, name,
                    f"has no 'pooled_output', which this model ({family}) needs for every prompt: encode it with "
                    "the model's own text encoder (CLIPTextEncode gives one), or ConditioningZeroOut an encoded prompt",
                )


def check_model(node: str, model, name: str = "model") -> None:
    """A MODEL socket's value: a ModelPatcher (anything that clones and hands out model objects)."""
    if not callable(getattr(model, "clone", None)) or not callable(getattr(model, "get_model_object", None)):
        raise InputError(node, name, "must be a MODEL (the output of a checkpoint or model loader)",
                         type(model).__name__)


def check_finite(node: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(node, name, "must be a finite number", repr(value))
    return float(value)


def check_window(node: str, start: float, end: float, prefix: str = "") -> None:
    """Both percents finite in [0, 1] and start <= end, else an error naming the inputs."""
    for name, value in ((f"{prefix}start_percent", start), (f"{prefix}end_percent", end)):
        check_finite(node, name, value)
        if not 0.0 <= value <= 1.0:
            raise InputError(node, name, "must be in [0, 1] (a fraction of the schedule)", value)
    if start > end:
        raise InputError(
            node, f"{prefix}start_percent",
            f"must not be after {prefix}end_percent ({end}): the window runs from start (0 = first step) "
            "to end (1 = last step)", start,
        )


def validate_request(request: GuidanceRequest, positive=None, negative=None) -> None:
    """Check a request before any sampling starts; with ``positive`` known, check widths too."""
    node = request.node
    check_window(node, request.negative_start_percent, request.negative_end_percent, "negative_")
    for i, entry in enumerate(request.extras):
        name = f"negatives[{i}]"
        if not isinstance(entry, NegativeEntry):
            raise InputError(node, "negatives", "must be a chain made by the Weighted Negative node", type(entry).__name__)
        conditioning_width(entry.conditioning, node, name)
        check_finite(node, f"{name}.weight", entry.weight)
        check_window(node, entry.start_percent, entry.end_percent, f"{name}.")
    if request.unconditional is not None:
        conditioning_width(request.unconditional, node, "unconditional")
    if request.rule is not None and not isinstance(request.rule, rules.CFG):
        raise InputError(node, "rule", "must come from one of this pack's rule nodes", type(request.rule).__name__)
    if request.rule is not None and request.rule.needs_uncond and request.unconditional is None:
        raise InputError(
            node, "unconditional",
            f"is required by the {request.rule.name} rule: connect an empty-prompt conditioning "
            "(CLIPTextEncode with no text)",
        )
    if positive is None:
        return
    if negative is not None:
        check_same_width(node, positive, "positive", negative, "negative")
    for i, entry in enumerate(request.extras):
        check_same_width(node, positive, "positive", entry.conditioning, f"negatives[{i}]")
    if request.unconditional is not None:
        check_same_width(node, positive, "positive", request.unconditional, "unconditional")


# ---------------------------------------------------------------------------- patching


def check_model_fit(request: GuidanceRequest, model) -> None:
    """What only the model can tell: pooled vectors the family needs, and rule sigmas inside its range."""
    named = [(f"negatives[{i}]", e.conditioning) for i, e in enumerate(request.extras)]
    if request.unconditional is not None:
        named.append(("unconditional", request.unconditional))
    check_prompts_fit_model(request.node, model, named)
    if request.rule is None:
        return
    model_sampling = model.get_model_object("model_sampling")
    low, high = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    fit = request.rule.fit(low, high)
    where = f"this model's sigmas run from {high:.4g} down to {low:.4g}" + (
        " (a flow model: 1 down to 0)" if high <= 1.0 + 1e-6 else "")
    if fit == "never":
        raise InputError(request.node, "rule", f"({request.rule.name}) would never guide on this model: {where}; set "
                         "the rule's sigmas inside that range")
    if fit == "everywhere":
        log.warning("%s: the %s rule's threshold is at or above the largest sigma of this model (%s): it skips "
                    "over the whole run", request.node, request.rule.name, where)


def apply_guidance(model, request: GuidanceRequest):
    """Return a clone of ``model`` that applies ``request`` in every sampling run.

    At the defaults (no active extra negative, the whole schedule, no rule, no trace) nothing is
    patched and ``model`` itself is returned: the output is the host's, bit for bit, and the host
    does not load a new clone for the run.
    """
    check_model_fit(request, model)
    if request.is_plain_cfg:
        return model
    m = model.clone()
    if m.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY):
        raise InputError(
            request.node, "model",
            "already has negative guidance applied by another node of this pack; chain the extra "
            "negatives into one node instead of stacking them",
        )
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _OuterSample(request))
    return m


def _sigma_window(model_sampling, start_percent: float, end_percent: float) -> SigmaWindow:
    start = math.inf if start_percent <= 0.0 else float(model_sampling.percent_to_sigma(start_percent))
    end = -math.inf if end_percent >= 1.0 else float(model_sampling.percent_to_sigma(end_percent))
    return SigmaWindow(start, end)


def resolve_spec(request: GuidanceRequest, model_sampling) -> GuidanceSpec:
    """Percent windows to sigma windows, with the model's own schedule."""
    extras = tuple(
        ExtraNegative(e.weight, _sigma_window(model_sampling, e.start_percent, e.end_percent))
        for e in request.extras
    )
    return GuidanceSpec(
        primary_window=_sigma_window(model_sampling, request.negative_start_percent, request.negative_end_percent),
        extras=extras,
        has_uncond=request.unconditional is not None,
        rule=request.rule if request.rule is not None else rules.CFG(),
        flow=isinstance(model_sampling, comfy.model_sampling.CONST),
    )


def _as_negative(conditioning) -> list:
    return comfy.sampler_helpers.convert_cond(node_helpers.conditioning_set_values(conditioning, {"prompt_type": "negative"}))


class _OuterSample:
    """OUTER_SAMPLE wrapper: prepares one sampling run, then lets the host run it."""

    def __init__(self, request: GuidanceRequest):
        self.request = request

    def __call__(self, executor, *args, **kwargs):
        guider = executor.class_obj
        node = self.request.node
        if type(guider).predict_noise is not comfy.samplers.CFGGuider.predict_noise:
            raise InputError(
                node, "model",
                f"is being sampled by {type(guider).__name__}, which combines predictions itself and would "
                "ignore the negatives; use KSampler, CFGGuider or NegativeGuider with this model",
            )
        _check_finite_conds(node, guider.original_conds)
        check_prompts_fit_model(node, guider.model_patcher,
                                [(name, guider.original_conds.get(name)) for name in ("positive", "negative")])
        self._check_widths(_widths(guider.original_conds.get("positive")), _widths(guider.original_conds.get("negative")))
        model_sampling = guider.model_patcher.get_model_object("model_sampling")
        spec = resolve_spec(self.request, model_sampling)
        for i, entry in enumerate(self.request.extras):
            if entry.weight != 0.0:  # a zero weight is never planned: nothing for the host to prepare
                guider.conds[EXTRA_COND_KEY.format(i)] = _as_negative(entry.conditioning)
        if self.request.unconditional is not None:
            guider.conds[UNCOND_COND_KEY] = _as_negative(self.request.unconditional)
        trace = self.request.trace
        if trace is not None:
            trace.reset(rule=spec.rule.name)
            latent_format = guider.model_patcher.get_model_object("latent_format")
            trace.meta.update(latent_format=latent_format, rgb_factors=getattr(latent_format, "latent_rgb_factors", None),
                              rgb_bias=getattr(latent_format, "latent_rgb_factors_bias", None))
        run = _Run(spec, guider, float(getattr(guider, "cfg", math.nan)), node, trace)
        run.install(guider.model_options)
        result = executor(*args, **kwargs)
        run.report()
        if trace is not None:
            trace.finish(result)
        return result

    def _check_widths(self, positive_widths: set, negative_widths: set) -> None:
        if len(positive_widths) != 1:
            return
        (want,) = positive_widths
        if negative_widths and negative_widths != positive_widths:
            raise InputError(
                self.request.node, "negative",
                f"(the sampler's negative prompt) must have the positive prompt's embedding width ({want})",
                sorted(negative_widths),
            )
        named = [(f"negatives[{i}]", e.conditioning) for i, e in enumerate(self.request.extras)]
        if self.request.unconditional is not None:
            named.append(("unconditional", self.request.unconditional))
        for name, conditioning in named:
            got = conditioning_width(conditioning, self.request.node, name)
            if got != want:
                raise InputError(
                    self.request.node, name,
                    f"must have the positive prompt's embedding width ({want}); it comes from a different "
                    "text encoder or model family", got,
                )


@dataclass
class _Step:
    """What the batched call of one step left for the cfg function of the same step."""

    input: object
    plan: object
    pos: object
    primary: object
    uncond: object
    extras: list


class _Run:
    """The hooks of one sampling run; lives in that run's copy of the model options only."""

    def __init__(self, spec: GuidanceSpec, guider, cfg: float, node: str, trace: Trace | None = None):
        self.spec = spec
        self.trace = trace
        self.guider = guider
        self.cfg1 = math.isclose(cfg, 1.0)
        self.node = node
        self.state = spec.rule.new_state()
        self.calls = 0
        self.branches = 0
        self.prev_calc = None
        self.prev_cfg = None
        self.pending: _Step | None = None

    @property
    def combines(self) -> bool:
        """Whether this run needs its own cfg function (extra negatives, or a rule that owns the combine)."""
        return self.trace is not None or self.spec.rule.owns_combine or any(e.weight != 0.0 for e in self.spec.extras)

    def install(self, model_options: dict) -> None:
        self.prev_calc = model_options.get("sampler_calc_cond_batch_function")
        model_options["sampler_calc_cond_batch_function"] = self.calc_cond_batch
        if not self.combines:
            return
        self.prev_cfg = model_options.get("sampler_cfg_function")
        if self.prev_cfg is not None and self.spec.rule.owns_combine:
            raise InputError(
                self.node, "rule",
                f"({self.spec.rule.name}) replaces the combine step, but another node already set one on this "
                f"model ({_name(self.prev_cfg)}); remove that node or use the default rule",
            )
        if self.prev_cfg is not None:
            log.info("%s: composing with the cfg function already on the model (%s)", self.node, _name(self.prev_cfg))
        model_options["sampler_cfg_function"] = self.cfg_function

    def _plan(self, conds, sigma):
        # The one device->host read of the step, and only when a window makes the plan depend
        # on sigma; the host reads sigma the same way for every conditioning with a timestep range.
        s = float(sigma.reshape(-1)[0]) if self.spec.needs_sigma else None
        plan = self.spec.plan(
            s,
            has_primary=self._primary_conds(conds) is not None,
            primary_term_needed=not self.cfg1,
            keep_primary=self.cfg1 and conds[1] is not None,
            call_index=self.calls,
            state=self.state,
        )
        self.calls += 1
        self.branches += plan.branches
        return plan

    def report(self) -> None:
        """Log what the run cost: model evaluations, and branches against two per evaluation."""
        full = 2 * self.calls
        log.info(
            "%s (%s): %d model evaluations, %d branches predicted (plain CFG: %d; saved %d)",
            self.node, self.spec.rule.name, self.calls, self.branches, full, max(full - self.branches, 0),
        )

    def _primary_conds(self, conds):
        # At cfg == 1 the host leaves the negative out; take it from the guider when a plan needs it.
        return conds[1] if conds[1] is not None else self.guider.conds.get("negative")

    def calc_cond_batch(self, args):
        conds, x, sigma, model, options = args["conds"], args["input"], args["sigma"], args["model"], args["model_options"]
        plan = self._plan(conds, sigma)
        extra_conds = [self.guider.conds[EXTRA_COND_KEY.format(i)] for i in plan.predict_extras]
        uncond_conds = [self.guider.conds[UNCOND_COND_KEY]] if plan.predict_uncond else []
        primary_conds = self._primary_conds(conds) if plan.predict_primary else None
        if self.prev_calc is None:
            out = comfy.samplers.calc_cond_batch(model, [conds[0], primary_conds] + extra_conds + uncond_conds, x, sigma, options)
        else:
            # Another node owns the two-branch call (it may expect exactly [cond, uncond]);
            # our branches go in a second batched call.
            out = list(self.prev_calc({**args, "conds": [conds[0], primary_conds]}))
            if extra_conds or uncond_conds:
                out += comfy.samplers.calc_cond_batch(model, extra_conds + uncond_conds, x, sigma, options)
        pos = out[0]
        primary, uncond, extras = self.spec.complete(
            plan, self.state, pos, sigma,
            primary=out[1] if plan.predict_primary else None,
            uncond=out[2 + len(extra_conds)] if plan.predict_uncond else None,
            extras=out[2:2 + len(extra_conds)])
        if extras:
            reference = {"uncond": uncond, "primary": primary}.get(plan.reference, pos)
            extras = [outside_as_reference(e, reference) for e in extras]
        if self.combines:
            self.pending = _Step(x, plan, pos, primary, uncond, extras)
        return [pos, negative_for(plan, pos, primary, uncond)]

    def cfg_function(self, args):
        x = args["input"]
        step, self.pending = self.pending, None
        if step is None or step.input is not x:
            raise RuntimeError(
                f"{self.node}: the cfg step ran without this pack's batched call before it; another node "
                "replaced 'sampler_calc_cond_batch_function' during sampling"
            )
        prev = None if self.prev_cfg is None else (lambda pos, neg: x - self.prev_cfg(args))
        sample_sigmas = args["model_options"].get("transformer_options", {}).get("sample_sigmas")
        out = combine_step(
            self.spec, step.plan, self.state,
            scale=args["cond_scale"], pos=args["cond_denoised"], neg=args["uncond_denoised"],
            primary=step.primary, uncond=step.uncond, extras=step.extras,
            x=x, sigma=args["sigma"], sample_sigmas=sample_sigmas, primary_combine=prev,
        )
        if self.trace is not None:
            guided_neg = None if step.plan.negative == "positive" else args["uncond_denoised"]
            self.trace.record(x, args["sigma"], args["cond_denoised"], guided_neg, out,
                              negative=step.plan.negative, extras=len(step.plan.extras))
        return x - out


def _check_finite_conds(node: str, original_conds: dict) -> None:
    """NaN or inf in the sampler's own prompts, named before the first step (one check per run)."""
    for name in ("positive", "negative"):
        for c in original_conds.get(name) or ():
            tensors = [c.get("cross_attn"), c.get("pooled_output")]
            if any(isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()) for t in tensors):
                raise InputError(node, name, f"(the sampler's {name} prompt) contains NaN or infinite values (a broken "
                                 "text encoder or LoRA upstream?)")


def _widths(converted_conds) -> set:
    return {int(c["cross_attn"].shape[-1]) for c in converted_conds or () if c.get("cross_attn") is not None}


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__
