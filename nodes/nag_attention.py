"""NAG's ``optimized_attention_override``: one guided model call's attention, routed by kind.

``nag.NagPatch`` puts ``attention_override`` (bound to the call's ``CallState`` and to the override
that was there before, a sage or flash attention node's) into that call's transformer options.
Each attention call of the forward is classified (cross, joint, text-only, or passed through) by
its token counts, or on UNets by the ``attn2_patch`` marker, and handed to ``samplers.nag``, which
computes every part of attention through the previous override or the host's kernel.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..samplers import nag as nag_math
from ..samplers.nag import Params, Rows

NODE = "NegativeAttentionGuidance"
STATE_KEY = "negative_guidance_nag"

Kind = Literal["cross", "joint", "text", "pass"]
"""How one attention call is guided: cross-attention to the texts, joint text+image attention, a text
refiner's text-only attention, or passed through unchanged (image-only self-attention)."""


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


def _classify(state: CallState, call: nag_math.Call) -> Kind:
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
