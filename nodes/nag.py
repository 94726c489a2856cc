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

The override hands the call to ``samplers.nag``, which splits the texts again and combines the
attention outputs before the layer's output projection, where the paper puts NAG.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field

import torch
from comfy_api.latest import io

from ..samplers import nag as nag_math
from ..samplers.nag import NORMS, Params, Rows, check_parameters
from ..samplers.schedule import SigmaWindow
from . import _host
from .guidance import CATEGORY
from .nag_families import Unsupported, adapter_for, refusal

log = logging.getLogger(__name__)

NODE = "NegativeAttentionGuidance"
WRAPPER_KEY = "negative_guidance_nag"
STATE_KEY = "negative_guidance_nag"


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


@dataclass
class CallState:
    """What the override needs to know about one model call."""

    family: str
    kind: str
    layout: nag_math.Layout
    rows: Rows
    params: Params
    identify_by_patch: bool = False
    cross_pending: bool = False
    realign: tuple | None = None   # (rotary table, "positive" or "negative"): see nag_families.QwenImage
    text_refiner: bool = False        # the model also attends over its text alone
    calls: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=256)
def _index(values: tuple, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def guided_rows(transformer_options: dict, batch: int, device) -> torch.Tensor | None:
    """The rows of a model call that hold a positive prompt (the host's ``cond_or_uncond`` 0)."""
    chunks = transformer_options.get("cond_or_uncond") or [0]
    per = batch // len(chunks)
    rows = tuple(c * per + r for c, kind in enumerate(chunks) if kind == 0 for r in range(per))
    return _index(rows, device) if rows else None


class NagPatch:
    """The hooks of one NAG node: a model-call wrapper, an attention override, and (UNets) an attn2 marker."""

    def __init__(self, adapter, negative: Negative, params: Params, window: SigmaWindow):
        self.adapter, self.negative, self.params, self.window = adapter, negative, params, window

    def _active(self, sigma: torch.Tensor) -> bool:
        # One device->host read per model call, and only when a window makes NAG depend on sigma
        # (the host reads sigma the same way for every conditioning with a timestep range).
        return self.window.always or self.window.contains(float(sigma.reshape(-1)[0]))

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        transformer_options = transformer_options if transformer_options is not None else {}
        rows = guided_rows(transformer_options, x.shape[0], x.device)
        if rows is None or c_crossattn is None or not self._active(t):
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
        return executor(p.x, p.t, p.c_concat, p.context, p.control, options, **p.kwargs)

    def attn2_patch(self, n, context, value, extra_options):
        state = extra_options.get(STATE_KEY)
        if state is not None:
            state.cross_pending = True
        return n, context, value


# ---------------------------------------------------------------------------- the attention override


def _call_parts(args, kwargs):
    """(q, k, v, mask, a function that calls attention with new q, k, v and mask)."""
    q, k, v = args[:3]
    mask_positional = len(args) > 4
    mask = args[4] if mask_positional else kwargs.get("mask")
    rest = list(args[3:])

    def rebuild(nq, nk, nv, nmask):
        new_args = [nq, nk, nv] + rest
        new_kwargs = dict(kwargs)
        if mask_positional:
            new_args[4] = nmask
        elif "mask" in kwargs or nmask is not None:
            new_kwargs["mask"] = nmask
        return new_args, new_kwargs
    return q, k, v, mask, rebuild


def attention_override(previous, state: CallState, func, *args, **kwargs):
    """The ``optimized_attention_override`` of one guided model call (see ``wrap_attn`` in the host)."""
    def run(a, kw):
        return previous(func, *a, **kw) if previous is not None else func(*a, **kw)

    q, k, v, mask, rebuild = _call_parts(args, kwargs)
    skip = bool(kwargs.get("skip_reshape", False))
    q_dim = 2 if skip else 1
    heads = args[3] if len(args) > 3 else kwargs["heads"]
    call = nag_math.Call(q, k, v, mask, q_dim=q_dim, v_dim=2 if skip else 1,
                         out_dim=2 if kwargs.get("skip_output_reshape", False) else 1, heads=heads)

    def attend(nq, nk, nv, nmask):
        return run(*rebuild(nq, nk, nv, nmask))

    kind = _classify(state, call)
    state.calls[kind] = state.calls.get(kind, 0) + 1
    layout, rows, params = state.layout, state.rows, state.params
    if kind == "pass":
        return run(args, kwargs)
    if kind == "cross":
        return nag_math.cross_attention(attend, call, layout, rows, params)
    if kind == "text":
        return nag_math.text_attention(attend, call, layout, rows)
    if state.realign is not None:
        table, which = state.realign
        pos, neg, _ = layout.joint_indices(q.device)
        index = pos if which == "positive" else neg
        call = dataclasses.replace(call, q=nag_math.rotate_tokens(q, table, q_dim, index, heads),
                                   k=nag_math.rotate_tokens(k, table, q_dim, index, heads))
    if previous is None and mask is None and _exact_host_kernel(func):
        return nag_math.joint_attention_shared_image(attend, call, layout, rows, params)
    return nag_math.joint_attention(attend, call, layout, rows, params)


HOST_KERNELS = {"attention_pytorch", "attention_sub_quad", "attention_split", "attention_basic"}


def _exact_host_kernel(func) -> bool:
    """The host's own exact attention (not a third-party kernel a user chose, such as sage's): the image
    part may then be computed with PyTorch's, once for both texts."""
    return getattr(func, "__module__", None) == "comfy.ldm.modules.attention" and func.__name__ in HOST_KERNELS


def _classify(state: CallState, call: nag_math.Call) -> str:
    lq, lk, layout = call.queries, call.keys, state.layout
    if state.kind == "cross":
        if state.identify_by_patch:
            pending, state.cross_pending = state.cross_pending, False
            if not pending:
                return "pass"
            if lk != layout.text:
                raise RuntimeError(f"{NODE}: a cross-attention of this {state.family} model has {lk} keys, not the "
                                   f"{layout.text} of the two texts: another node changed the text after NAG")
            return "cross"
        if lk == layout.text and lq == lk:
            raise RuntimeError(f"{NODE}: this {state.family} call has as many image tokens as text tokens ({lq}), so "
                               "its self- and cross-attention look alike; change the size or the frame count a little")
        return "cross" if lk == layout.text else "pass"
    if lq != lk:
        raise RuntimeError(f"{NODE}: unexpected cross-attention ({lq} queries, {lk} keys) in a {state.family} model")
    if lq == layout.joint:
        return "joint"
    if not state.text_refiner:
        if lq == layout.image:
            return "pass"  # image-only self-attention (SD3.5's second attention)
        raise RuntimeError(f"{NODE}: an attention call of this {state.family} model has {lq} tokens, neither the "
                           f"{layout.joint} of text and image nor the {layout.image} of the image alone")
    if lq == layout.text == layout.image:
        raise RuntimeError(f"{NODE}: this {state.family} call has as many image tokens as text tokens ({lq}), so its "
                           "text-only and image-only attention look alike; change the size a little")
    if lq == layout.text:
        return "text"  # a text refiner (HunyuanVideo, Lumina2): each text attends only to itself
    if lq == layout.image:
        return "pass"  # image-only self-attention (Lumina2's noise refiner)
    raise RuntimeError(f"{NODE}: an attention call of this {state.family} model has {lq} tokens, neither the "
                       f"{layout.joint} of text and image nor the {layout.image} of the image alone")


# ---------------------------------------------------------------------------- the node


def _window(model, start_percent: float, end_percent: float) -> SigmaWindow:
    return _host._sigma_window(model.get_model_object("model_sampling"), start_percent, end_percent)


def _adapter(model):
    dm = model.get_model_object("diffusion_model")
    dm = getattr(dm, "_orig_mod", dm)  # a torch.compile'd model keeps its module here
    why = refusal(dm)
    if why is not None:
        raise _host.InputError(NODE, "model", f"is a {type(dm).__name__}, which NAG cannot guide: {why}")
    adapter = adapter_for(dm)
    if adapter is None:
        raise _host.InputError(
            NODE, "model",
            f"is a {type(dm).__name__}, a family NAG does not reach: it guides SD1.x, SD2.x, SDXL, SD3/3.5, Flux, "
            "Chroma, HiDream, Wan 2.1/2.2, LTXV, HunyuanVideo and Qwen-Image (see the README's family table)",
        )
    try:
        adapter.check_model(dm)
    except Unsupported as why:
        raise _host.InputError(NODE, "model", f"cannot be guided by NAG: {why}") from None
    return adapter, dm


def _check_negative(adapter, dm, model, negative) -> None:
    _host.conditioning_width(negative, NODE, "negative")
    if len(negative) != 1:
        raise _host.InputError(NODE, "negative", "must be a single-entry conditioning (one prompt)", len(negative))
    width = adapter.context_width(dm)  # UNets: check_prompts_fit_model reads their config
    got = int(negative[0][0].shape[-1])
    if width is not None and got != width:
        family = type(getattr(model.model, "model_config", None)).__name__
        raise _host.InputError(NODE, "negative", f"must have this model's context width ({width}, {family}): it was "
                               "encoded by another family's text encoder", got)
    for key in adapter.negative_keys:
        if not isinstance(negative[0][1].get(key), torch.Tensor):
            raise _host.InputError(NODE, "negative", f"must carry '{key}', which {adapter.name} reads with every prompt: "
                                   "encode it with the model's own text encoder")


def _check_unshared(model) -> None:
    wrappers = model.wrappers.get(comfy_wrappers().APPLY_MODEL, {})
    if WRAPPER_KEY in wrappers:
        raise _host.InputError(NODE, "model", "already has Negative Attention Guidance applied: use one NAG node per "
                               "model (one negative prompt)")
    replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2")
    if replaced:
        raise _host.InputError(NODE, "model", "has its cross-attention replaced by another node (an IPAdapter, say), "
                               "which computes attention itself, out of NAG's reach")


def comfy_wrappers():
    import comfy.patcher_extension

    return comfy.patcher_extension.WrappersMP


def apply_nag(model, negative, scale: float, tau: float, alpha: float, norm: str, start_percent: float,
              end_percent: float):
    """Validate and return a clone of ``model`` with NAG's hooks (``model`` itself at scale 1)."""
    try:
        check_parameters(scale, tau, alpha)
    except ValueError as e:
        name, rest = str(e).split(" ", 1)
        raise _host.InputError(NODE, name, rest) from None
    if norm not in NORMS:
        raise _host.InputError(NODE, "norm", f"must be one of {sorted(NORMS)}", norm)
    _host.check_window(NODE, start_percent, end_percent)
    _host.conditioning_width(negative, NODE, "negative")
    _host.check_model(NODE, model)
    adapter, dm = _adapter(model)
    _check_negative(adapter, dm, model, negative)
    _host.check_prompts_fit_model(NODE, model, [("negative", negative)], pooled=False)
    _check_unshared(model)
    if scale == 1.0:
        return model  # Z~ = Z+: NAG is the identity
    patch = NagPatch(adapter, Negative(negative), Params(float(scale), float(tau), float(alpha), norm),
                     _window(model, start_percent, end_percent))
    m = model.clone()
    m.add_wrapper_with_key(comfy_wrappers().APPLY_MODEL, WRAPPER_KEY, patch.apply_model)
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
