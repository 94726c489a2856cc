"""The sampling hooks: where a request meets ComfyUI's sampler, and the pure engine in ``samplers/`` runs.

The one module that knows the host's sampling hook names and argument keys. What it installs:

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

import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import node_helpers
import torch

from ..samplers.engine import GuidanceSpec, combine_step, negative_for, outside_as_reference
from ..samplers.rules import RunState
from ..samplers.schedule import StepPlan
from ..samplers.trace import Trace
from .model_fit import check_request_fits, check_sampler_prompts
from .request import GuidanceRequest, resolve_spec
from .validation import InputError

log = logging.getLogger(__name__)

WRAPPER_KEY = "negative_guidance"
EXTRA_COND_KEY = "negative_guidance_extra_{}"
UNCOND_COND_KEY = "negative_guidance_uncond"


def apply_guidance(model, request: GuidanceRequest):
    """Return a clone of ``model`` that applies ``request`` in every sampling run.

    At the defaults (no active extra negative, the whole schedule, no rule, no trace) nothing is
    patched and ``model`` itself is returned: the output is the host's, bit for bit, and the host
    does not load a new clone for the run.
    """
    check_request_fits(request, model)
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
        check_sampler_prompts(self.request, guider.model_patcher, guider.original_conds)
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


@dataclass
class _Step:
    """What the batched call of one step left for the cfg function of the same step."""

    input: torch.Tensor
    plan: StepPlan
    pos: torch.Tensor
    primary: torch.Tensor | None
    uncond: torch.Tensor | None
    extras: list[torch.Tensor]


class _Run:
    """The hooks of one sampling run; lives in that run's copy of the model options only."""

    def __init__(self, spec: GuidanceSpec, guider, cfg: float, node: str, trace: Trace | None = None):
        self.spec = spec
        self.trace = trace
        self.guider = guider
        self.cfg1 = math.isclose(cfg, 1.0)
        self.node = node
        self.state: RunState = spec.rule.new_state()
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


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__
