"""Pure drawing for GuidanceVisualizer: numpy, Pillow and torch only, no host import.

Everything takes and returns plain arrays and images, so it is tested without ComfyUI.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..samplers.trace import STATS

TITLES = ["positive", "negative", "guided", "negative moved"]

# A perceptual dark-to-bright ramp (black, purple, orange, pale yellow) for heatmaps.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
STAT_COLOURS = {"pos_norm": (46, 134, 222), "neg_norm": (231, 76, 60), "cosine": (39, 174, 96),
                "neg_share": (142, 68, 173)}


def latent_to_rgb(latent: torch.Tensor, factors: Sequence | None = None, bias: Sequence | None = None) -> np.ndarray:
    """A [C, H, W] latent to an [H, W, 3] uint8 image with the model's linear RGB factors.

    The host's latent preview does the same (``latent_rgb_factors``, then ``(rgb + 1) / 2``); with no
    factors, the first three channels are stretched to their own range.
    """
    lat = latent.detach().float().cpu()
    if factors is not None and len(factors) == lat.shape[0]:
        rgb = torch.einsum("chw,cr->hwr", lat, torch.tensor(factors, dtype=torch.float32))
        if bias is not None:
            rgb = rgb + torch.tensor(bias, dtype=torch.float32)
        rgb = ((rgb + 1.0) / 2.0).clamp(0, 1)
    else:
        rgb = lat[:3].permute(1, 2, 0)
        if rgb.shape[-1] < 3:
            rgb = rgb.mean(-1, keepdim=True).expand(*rgb.shape[:2], 3)
        lo, hi = rgb.amin(), rgb.amax()
        rgb = (rgb - lo) / (hi - lo).clamp_min(1e-12)
    return (rgb.numpy() * 255).round().astype(np.uint8)


def magnitude(diff: torch.Tensor) -> np.ndarray:
    """Per-pixel L2 norm over channels of a [C, H, W] difference."""
    return diff.detach().float().cpu().norm(dim=0).numpy()


def heatmap(mag: np.ndarray, vmax: float) -> np.ndarray:
    """Colour a magnitude map with the ramp, 0 to ``vmax``; an [H, W, 3] uint8 image."""
    t = np.clip(mag / max(vmax, 1e-12), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_RAMP) - 2)
    frac = (t - lo)[..., None]
    return (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).round().astype(np.uint8)


def _fit(img: np.ndarray, cell: int, nearest: bool) -> Image.Image:
    pil = Image.fromarray(img)
    return pil.resize((cell, cell), Image.NEAREST if nearest else Image.BILINEAR)


def strips(rows: Sequence[tuple], titles: Sequence[str], cell: int = 128, label_width: int = 110) -> Image.Image:
    """A grid: one row per shown step, ``(label lines, [images...])``, with column titles on top."""
    cols = max(len(images) for _, images in rows) if rows else len(titles)
    header = 18
    sheet = Image.new("RGB", (label_width + cols * (cell + 4), header + len(rows) * (cell + 4)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        draw.text((label_width + c * (cell + 4) + 2, 3), title, fill=INK)
    for r, (label, images) in enumerate(rows):
        y = header + r * (cell + 4)
        for i, line in enumerate(label if isinstance(label, (list, tuple)) else [label]):
            draw.text((4, y + 4 + 13 * i), line, fill=INK)
        for c, img in enumerate(images):
            if img is None:
                draw.rectangle([label_width + c * (cell + 4), y, label_width + c * (cell + 4) + cell - 1, y + cell - 1],
                               outline=(200, 200, 200))
                draw.text((label_width + c * (cell + 4) + 6, y + cell // 2 - 6), "not computed", fill=(150, 150, 150))
                continue
            sheet.paste(_fit(img, cell, nearest=c == len(images) - 1), (label_width + c * (cell + 4), y))
    return sheet


def chart(sigmas: Sequence[float], stats: np.ndarray, names: Sequence[str], active: Sequence[bool],
          shown: Sequence[int] = (), width: int = 640, height: int = 200) -> Image.Image:
    """Statistics over the evaluations; grey bands where a negative was active, ticks at shown steps.

    Each series is scaled to its own maximum (cosine to [-1, 1]) and named in the legend with it.
    """
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 40, width - 10, 22, height - 28
    n = len(sigmas)
    x_of = (lambda i: left + (right - left) * (i / max(n - 1, 1)))  # noqa: E731
    for i, on in enumerate(active):
        if on:
            x0 = x_of(i - 0.5) if i > 0 else left
            x1 = x_of(i + 0.5) if i < n - 1 else right
            draw.rectangle([max(left, x0), top, min(right, x1), bottom], fill=(232, 232, 232))
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    for i in shown:
        draw.line([x_of(i), bottom, x_of(i), bottom + 4], fill=INK)
    for i in sorted({0, n // 2, n - 1}) if n else []:
        draw.text((x_of(i) - 12, bottom + 8), f"{sigmas[i]:.2g}", fill=INK)
    draw.text((4, bottom + 8), "sigma", fill=INK)
    legend_x = left
    for k, name in enumerate(names):
        series = stats[:, k] if len(stats) else np.zeros(0)
        if name == "cosine":
            lo, hi = -1.0, 1.0
        else:
            lo, hi = 0.0, float(np.nanmax(series)) if len(series) and np.isfinite(series).any() else 1.0
        hi = hi if hi > lo else lo + 1.0
        points = [(x_of(i), bottom - (bottom - top) * (float(v) - lo) / (hi - lo)) for i, v in enumerate(series)]
        colour = STAT_COLOURS.get(name, INK)
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        elif points:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
        text = f"{name} (max {hi:.2g})" if name != "cosine" else "cosine (-1..1)"
        draw.text((legend_x, 4), text, fill=colour)
        legend_x += 8 + 7 * len(text)
    return img


def stack(images: Sequence[Image.Image]) -> Image.Image:
    width = max(i.width for i in images)
    out = Image.new("RGB", (width, sum(i.height for i in images)), BACKGROUND)
    y = 0
    for img in images:
        out.paste(img, (0, y))
        y += img.height
    return out


def to_comfy_image(img: Image.Image) -> torch.Tensor:
    """A Pillow image to ComfyUI's IMAGE: float32 [1, H, W, 3] in 0..1."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def shown_indices(count: int, steps: int) -> list:
    """``steps`` evaluations spread evenly over ``count`` recorded ones, first and last included."""
    if count == 0:
        return []
    steps = max(1, min(steps, count))
    if steps == 1:
        return [count - 1]
    return sorted({round(i * (count - 1) / (steps - 1)) for i in range(steps)})


def _rgb(preview: torch.Tensor, trace, vae) -> np.ndarray:
    if vae is None:
        return latent_to_rgb(preview[0], trace.meta.get("rgb_factors"), trace.meta.get("rgb_bias"))
    latent_format = trace.meta.get("latent_format")
    lat = preview[:1].float()
    lat = latent_format.process_out(lat) if latent_format is not None else lat
    image = vae.decode(lat)
    while image.ndim > 4:  # video VAEs return [B, T, H, W, 3]
        image = image[:, image.shape[1] // 2]
    return (image[0].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def render(trace, steps: int, vae=None, cell: int = 128, check=None) -> torch.Tensor:
    """The visualizer's picture from a ``samplers.trace.Trace``: one strip per shown step over the chart.

    ``vae`` (anything with ``decode(latent) -> [B, H, W, 3]``) decodes the previews; without it the
    model's linear latent-to-RGB factors recorded in the trace are used. ``check`` (the host's
    interrupt test) is called before each strip.
    """
    shown = shown_indices(len(trace.steps), steps)
    moved = {i: magnitude(trace.steps[i].guided[0].float() - trace.steps[i].pos[0].float()) for i in shown}
    vmax = max((float(np.percentile(m, 99)) for m in moved.values()), default=1.0) or 1.0
    rows = []
    for i in shown:
        if check is not None:
            check()
        step = trace.steps[i]
        images = [_rgb(step.pos, trace, vae), None if step.neg is None else _rgb(step.neg, trace, vae),
                  _rgb(step.guided, trace, vae), heatmap(moved[i], vmax)]
        label = [f"step {i + 1}/{len(trace.steps)}", f"sigma {float(step.sigma[0]):.3g}",
                 {"primary": "negative on", "uncond": "unconditional", "positive": "no guidance"}[step.negative]]
        if step.extras:
            label.append(f"+{step.extras} extra")
        rows.append((label, images))
    sheet = strips(rows, TITLES, cell=cell)
    active = [s.negative != "positive" or s.extras > 0 for s in trace.steps]
    graph = chart(trace.sigmas, trace.stats.numpy(), STATS, active, shown, width=sheet.width)
    return to_comfy_image(stack([sheet, graph]))
