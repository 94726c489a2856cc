"""What separates two conditionings: per-token distances, an overall cosine, two ways to take one
from the other, a text report and a bar chart. Pure torch + numpy + Pillow; no host import.

A conditioning's token tensor is ``[batch, tokens, width]`` (CLIP-L: 77 x 768 per 75-word chunk;
SDXL: 77 x 2048 with a ``[batch, 1280]`` pooled vector). Two of different lengths are aligned as the
host aligns them to batch them (``comfy/conds.py`` ``CONDCrossAttn.can_concat``/``concat``): the
shorter is repeated along the token axis up to the least common multiple, and the host refuses
when that would repeat one more than ``MAX_REPEAT`` (4) times. Repeating keys and values leaves
cross-attention unchanged, which is why the host may do it.

Distances are per token: ``1 - cos(a_t, b_t)`` (scale-free, in [0, 2], what the chart shows) and
``||a_t - b_t||``, averaged over the batch. The overall cosine is that of the two whole aligned
token tensors, flattened (all entries together); 1 means the same direction.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .checks import choice

MAX_REPEAT = 4
MODES = ("subtract", "project_out")
LABEL_KEYS = ("token_labels", "token_strings", "tokens")
EPS = 1e-12
MAX_PANELS = 4


# ---------------------------------------------------------------------------- alignment


def repeat_factors(n_a: int, n_b: int, max_repeat: int = MAX_REPEAT) -> tuple[int, int] | None:
    """How often to repeat a's and b's tokens to align them, or None where the host refuses.

    Mirrors ``CONDCrossAttn.can_concat``: lcm of the lengths, refused when lcm // min > 4.
    """
    if n_a <= 0 or n_b <= 0:
        return None
    if n_a == n_b:
        return 1, 1
    lcm = math.lcm(n_a, n_b)
    if lcm // min(n_a, n_b) > max_repeat:
        return None
    return lcm // n_a, lcm // n_b


def align(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat the token axis as the host's ``CONDCrossAttn.concat`` does; broadcast a batch-1 ``b``."""
    factors = repeat_factors(a.shape[1], b.shape[1])
    if factors is None:
        raise ValueError(f"token counts {a.shape[1]} and {b.shape[1]} need a repeat factor above {MAX_REPEAT}")
    if b.shape[0] not in (1, a.shape[0]):
        raise ValueError(f"batch sizes {a.shape[0]} and {b.shape[0]} do not broadcast")
    ra, rb = factors
    a2 = a.repeat(1, ra, 1) if ra > 1 else a
    b2 = b.to(a.device).repeat(1, rb, 1) if rb > 1 else b.to(a.device)
    return a2, b2.expand(a2.shape[0], -1, -1)


# ---------------------------------------------------------------------------- combining


def subtract(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``a - scale * b``, computed in float32 and cast back to a's dtype."""
    return (a.float() - scale * b.float()).to(a.dtype)


def project_out(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Remove from every vector of ``a`` (last axis) ``scale`` times its component along the matching
    vector of ``b``: per token for ``[batch, tokens, width]``, per sample for pooled ``[batch, width]``.

    The per-vector projection of Perp-Neg (Armandpour et al. 2023) and APG (Sadat et al. 2024),
    done in float64 and cast back; a zero vector of ``b`` leaves ``a`` unchanged.
    """
    a64, b64 = a.double(), b.double()
    dot = (a64 * b64).sum(-1, keepdim=True)
    norm2 = (b64 * b64).sum(-1, keepdim=True)
    coef = torch.where(norm2 > EPS, dot / norm2.clamp_min(EPS), torch.zeros_like(dot))
    return (a64 - scale * coef * b64).to(a.dtype)


def combine(mode: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Apply one of ``MODES`` to aligned tensors."""
    if mode == "subtract":
        return subtract(a, b, scale)
    if mode == "project_out":
        return project_out(a, b, scale)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# ---------------------------------------------------------------------------- distances


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two tensors flattened; 1 when both are zero, 0 when only one is."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = float(a64.norm()), float(b64.norm())
    if na <= EPS and nb <= EPS:
        return 1.0
    if na <= EPS or nb <= EPS:
        return 0.0
    return max(-1.0, min(1.0, float(a64 @ b64) / (na * nb)))


def overall_cosine(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Cosine of all aligned pairs taken together as one long vector."""
    a = torch.cat([x.double().reshape(-1) for x, _ in pairs])
    b = torch.cat([y.double().reshape(-1).to(a.device) for _, y in pairs])
    return cosine(a, b)


@dataclass(frozen=True)
class TokenStats:
    """Per-token numbers, averaged over the batch: 1 - cos, L2 distance, and both norms."""

    cosine_distance: np.ndarray
    l2: np.ndarray
    norm_a: np.ndarray
    norm_b: np.ndarray


def token_stats(a: torch.Tensor, b: torch.Tensor) -> TokenStats:
    """Distances of aligned ``[batch, tokens, width]`` tensors, token by token."""
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(dim=-1), b64.norm(dim=-1)
    dot = (a64 * b64).sum(-1)
    denom = na * nb
    cos = torch.where(denom > EPS, dot / denom.clamp_min(EPS), torch.zeros_like(dot))
    both_zero = (na <= EPS) & (nb <= EPS)
    cos = torch.where(both_zero, torch.ones_like(cos), cos).clamp(-1.0, 1.0)
    mean = lambda t: t.mean(0).cpu().numpy()  # noqa: E731
    return TokenStats(mean(1.0 - cos), mean((a64 - b64).norm(dim=-1)), mean(na), mean(nb))


# ---------------------------------------------------------------------------- labels


def clean_label(label: str) -> str:
    """CLIP's BPE pieces made readable: 'man</w>' -> 'man', '<|endoftext|>' -> '<end>'."""
    text = str(label).replace("</w>", "")
    return {"<|startoftext|>": "<start>", "<|endoftext|>": "<end>"}.get(text, text)


def labels_from(extra: dict, n_tokens: int) -> list[str] | None:
    """Token strings a node put in the conditioning dict (``LABEL_KEYS``), when they fit its tokens."""
    for key in LABEL_KEYS:
        value = extra.get(key)
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
            value = value[0]  # one list per sample: the first sample's
        if isinstance(value, (list, tuple)) and len(value) == n_tokens and all(isinstance(v, str) for v in value):
            return [clean_label(v) for v in value]
    return None


def token_labels(labels_a: list[str] | None, labels_b: list[str] | None, ra: int, rb: int,
                 n_tokens: int) -> tuple[list[str], bool]:
    """Labels of the aligned tokens ('a|b' where they differ), and whether any came from the dicts."""
    la = labels_a * ra if labels_a else None
    lb = labels_b * rb if labels_b else None
    if la is None and lb is None:
        return [str(t) for t in range(n_tokens)], False
    out = []
    for t in range(n_tokens):
        x, y = (la[t] if la else None), (lb[t] if lb else None)
        out.append(x if y is None or x == y else (y if x is None else f"{x}|{y}"))
    return out, True


# ---------------------------------------------------------------------------- one entry


@dataclass
class EntryDiff:
    """Everything the report and the chart need about one [tensor, dict] pair."""

    index: int
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    factors: tuple[int, int]
    stats: TokenStats
    labels: list[str]
    labelled: bool
    cosine: float
    pooled_cosine: float | None = None
    pooled_note: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.labels)

    def top(self, k: int) -> list[int]:
        """Token indices with the largest cosine distance, largest first (ties: first token first)."""
        order = np.argsort(-self.stats.cosine_distance, kind="stable")
        return [int(i) for i in order[:k]]


def diff_entry(index: int, a: torch.Tensor, b: torch.Tensor, extra_a: dict,
               extra_b: dict) -> tuple[EntryDiff, torch.Tensor, torch.Tensor]:
    """Align one pair and measure it; returns the diff and the aligned tensors."""
    a2, b2 = align(a, b)
    ra, rb = repeat_factors(a.shape[1], b.shape[1])
    labels, labelled = token_labels(labels_from(extra_a, a.shape[1]), labels_from(extra_b, b.shape[1]),
                                    ra, rb, a2.shape[1])
    entry = EntryDiff(index, tuple(a.shape), tuple(b.shape), (ra, rb), token_stats(a2, b2), labels, labelled,
                      cosine(a2, b2))
    return entry, a2, b2


def pooled_of(extra: dict) -> torch.Tensor | None:
    """The pooled vector of a conditioning dict (SDXL's ``pooled_output``), or None."""
    value = extra.get("pooled_output")
    return value if isinstance(value, torch.Tensor) else None


def combine_pooled(mode: str, pa: torch.Tensor, pb: torch.Tensor, scale: float) -> torch.Tensor:
    """Pooled vectors ``[batch, width]`` combined as the tokens are (each sample one vector)."""
    pb = pb.to(pa.device).expand(pa.shape[0], *pa.shape[1:]) if pb.shape[0] == 1 else pb.to(pa.device)
    return combine(mode, pa, pb, scale)


# ---------------------------------------------------------------------------- report


def _shape(s: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(x)) for x in s) + "]"


def format_report(entries: Sequence[EntryDiff], overall: float, mode: str, scale: float, top_k: int = 8) -> str:
    """A plain-text report: overall cosine, then per entry the largest distances and every token."""
    lines = [
        f"ConditioningDiff: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}; output = "
        + (f"a - {scale:g} * b" if mode == "subtract"
           else f"a with {scale:g} x its component along b removed, per token"),
        f"overall cosine similarity: {overall:.4f}  (1 = same direction; distance per token = 1 - cos)",
    ]
    for e in entries:
        lines.append("")
        lines.append(
            f"entry {e.index}: a {_shape(e.shape_a)} x{e.factors[0]}, b {_shape(e.shape_b)} x{e.factors[1]} "
            f"-> {e.n_tokens} tokens; cosine {e.cosine:.4f}"
            + ("" if e.pooled_cosine is None else f"; pooled cosine {e.pooled_cosine:.4f}")
            + (f"; {e.pooled_note}" if e.pooled_note else "")
        )
        lines.extend(f"  note: {n}" for n in e.notes)
        if not e.labelled:
            lines.append("  (no token strings in the conditioning: tokens are labelled by index)")
        s = e.stats
        top = [t for t in e.top(min(top_k, e.n_tokens)) if s.cosine_distance[t] > 1e-9 or s.l2[t] > 1e-9]
        lines.append("  largest distances (1 - cos, L2):" + ("" if top else " none, the tokens are identical"))
        for t in top:
            lines.append(f"    #{t:<4d} {e.labels[t][:24]:<24s} {s.cosine_distance[t]:.4f}  {s.l2[t]:.4f}")
        lines.append(f"  {'token':>5s}  {'label':<16s} {'1-cos':>7s} {'L2':>9s} {'|a|':>9s} {'|b|':>9s}")
        for t in range(e.n_tokens):
            lines.append(
                f"  {t:>5d}  {e.labels[t][:16]:<16s} {s.cosine_distance[t]:7.4f} {s.l2[t]:9.4f} "
                f"{s.norm_a[t]:9.4f} {s.norm_b[t]:9.4f}"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- chart


@dataclass(frozen=True)
class Layout:
    """Geometry of one chart panel: the plot area and the bar pitch, in pixels."""

    width: int
    left: int
    pitch: int
    plot_top: int
    plot_bottom: int
    panel_height: int

    def bar_x(self, t: int) -> tuple[int, int]:
        """Left and right pixel column of token ``t``'s bar."""
        x0 = self.left + t * self.pitch
        gap = 1 if self.pitch >= 4 else 0
        return x0 + gap, x0 + self.pitch - 1 - gap


HEADER = 34
BACKGROUND = (250, 250, 247)
AXIS = (60, 60, 60)
GRID = (220, 220, 215)


def layout(n_tokens: int) -> Layout:
    """Bars 4..24 px wide so that 77 or 154 tokens fit about 1200 px."""
    pitch = max(4, min(24, 1200 // max(n_tokens, 1)))
    left, right = 64, 24
    width = max(560, left + pitch * n_tokens + right)
    plot_top = 34
    plot_bottom = plot_top + 220
    return Layout(width, left, pitch, plot_top, plot_bottom, plot_bottom + 78)


def nice_ceiling(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= x (axis tops people can read)."""
    if not x > 0 or not math.isfinite(x):
        return 1.0
    base = 10.0 ** math.floor(math.log10(x))
    return next(m * base for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * base >= x * (1 - 1e-12))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _color(v: float) -> tuple[int, int, int]:
    """Blue (small) -> orange -> red (largest) for a value in [0, 1]."""
    stops = [(0.0, (80, 120, 200)), (0.6, (240, 165, 60)), (1.0, (210, 45, 40))]
    v = min(max(v, 0.0), 1.0)
    for (x0, c0), (x1, c1) in zip(stops, stops[1:]):
        if v <= x1:
            f = (v - x0) / (x1 - x0)
            return tuple(int(round(c0[i] + f * (c1[i] - c0[i]))) for i in range(3))
    return stops[-1][1]


def _vertical_text(img, xy, text: str, font, fill) -> None:
    """Draw ``text`` rotated 90 degrees (reading upwards) with its top-left corner at ``xy``."""
    from PIL import Image, ImageDraw

    box = ImageDraw.Draw(img).textbbox((0, 0), text, font=font)
    w, h = max(1, box[2] - box[0]), max(1, box[3] - box[1] + 2)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).text((-box[0], -box[1]), text, font=font, fill=255)
    mask = mask.rotate(90, expand=True)
    img.paste(Image.new("RGB", mask.size, fill), (int(xy[0]), int(xy[1])), mask)


def _draw_panel(img, top: int, entry: EntryDiff, lay: Layout) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    small, body = _font(11), _font(13)
    d = entry.stats.cosine_distance
    peak = float(d.max()) if d.size else 0.0
    ymax = nice_ceiling(peak * 1.1) if peak > 1e-9 else 1.0
    y0, y1 = top + lay.plot_top, top + lay.plot_bottom
    x_end = lay.left + lay.pitch * entry.n_tokens
    title = (f"entry {entry.index}: 1 - cos per token ({entry.n_tokens} tokens), cosine {entry.cosine:.4f}, "
             f"largest {peak:.4f} at token {entry.top(1)[0] if d.size else '-'}")
    if entry.pooled_cosine is not None:
        title += f", pooled cosine {entry.pooled_cosine:.4f}"
    draw.text((lay.left, top + 8), title, font=body, fill=AXIS)
    for frac in (0.0, 0.5, 1.0):
        y = y1 - frac * (y1 - y0)
        draw.line([(lay.left, y), (x_end, y)], fill=GRID if frac else AXIS)
        draw.text((4, y - 7), f"{frac * ymax:.3g}", font=small, fill=AXIS)
    for t, v in enumerate(d):
        xa, xb = lay.bar_x(t)
        h = int(round((y1 - y0) * float(v) / ymax))
        if h > 0:
            draw.rectangle([xa, y1 - h, xb, y1 - 1], fill=_color(float(v) / (peak if peak > 0 else 1.0)))
    _draw_labels(img, top, entry, lay, ymax)


def _draw_labels(img, top: int, entry: EntryDiff, lay: Layout, ymax: float) -> None:
    """Token labels under the bars (every one if they fit, else every k-th), and the peaks named."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    small = _font(11)
    y1 = top + lay.plot_bottom
    n = entry.n_tokens
    if entry.labelled and lay.pitch >= 11:
        for t in range(n):
            xa, xb = lay.bar_x(t)
            _vertical_text(img, ((xa + xb) // 2 - 6, y1 + 4), entry.labels[t][:10], small, AXIS)
    else:
        every = next(k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10 ** 9) if k * lay.pitch >= 26)
        for t in range(0, n, every):
            xa, xb = lay.bar_x(t)
            draw.line([((xa + xb) // 2, y1), ((xa + xb) // 2, y1 + 3)], fill=AXIS)
            draw.text((xa, y1 + 5), str(t), font=small, fill=AXIS)
    d = entry.stats.cosine_distance
    peak = float(d.max()) if d.size else 0.0
    placed: list[tuple[int, int, int]] = []  # x0, x1, y of the names already drawn
    for t in entry.top(3):
        v = float(d[t])
        if v <= 1e-9 or v < 0.25 * peak:
            continue
        xa, xb = lay.bar_x(t)
        h = int(round((lay.plot_bottom - lay.plot_top) * v / ymax))
        text = f"{entry.labels[t][:14]} {v:.3f}" if entry.labelled else f"#{t} {v:.3f}"
        box = draw.textbbox((0, 0), text, font=small)
        w = box[2] - box[0]
        x = min(max(lay.left, (xa + xb) // 2 - w // 2), lay.width - w - 2)
        y = max(top + lay.plot_top - 14, y1 - h - 15)
        while any(x < p1 + 4 and p0 < x + w + 4 and abs(y - py) < 13 for p0, p1, py in placed):
            y -= 13  # stack names of neighbouring peaks instead of overprinting them
        placed.append((x, x + w, y))
        draw.text((x, y), text, font=small, fill=(120, 20, 20))


def draw_chart(entries: Sequence[EntryDiff], overall: float) -> np.ndarray:
    """The chart as a float32 ``[H, W, 3]`` array in [0, 1]: one bar panel per entry (at most 4)."""
    from PIL import Image, ImageDraw

    shown = list(entries[:MAX_PANELS])
    lays = [layout(e.n_tokens) for e in shown]
    width = max(lay.width for lay in lays)
    height = HEADER + sum(lay.panel_height for lay in lays)
    img = Image.new("RGB", (width, height), BACKGROUND)
    head = f"ConditioningDiff: overall cosine similarity {overall:.4f} (1 = same direction)"
    if len(entries) > MAX_PANELS:
        head += f"; {len(entries) - MAX_PANELS} more entries in the report"
    ImageDraw.Draw(img).text((12, 10), head, font=_font(15), fill=AXIS)
    top = HEADER
    for entry, lay in zip(shown, lays):
        _draw_panel(img, top, entry, lay)
        top += lay.panel_height
    return np.asarray(img, dtype=np.float32) / 255.0


# ---------------------------------------------------------------------------- whole conditionings


@dataclass
class DiffResult:
    """What ConditioningDiff outputs: the new conditioning, the cosine, the report and the chart."""

    conditioning: list
    cosine: float
    entries: list[EntryDiff]
    report: str
    chart: np.ndarray


def _out_dict(extra_a: dict, extra_b: dict, entry: EntryDiff, mode: str, scale: float, n_a: int) -> dict:
    """A copy of a's dict: pooled vectors combined like the tokens, token labels repeated with a."""
    out = dict(extra_a)
    pa, pb = pooled_of(extra_a), pooled_of(extra_b)
    if pa is not None and pb is not None:
        out["pooled_output"] = combine_pooled(mode, pa, pb, scale)
        entry.pooled_cosine = cosine(pa, pb.expand(pa.shape[0], *pb.shape[1:]) if pb.shape[0] == 1 else pb)
    elif pa is not None:
        entry.pooled_note = "only a has a pooled_output: copied unchanged"
    elif pb is not None:
        entry.pooled_note = "only b has a pooled_output: ignored"
    ra = entry.factors[0]
    if ra > 1:
        for key in LABEL_KEYS:
            value = extra_a.get(key)
            if isinstance(value, (list, tuple)) and len(value) == n_a and all(isinstance(v, str) for v in value):
                out[key] = list(value) * ra
        entry.notes.append(f"a was repeated {ra}x along the tokens (as the host pads to batch them)")
    if entry.factors[1] > 1:
        entry.notes.append(f"b was repeated {entry.factors[1]}x along the tokens")
    return out


def diff_conditionings(a: Sequence, b: Sequence, mode: str = "subtract", scale: float = 1.0,
                       check: Callable[[], None] | None = None) -> DiffResult:
    """Diff two conditionings (lists of ``[tensor, dict]``) entry by entry; a one-entry ``b`` applies to
    every entry of ``a``. Inputs are never changed: new lists, copied dicts, new tensors. ``check``
    (e.g. the host's interrupt test) is called before each entry, the report and the chart."""
    check = check or (lambda: None)
    choice("mode", mode, MODES)
    if len(b) not in (1, len(a)):
        raise ValueError(f"b has {len(b)} entries; it needs 1 or as many as a ({len(a)})")
    out, entries, pairs = [], [], []
    for i, (ta, da) in enumerate(a):
        check()
        tb, db = b[i] if len(b) > 1 else b[0]
        entry, a2, b2 = diff_entry(i, ta, tb, da, db)
        out.append([combine(mode, a2, b2, scale), _out_dict(da, db, entry, mode, scale, ta.shape[1])])
        entries.append(entry)
        pairs.append((a2, b2))
    overall = overall_cosine(pairs)
    check()
    report = format_report(entries, overall, mode, scale)
    check()
    return DiffResult(out, overall, entries, report, draw_chart(entries, overall))
