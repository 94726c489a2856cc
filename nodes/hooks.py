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

import dataclasses
import logging
import math
from dataclasses import dataclass

import comfy.hooks
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import node_helpers
import torch

from ..samplers.engine import GuidanceSpec, combine_step, negative_for
from ..samplers.rules import CFG, FULL_CFG_SAMPLERS, RunState
from ..samplers.schedule import StepPlan
from ..samplers.trace import Trace
from .model_fit import check_request_fits, check_sampler_prompts
from .request import GuidanceRequest, resolve_spec
from .validation import InputError

log = logging.getLogger(__name__)

WRAPPER_KEY = "negative_guidance"
EXTRA_COND_KEY = "negative_guidance_extra_{}"
UNCOND_COND_KEY = "negative_guidance_uncond"
BRANCH_MARK = "negative_guidance_branch"
"""A key on the pack's conditioning entries, which the host's copies of an entry keep (``c.copy()``)."""


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


def _register_hooks(guider, added: dict) -> None:
    """Register the conditioning hooks (LoRA hooks ...) of the pack's conditionings as ``CFGGuider.sample`` registers
    the sampler's own, before the OUTER_SAMPLE wrappers: weight hooks of every conditioning on the model patcher at
    once (``prepare_model_patcher``), the others' options into this run's model options; hooks nothing registered
    are dropped from the conditionings (``filter_registered_hooks_on_conds``), as the host does."""
    comfy.samplers.preprocess_conds_hooks(added)
    ours = comfy.hooks.HookGroup()
    for conds in added.values():
        comfy.sampler_helpers.get_hooks_from_cond(conds, ours)
    registered = guider.model_options.get("registered_hooks")
    if len(ours) > 0 and not (registered is not None and ours.is_subset_of(registered)):
        known = set(registered.hooks) if registered is not None else set()
        scratch = comfy.model_patcher.create_model_options_clone(guider.model_options)
        comfy.sampler_helpers.prepare_model_patcher(guider.model_patcher, {**guider.conds, **added}, scratch)
        target = comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Model)
        for hook in ours.hooks:
            if hook not in known and hook.hook_type != comfy.hooks.EnumHookType.Weight:
                hook.add_hook_patches(guider.model_patcher, guider.model_options, target, comfy.hooks.HookGroup())
        guider.model_options["registered_hooks"] = scratch["registered_hooks"]
    comfy.samplers.filter_registered_hooks_on_conds(added, guider.model_options)


def _drop_area_copies(conds: dict) -> None:
    """Remove, from each conditioning list of the run, the host's copies of another list's area entries that an entry
    of the pack made (``process_conds`` adds one per area entry to every other list): an area-limited extra then
    changes neither the main term nor another extra. Copies the host made *of* the positive's or negative's areas
    into the pack's lists stay, as they do in the sampler's negative."""
    for key, entries in conds.items():
        if any(c.get(BRANCH_MARK, key) != key for c in entries):
            entries[:] = [c for c in entries if c.get(BRANCH_MARK, key) == key]


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
        spec = dataclasses.replace(resolve_spec(self.request, model_sampling),
                                   sampler_negative=guider.conds.get("negative") is not None)
        spec = _served(spec, sampler_name(args[2] if len(args) > 2 else kwargs.get("sampler")), node)
        added = {}
        for i, entry in enumerate(self.request.extras):
            if entry.weight != 0.0:  # a zero weight is never planned: nothing for the host to prepare
                added[EXTRA_COND_KEY.format(i)] = _as_negative(entry.conditioning)
        if self.request.unconditional is not None:
            added[UNCOND_COND_KEY] = _as_negative(self.request.unconditional)
        _register_hooks(guider, added)
        for key, conds in added.items():
            guider.conds[key] = [{**c, BRANCH_MARK: key} for c in conds]
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
        self.scale = cfg
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
        plan = self.spec.plan(s, scale=self.scale, call_index=self.calls, state=self.state,
                              asked=frozenset({"primary"}) if conds[1] is not None else frozenset())
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
        if self.calls == 0:  # the run's conditionings are prepared (process_conds) by the first model evaluation
            _drop_area_copies(self.guider.conds)
        plan = self._plan(conds, sigma)
        call_index = self.calls - 1
        predicted = plan.having("predicted")
        ours = [k for k in predicted if k != "primary"]
        our_conds = [self.guider.conds[UNCOND_COND_KEY if k == "uncond" else EXTRA_COND_KEY.format(k)] for k in ours]
        primary_conds = self._primary_conds(conds) if "primary" in predicted else None
        if self.prev_calc is None:
            out = comfy.samplers.calc_cond_batch(model, [conds[0], primary_conds] + our_conds, x, sigma, options)
        else:
            # Another node owns the two-branch call (it may expect exactly [cond, uncond]); our branches go in a
            # second batched call, at the places they have in our own call, so that none is labelled a positive.
            out = list(self.prev_calc({**args, "conds": [conds[0], primary_conds]}))
            if our_conds:
                out += comfy.samplers.calc_cond_batch(model, [None, None] + our_conds, x, sigma, options)[2:]
        pos = out[0]
        made = dict(zip(ours, out[2:]))
        if primary_conds is not None:
            made["primary"] = out[1]
        primary, uncond, extras = self.spec.complete(plan, self.state, pos, sigma, made, call_index)
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


def sampler_name(sampler) -> str | None:
    """The host's name of a KSAMPLER's sampler (``sample_euler`` -> ``euler``, ``dpm_fast_function`` -> ``dpm_fast``);
    None for a sampler from elsewhere."""
    fn = getattr(sampler, "sampler_function", None)
    name = getattr(fn, "__name__", "")
    for prefix, suffix in (("sample_", ""), ("", "_function")):
        if name.startswith(prefix) and name.endswith(suffix) and name != prefix + suffix:
            return name[len(prefix):len(name) - len(suffix)]
    return None


def _served(spec: GuidanceSpec, sampler: str | None, node: str) -> GuidanceSpec:
    """The spec a sampler runs: a cached negative on a sampler it cannot serve is replaced by full CFG, and says so."""
    cache = spec.nesting.cache
    why = FULL_CFG_SAMPLERS.get(sampler) if cache is not None else None
    if why is None:
        return spec
    log.info("%s: the cached negative runs full CFG on the sampler %s (%s)", node, sampler, why)
    return dataclasses.replace(spec, rule=cache.inner if cache.inner is not None else CFG())


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__
