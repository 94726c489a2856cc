"""NegativeAttentionGuidance: Normalized Attention Guidance (NAG) through the host's own hooks.

What a patched clone carries (no forward method is replaced, nothing of the host is reassigned):

- one ``APPLY_MODEL`` wrapper (key ``negative_guidance_nag``). In each model call that has guided
  (positive) rows and lies in the window, it extends the call's inputs with the negative, as the
  family's adapter says (``nodes/nag_families.py``), and puts into that call's own copy of the
  transformer options an ``optimized_attention_override`` that wraps whatever override was there
  (a sage or flash attention node's): every attention call of the forward goes through it, and it
  computes every part of attention by calling through to that previous override or the host's kernel;
- on UNets, an ``attn2_patch`` that marks the next attention call as a cross-attention (it changes
  nothing), so the override tells cross- from self-attention whatever the token counts.

The override (``nag_attention.py``) hands the call to ``samplers.nag``, which splits the texts again
and combines the attention outputs before the layer's output projection, where the paper puts NAG.

A ``CALC_COND_BATCH`` wrapper counts what each evaluation guided and an ``OUTER_SAMPLE`` wrapper logs it
per run; at the first evaluation inside the window that ran the model, guiding no row or no attention
layer stops the run with an ``InputError`` (docs/nag.md, "Never a silent no-op").
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..samplers.nag import NORMS, Params, Rows, check_parameters
from ..samplers.schedule import SigmaWindow
from .guidance import CATEGORY
from .model_fit import check_context_width, check_prompts_fit_model
from .nag_attention import NODE, STATE_KEY, CallState, attention_override
from .nag_families import Unsupported, adapter_for, refusal
from .request import sigma_window
from .validation import InputError, check_choice, check_model, check_window, conditioning_width, inputs_of

log = logging.getLogger(__name__)

WRAPPER_KEY = "negative_guidance_nag"


class Negative:
    """The negative prompt's tensors, moved to each call's device and dtype once and kept there."""

    def __init__(self, conditioning):
        self.cond, self.values = conditioning[0][0].detach(), dict(conditioning[0][1])
        self._cache = {}

    @property
    def tokens(self) -> int:
        return int(self.cond.shape[1])

    def _cached(self, key, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        slot = (key, like.device, like.dtype)
        if slot not in self._cache:
            self._cache[slot] = value.to(device=like.device, dtype=like.dtype if value.is_floating_point() else value.dtype)
        return self._cache[slot]

    def tensor(self, like: torch.Tensor) -> torch.Tensor:
        return self._cached("cond", self.cond, like)

    def extra(self, key: str, like: torch.Tensor, tokens: int | None = None) -> torch.Tensor:
        value = self.values.get(key)
        if value is None:
            value = torch.ones(1, tokens, dtype=like.dtype)  # an attention mask that keeps every token
        return self._cached(key, value, like)

    def extra_tokens(self, key: str) -> int:
        return int(self.values[key].shape[2])


@functools.lru_cache(maxsize=256)
def _index(values: tuple, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def guided_rows(transformer_options: dict, batch: int, device) -> torch.Tensor | None:
    """The rows of a model call that hold a positive prompt (the host's ``cond_or_uncond`` 0)."""
    chunks = transformer_options.get("cond_or_uncond") or [0]
    per = batch // len(chunks)
    rows = tuple(c * per + r for c, kind in enumerate(chunks) if kind == 0 for r in range(per))
    return _index(rows, device) if rows else None


@dataclass
class Reach:
    """What NAG reached in one evaluation: the model calls made and their rows, the guided (positive) rows inside
    the window, the attention calls that went through NAG and the most it guided in one call."""

    calls: int = 0
    rows: int = 0
    guided_rows: int = 0
    attention: int = 0
    layers: int = 0
    outside: bool = False  # a call with positive rows outside the window


@dataclass
class RunReach:
    """What NAG guided over one sampling run, for its log line."""

    evaluations: int = 0
    skipped: int = 0  # evaluations inside the window whose model another node's cache skipped
    layers: tuple = ()
    guided_rows: tuple = ()
    rows: tuple = ()
    checked: bool = False

    def add(self, reach: Reach) -> None:
        if not reach.attention:
            self.skipped += 1
            return
        self.evaluations += 1
        self.layers, self.guided_rows, self.rows = (tuple({*v, n}) for v, n in (
            (self.layers, reach.layers), (self.guided_rows, reach.guided_rows), (self.rows, reach.rows)))

    def describe(self) -> str:
        skipped = f" (and {self.skipped} whose model another node skipped)" if self.skipped else ""
        if not self.evaluations:
            return "no evaluation inside its window ran the model" + skipped
        span = lambda v: "-".join(map(str, sorted({min(v), max(v)})))  # noqa: E731
        return (f"evaluations inside its window: {self.evaluations}{skipped}; guided per evaluation: attention layers "
                f"{span(self.layers)}, rows {span(self.guided_rows)} of {span(self.rows)}")


class NagPatch:
    """The hooks of one NAG node: a model-call wrapper, an attention override, (UNets) an attn2 marker, and the
    evaluation and run wrappers that check and log what it reached."""

    def __init__(self, adapter, negative: Negative, params: Params, window: SigmaWindow, model_class: str):
        self.adapter, self.negative, self.params, self.window = adapter, negative, params, window
        self.model_class = model_class
        self._reach: Reach | None = None
        self._run = RunReach()

    def _active(self, sigma: torch.Tensor) -> bool:
        # One device->host read per model call, and only when a window makes NAG depend on sigma
        # (the host reads sigma the same way for every conditioning with a timestep range).
        return self.window.always or self.window.contains(float(sigma.reshape(-1)[0]))

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        transformer_options = transformer_options if transformer_options is not None else {}
        rows = guided_rows(transformer_options, x.shape[0], x.device)
        reach = self._reach if self._reach is not None else Reach()
        reach.calls, reach.rows = reach.calls + 1, reach.rows + x.shape[0]
        if rows is not None and c_crossattn is not None and not self._active(t):
            reach.outside = True
        if rows is None or c_crossattn is None or reach.outside:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        dm = executor.class_obj.diffusion_model
        try:
            p = self.adapter.prepare(dm, x, t, c_concat, c_crossattn, control, kwargs, self.negative, rows)
        except Unsupported as why:
            raise RuntimeError(f"{NODE}: cannot guide this {self.adapter.name} call: {why}") from None
        state = CallState(self.adapter.name, self.adapter.kind, p.layout, Rows(x.shape[0], rows), self.params,
                          identify_by_patch=self.adapter.identify_cross_by_patch, realign=p.realign,
                          text_refiner=self.adapter.text_refiner)
        options = dict(transformer_options)
        options[STATE_KEY] = state
        options["optimized_attention_override"] = functools.partial(
            attention_override, transformer_options.get("optimized_attention_override"), state)
        out = executor(p.x, p.t, p.c_concat, p.context, p.control, options, **p.kwargs)
        reach.guided_rows += len(rows)
        reach.attention += sum(state.calls.values())
        reach.layers = max(reach.layers, sum(state.calls.get(k, 0) for k in ("cross", "joint", "text")))
        return out

    def calc_cond_batch(self, executor, model, conds, x, timestep, model_options, *args, **kwargs):
        """One evaluation's model calls: what they guided, checked at the first evaluation inside the window."""
        reach, outer = Reach(), self._reach
        self._reach = reach
        try:
            out = executor(model, conds, x, timestep, model_options, *args, **kwargs)
        finally:
            self._reach = outer
        if reach.guided_rows:
            self._run.add(reach)
        if not self._run.checked and reach.calls and conds and conds[0] is not None:
            self._check(reach, timestep)  # a call with no positive (the host's [None, uncond]) has nothing to guide
        return out

    def _check(self, reach: Reach, timestep) -> None:
        """Never a silent no-op: stop at the first evaluation inside the window that guided no row or no layer
        (an evaluation whose model another node's cache skipped, where no attention ran, is not checked)."""
        if not reach.guided_rows:
            if not reach.outside and self._active(timestep):
                self._run.checked = True
                raise InputError(NODE, "model", f"is a {self.model_class} whose model calls held no row of the "
                                 "positive prompt (the host's cond_or_uncond 0): another node relabelled or moved "
                                 "the prompts, so NAG would guide nothing")
            return
        if not reach.attention:
            return
        self._run.checked = True
        if reach.layers == 0 and self.params.alpha > 0.0:
            raise InputError(NODE, "model", f"is a {self.model_class} none of whose {reach.attention} attention calls "
                             f"NAG could guide: none attended over the {self.adapter.name} text with the negative's "
                             "tokens NAG appended (another node changed or replaced the text after NAG)")

    def outer_sample(self, executor, *args, **kwargs):
        """One sampling run, logged with what NAG guided in it."""
        self._run = RunReach()
        out = executor(*args, **kwargs)
        log.info("%s on %s (%s): %s", NODE, self.model_class, self.adapter.name, self._run.describe())
        return out

    def attn2_patch(self, n, context, value, extra_options):
        state = extra_options.get(STATE_KEY)
        if state is not None:
            state.cross_pending = True
        return n, context, value


# ---------------------------------------------------------------------------- the node


def _window(model, start_percent: float, end_percent: float) -> SigmaWindow:
    return sigma_window(model.get_model_object("model_sampling"), start_percent, end_percent)


def _adapter(model):
    dm = model.get_model_object("diffusion_model")
    dm = getattr(dm, "_orig_mod", dm)  # a torch.compile'd model keeps its module here
    why = refusal(dm)
    if why is not None:
        raise InputError(NODE, "model", f"is a {type(dm).__name__}, which NAG cannot guide: {why}")
    try:
        adapter = adapter_for(dm)
    except Unsupported as why:
        raise InputError(NODE, "model", f"is a {type(dm).__name__}, which NAG cannot guide on this ComfyUI: {why}") from None
    if adapter is None:
        raise InputError(
            NODE, "model",
            f"is a {type(dm).__name__}, a family NAG does not reach: it guides SD1.x, SD2.x, SDXL, SD3/3.5, Flux, "
            "Chroma, HiDream, Wan 2.1/2.2, LTXV, HunyuanVideo, Qwen-Image and Lumina2 (see docs/nag.md)",
        )
    try:
        adapter.check_model(dm)
    except Unsupported as why:
        raise InputError(NODE, "model", f"cannot be guided by NAG: {why}") from None
    return adapter, dm


def _check_negative(adapter, dm, model, negative) -> None:
    conditioning_width(negative, NODE, "negative")
    if len(negative) != 1:
        raise InputError(NODE, "negative", "must be a single-entry conditioning (one prompt)", len(negative))
    # UNets: check_prompts_fit_model reads their config
    check_context_width(NODE, "negative", int(negative[0][0].shape[-1]), adapter.context_width(dm), model)
    for key in adapter.negative_keys:
        if not isinstance(negative[0][1].get(key), torch.Tensor):
            raise InputError(NODE, "negative", f"must carry '{key}', which {adapter.name} reads with every prompt: "
                                   "encode it with the model's own text encoder")


def _check_unshared(model) -> None:
    wrappers = model.wrappers.get(comfy_wrappers().APPLY_MODEL, {})
    if WRAPPER_KEY in wrappers:
        raise InputError(NODE, "model", "already has Negative Attention Guidance applied: use one NAG node per "
                               "model (one negative prompt)")
    replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2")
    if replaced:
        raise InputError(NODE, "model", "has its cross-attention replaced by another node (an IPAdapter, say), "
                               "which computes attention itself, out of NAG's reach")


def comfy_wrappers():
    import comfy.patcher_extension

    return comfy.patcher_extension.WrappersMP


def apply_nag(model, negative, scale: float, tau: float, alpha: float, norm: str, start_percent: float,
              end_percent: float):
    """Validate and return a clone of ``model`` with NAG's hooks (``model`` itself at scale 1)."""
    with inputs_of(NODE):
        check_parameters(scale, tau, alpha)
    check_choice(NODE, "norm", norm, NORMS, f"must be one of {sorted(NORMS)}")
    check_window(NODE, start_percent, end_percent)
    conditioning_width(negative, NODE, "negative")
    check_model(NODE, model)
    adapter, dm = _adapter(model)
    _check_negative(adapter, dm, model, negative)
    check_prompts_fit_model(NODE, model, [("negative", negative)], pooled=False)
    _check_unshared(model)
    if scale == 1.0:
        return model  # Z~ = Z+: NAG is the identity
    patch = NagPatch(adapter, Negative(negative), Params(float(scale), float(tau), float(alpha), norm),
                     _window(model, start_percent, end_percent), type(dm).__name__)
    m = model.clone()
    wrappers = comfy_wrappers()
    m.add_wrapper_with_key(wrappers.APPLY_MODEL, WRAPPER_KEY, patch.apply_model)
    m.add_wrapper_with_key(wrappers.CALC_COND_BATCH, WRAPPER_KEY, patch.calc_cond_batch)
    m.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, patch.outer_sample)
    if adapter.identify_cross_by_patch:
        m.set_model_attn2_patch(patch.attn2_patch)
    return m


class NegativeAttentionGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Negative Attention Guidance (NAG)",
            category=CATEGORY,
            description="Normalized Attention Guidance (Chen et al. 2025): the negative prompt acts inside every "
            "attention layer, in the same forward as the positive, so it works at cfg 1 on distilled and few-step "
            "models (Flux, Wan with distill LoRAs, SDXL-Lightning, LCM...). With cfg > 1 it adds to the usual "
            "negative prompt.",
            inputs=[
                io.Model.Input("model", tooltip="The model to guide (SD1.x, SDXL, SD3/3.5, Flux, Chroma, HiDream, Wan, "
                               "LTXV, HunyuanVideo, Qwen-Image); it is cloned, never changed."),
                io.Conditioning.Input("negative", tooltip="The negative prompt, encoded by this model's text encoder "
                                      "(one prompt)."),
                io.Float.Input("scale", default=5.0, min=1.0, max=100.0, step=0.1,
                               tooltip="s in Z~ = s Z+ - (s - 1) Z- (1..100; the paper's phi + 1); 1 = off."),
                io.Float.Input("tau", default=2.5, min=1.0, max=100.0, step=0.1,
                               tooltip="Bound on |Z~| / |Z+| per token (1..100)."),
                io.Float.Input("alpha", default=0.25, min=0.0, max=1.0, step=0.01,
                               tooltip="Blend of the bounded result with Z+ (0..1); 0 = off."),
                io.Combo.Input("norm", options=list(NORMS), default="L1",
                               tooltip="Token norm for the bound: L1 (the paper and the ComfyUI port) or L2 (the "
                               "official Flux code)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where NAG starts acting (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where NAG stops acting (1 = last step)."),
            ],
            outputs=[io.Model.Output(tooltip="The patched clone of the model.")],
        )

    @classmethod
    def execute(cls, model, negative, scale, tau, alpha, norm, start_percent, end_percent) -> io.NodeOutput:
        return io.NodeOutput(apply_nag(model, negative, scale, tau, alpha, norm, start_percent, end_percent))


NODES = [NegativeAttentionGuidance]
