"""Normalized Attention Guidance (NAG; Chen et al. 2025, arXiv 2505.21179): a negative prompt inside attention.

For the attention output ``Z = softmax(QK^T / sqrt(d)) V`` of one layer under the positive text, ``Z+``,
and under the negative text, ``Z-`` (same queries), NAG extrapolates, bounds the result's norm per
token and blends it back, before the layer's output projection:

    Z~ = s * Z+ - (s - 1) * Z-
    Z^ = Z~ * min(r, tau) / r,  r = |Z~| / |Z+|        (per token: norms over all heads' features)
    out = alpha * Z^ + (1 - alpha) * Z+

so a few-step or distilled model run at cfg 1 moves away from the negative in the same forward as the
positive. ``norm`` picks the token norm: ``"L1"`` (the paper, its official code for UNets and SD3, and the
ComfyUI port) or ``"L2"`` (the official Flux code).

The rest of this module routes one attention call of the host through NAG, given where the texts sit
in its token sequence (:class:`Layout`) and which batch rows are guided (:class:`Rows`). The host's
attention function is passed in as ``attend(q, k, v, mask)``, so whatever computes attention
(the host's kernel, another node's override) computes every part of it.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checks import number

NORMS = {"L1": 1, "L2": 2}
EPS = 1e-6  # norms are clamped here, as in the reference port

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def nag(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float, tau: float, alpha: float,
        norm: str = "L1") -> torch.Tensor:
    """The NAG combine of two attention outputs ``[..., features]`` (any float dtype, computed in float32)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
    p = NORMS[norm]
    pos, neg = z_pos.float(), z_neg.float()
    guided = pos * scale - neg * (scale - 1.0)
    ratio = guided.norm(p=p, dim=-1, keepdim=True).clamp_min(EPS) / pos.norm(p=p, dim=-1, keepdim=True).clamp_min(EPS)
    bounded = guided * (ratio.clamp_max(tau) / ratio)
    return (bounded * alpha + pos * (1.0 - alpha)).to(z_pos.dtype)


@dataclass(frozen=True)
class Params:
    """NAG's parameters (the paper's phi + 1 as ``scale``)."""

    scale: float = 5.0
    tau: float = 2.5
    alpha: float = 0.25
    norm: str = "L1"

    def __call__(self, z_pos: torch.Tensor, z_neg: torch.Tensor) -> torch.Tensor:
        return nag(z_pos, z_neg, self.scale, self.tau, self.alpha, self.norm)


LIMITS = {"scale": (1.0, 100.0), "tau": (1.0, 100.0), "alpha": (0.0, 1.0)}


def check_parameters(scale: float, tau: float, alpha: float) -> None:
    """Raise ``ParameterError`` naming the first parameter out of range."""
    for name, value in (("scale", scale), ("tau", tau), ("alpha", alpha)):
        number(name, value, *LIMITS[name])


# ---------------------------------------------------------------------------- token layouts


@dataclass(frozen=True)
class Layout:
    """Where the texts sit in one model call's text stream, and how many image tokens join them.

    ``segments`` lists the text stream's parts in order as ``(positive, negative)`` or ``(positive,
    negative, unused)`` token counts: the pack appends the negative's tokens right after each positive
    part (HiDream has three parts: T5, the last llama layer, the block's llama layer; most models one),
    and sometimes tokens no attention may see (HunyuanVideo's, which keep its text mean). ``image`` is
    the number of image tokens of a joint attention (0 for cross-attention models); ``text_first``
    says whether the text precedes the image in the joint sequence.
    """

    segments: tuple
    image: int = 0
    text_first: bool = True

    @property
    def text(self) -> int:
        return sum(sum(s) for s in self.segments)

    @property
    def joint(self) -> int:
        return self.text + self.image

    def text_indices(self, device) -> tuple:
        """(positive, negative) token indices within the text stream."""
        return _text_indices(self, torch.device(device))

    def joint_indices(self, device) -> tuple:
        """(positive text, negative text, image) token indices within the joint sequence."""
        return _joint_indices(self, torch.device(device))


# made on the device itself (no host-to-device copy) once per layout: the same for every layer and step
@functools.lru_cache(maxsize=64)
def _text_indices(layout: Layout, device: torch.device) -> tuple:
    pos, neg, start = [], [], 0
    for segment in layout.segments:
        p, n = segment[:2]
        pos.append(torch.arange(start, start + p, device=device))
        neg.append(torch.arange(start + p, start + p + n, device=device))
        start += sum(segment)
    return torch.cat(pos), torch.cat(neg)


@functools.lru_cache(maxsize=64)
def _joint_indices(layout: Layout, device: torch.device) -> tuple:
    pos, neg = _text_indices(layout, device)
    offset = 0 if layout.text_first else layout.image
    image_start = layout.text if layout.text_first else 0
    image = torch.arange(image_start, image_start + layout.image, device=device)
    return pos + offset, neg + offset, image


@dataclass(frozen=True)
class Rows:
    """Which rows of a model call are guided (``positive`` indexes them; the others attend to their own
    text only)."""

    batch: int
    positive: torch.Tensor


def rotate_tokens(x: torch.Tensor, table: torch.Tensor, token_dim: int, index: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotate some tokens' queries or keys by a rotary table (``[d/2, 2, 2]``, the host's RoPE layout).

    Rotary embeddings compose: rotating a token embedded at position ``p + o`` by the table of ``-o``
    gives it position ``p``. Models that place text by token index see the appended negative at
    shifted positions; this puts a text back where it would sit alone. ``x`` is ``[B, L, heads * d]``
    (``token_dim`` 1) or ``[B, heads, L, d]`` (``token_dim`` 2).
    """
    part = x.index_select(token_dim, index)
    split = part.unflatten(-1, (heads, -1)) if token_dim == 1 else part
    pairs = split.to(table.dtype).reshape(*split.shape[:-1], -1, 1, 2)
    turned = (table[..., 0] * pairs[..., 0] + table[..., 1] * pairs[..., 1]).reshape(split.shape).to(x.dtype)
    return x.index_copy(token_dim, index, turned.flatten(-2) if token_dim == 1 else turned)


# ---------------------------------------------------------------------------- one attention call


@dataclass(frozen=True)
class Call:
    """One host attention call, normalised: its tensors, their token dimensions, and its mask."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    q_dim: int
    v_dim: int
    out_dim: int
    heads: int = 0

    def heads_first(self, t: torch.Tensor, token_dim: int) -> torch.Tensor:
        """``[B, heads, L, d]`` of a q, k or v (given as that, ``[B, L, heads, d]`` or ``[B, L, heads * d]``)."""
        if t.ndim == 4:
            return t if token_dim == 2 else t.transpose(1, 2)
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def output(self, heads_first: torch.Tensor) -> torch.Tensor:
        """A ``[B, heads, L, d]`` result in this call's output layout."""
        return heads_first if self.out_dim == 2 else heads_first.transpose(1, 2).flatten(2)

    @property
    def queries(self) -> int:
        return self.q.shape[self.q_dim]

    @property
    def keys(self) -> int:
        return self.k.shape[self.q_dim]

    def piece(self, rows: torch.Tensor | None, queries: torch.Tensor | None, keys: torch.Tensor | None):
        """q, k, v and mask restricted to some rows, query tokens and key tokens (``None``: all)."""
        def take(t, dim, index):
            return t if index is None else t.index_select(dim, index)

        q, k, v = (take(t, 0, rows) for t in (self.q, self.k, self.v))
        q = take(q, self.q_dim, queries)
        k = take(k, self.q_dim, keys)
        v = take(v, self.v_dim, keys)
        return q, k, v, self._mask(rows, queries, keys)

    def _mask(self, rows, queries, keys):
        m = self.mask
        if m is None:
            return None
        if rows is not None and m.ndim >= 3 and m.shape[0] == self.q.shape[0] and m.shape[0] > 1:
            m = m.index_select(0, rows)
        if keys is not None and m.shape[-1] == self.keys:
            m = m.index_select(-1, keys)
        if queries is not None and m.ndim >= 2 and m.shape[-2] == self.queries and self.queries > 1:
            m = m.index_select(-2, queries)
        return m


def _attend_pieces(attend: Attend, call: Call, pieces: list) -> list:
    """Attention for each ``(rows, queries, keys)`` piece; pieces of one shape share one call."""
    parts = [call.piece(*p) for p in pieces]
    shapes = {(q.shape[call.q_dim], k.shape[call.q_dim]) for q, k, _, _ in parts}
    masks_batchable = all(m is None for *_, m in parts)
    if len(parts) > 1 and len(shapes) == 1 and masks_batchable:
        sizes = [q.shape[0] for q, *_ in parts]
        out = attend(*(torch.cat(t) for t in zip(*[p[:3] for p in parts])), None)
        return list(out.split(sizes))
    return [attend(*p) for p in parts]


def _to_tokens_last(out: torch.Tensor, out_dim: int) -> torch.Tensor:
    """An attention output as ``[batch, tokens, features]`` (all heads together), NAG's token view."""
    if out_dim == 1:
        return out
    return out.movedim(1, 2).flatten(2)  # [B, heads, L, d] -> [B, L, heads * d]


def _from_tokens_last(z: torch.Tensor, like: torch.Tensor, out_dim: int) -> torch.Tensor:
    if out_dim == 1:
        return z
    b, heads, tokens, d = like.shape[0], like.shape[1], z.shape[1], like.shape[3]
    return z.reshape(b, tokens, heads, d).movedim(2, 1)


def _combine(params: Params, pos_out: torch.Tensor, neg_out: torch.Tensor, out_dim: int) -> torch.Tensor:
    guided = params(_to_tokens_last(pos_out, out_dim), _to_tokens_last(neg_out, out_dim))
    return _from_tokens_last(guided, pos_out, out_dim)


def cross_attention(attend: Attend, call: Call, layout: Layout, rows: Rows, params: Params) -> torch.Tensor:
    """Cross-attention whose keys are the text stream: every row attends to its own text, and the
    guided rows also to the negative's tokens; NAG combines the two for the guided rows."""
    pos, neg = layout.text_indices(call.q.device)
    z, z_neg = _attend_pieces(attend, call, [(None, None, pos), (rows.positive, None, neg)])
    return z.index_copy(0, rows.positive, _combine(params, z.index_select(0, rows.positive), z_neg, call.out_dim))


def joint_attention(attend: Attend, call: Call, layout: Layout, rows: Rows, params: Params) -> torch.Tensor:
    """Joint attention over text and image tokens with the negative's tokens in the same rows.

    Every row attends over its own text and the image (the host's own call); the guided rows' image
    and negative-text tokens also attend over the negative text and the image, the negative text
    stream's own update. The guided rows' image outputs are NAG's combine of the two; the negative
    tokens of unguided rows are never attended to and get zeros.
    """
    pos, neg, image = layout.joint_indices(call.q.device)
    # each view keeps the sequence's own order, so the host's kernel sees what it would see for one text
    plus, minus = torch.cat([pos, image]).sort().values, torch.cat([neg, image]).sort().values
    z_plus, z_minus = _attend_pieces(attend, call, [(None, plus, plus), (rows.positive, minus, minus)])
    d = call.out_dim
    out = z_plus.new_zeros(z_plus.shape[:d] + (layout.joint,) + z_plus.shape[d + 1:])
    out.index_copy_(d, plus, z_plus)
    guided = out.index_select(0, rows.positive)
    img_plus = guided.index_select(d, image)
    guided.index_copy_(d, minus, z_minus)
    if layout.image:
        guided.index_copy_(d, image, _combine(params, img_plus, guided.index_select(d, image), d))
    return out.index_copy(0, rows.positive, guided)


# ---------------------------------------------------------------------------- the image part computed once


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """``softmax(q k^T / sqrt(d)) v`` and the log-sum-exp of each query's logits, ``[B, heads, L, d]``.

    PyTorch's fused kernels return the log-sum-exp alongside the output (it is what lets flash
    attention work in tiles); where none runs, the same is computed in query chunks.
    """
    kernels = {"cuda": (_flash_cuda, _efficient_cuda), "cpu": (_flash_cpu,)}.get(q.device.type, ())
    for kernel in kernels:
        try:
            out, lse = kernel(q, k, v)
            return out, lse[..., :q.shape[2]].float()
        except (RuntimeError, NotImplementedError, AttributeError):
            continue
    return _attention_lse_chunked(q, k, v)


def _flash_cuda(q, k, v):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False)[:2]


def _efficient_cuda(q, k, v):
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]


def _flash_cpu(q, k, v):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)[:2]


def _attention_lse_chunked(q, k, v, budget: int = 1 << 26):
    scale = q.shape[-1] ** -0.5
    step = max(1, budget // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
    outs, lses = [], []
    kf, vf = k.float(), v.float()
    for start in range(0, q.shape[2], step):
        logits = torch.matmul(q[:, :, start:start + step].float(), kf.transpose(-1, -2)) * scale
        lse = torch.logsumexp(logits, dim=-1)
        outs.append(torch.matmul(torch.exp(logits - lse[..., None]), vf).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two key sets, from the attention over each and their log-sum-exps."""
    top = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - top)[..., None], torch.exp(lse_b - top)[..., None]
    return ((out_a.float() * wa + out_b.float() * wb) / (wa + wb)).to(out_a.dtype)


def joint_attention_shared_image(attend: Attend, call: Call, layout: Layout, rows: Rows, params: Params) -> torch.Tensor:
    """:func:`joint_attention` with the image-to-image attention computed once for both texts.

    The image's keys are the same under either text, so an image query's attention splits into its
    attention over the image (done once) and over each text, merged by their log-sum-exps: the exact
    softmax over the union. The text queries go through the host's kernel (``attend``) as before.
    """
    device = call.q.device
    pos, neg, image = layout.joint_indices(device)
    q, k, v = call.heads_first(call.q, call.q_dim), call.heads_first(call.k, call.q_dim), call.heads_first(call.v, call.v_dim)
    take = lambda t, index, r=None: (t if r is None else t.index_select(0, r)).index_select(2, index)
    q_img, k_img, v_img = take(q, image), take(k, image), take(v, image)
    image_out, image_lse = attention_lse(q_img, k_img, v_img)
    plus_img = merge_attention(image_out, image_lse, *attention_lse(q_img, take(k, pos), take(v, pos)))
    minus_img = merge_attention(image_out.index_select(0, rows.positive), image_lse.index_select(0, rows.positive),
                                *attention_lse(take(q, image, rows.positive), take(k, neg, rows.positive),
                                               take(v, neg, rows.positive)))
    plus_keys, minus_keys = torch.cat([pos, image]).sort().values, torch.cat([neg, image]).sort().values
    plus_txt, minus_txt = _attend_pieces(attend, call, [(None, pos, plus_keys), (rows.positive, neg, minus_keys)])
    d = call.out_dim
    plus_img, minus_img = call.output(plus_img), call.output(minus_img)
    out = plus_txt.new_zeros(plus_txt.shape[:d] + (layout.joint,) + plus_txt.shape[d + 1:])
    out.index_copy_(d, pos, plus_txt)
    out.index_copy_(d, image, plus_img)
    guided = out.index_select(0, rows.positive)
    guided.index_copy_(d, neg, minus_txt)
    guided.index_copy_(d, image, _combine(params, plus_img.index_select(0, rows.positive), minus_img, d))
    return out.index_copy(0, rows.positive, guided)


def text_attention(attend: Attend, call: Call, layout: Layout, rows: Rows) -> torch.Tensor:
    """Self-attention over the text stream alone (a text refiner): each text attends only to itself."""
    pos, neg = layout.text_indices(call.q.device)
    z_plus, z_minus = _attend_pieces(attend, call, [(None, pos, pos), (rows.positive, neg, neg)])
    d = call.out_dim
    out = z_plus.new_zeros(z_plus.shape[:d] + (layout.text,) + z_plus.shape[d + 1:])
    out.index_copy_(d, pos, z_plus)
    guided_rows = out.index_select(0, rows.positive)
    guided_rows.index_copy_(d, neg, z_minus)
    return out.index_copy(0, rows.positive, guided_rows)
