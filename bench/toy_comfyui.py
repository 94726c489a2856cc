"""The pack's main job: what a negative prompt does, in a real ComfyUI, on a model with known truth.

Starts the host's server with this pack (the host ``scripts/comfy_host.py`` finds or makes) and runs
three of ``example_workflows/api`` through its HTTP queue, on the toy model whose text encoder binds
"man" and "mustache" and drops "without" (``NegativeGuidanceToyModel``):

1. "portrait of a man": men with and without a mustache;
2. "portrait of a man without mustache": more mustaches;
3. "portrait of a man" with the negative "mustache": (nearly) none.

Each picture the server saves is fetched back over HTTP and checked for a mustache (its mustache
band is dark). Writes one contact sheet, ``out/toy_comfyui.png``, and logs each graph's mustache share.

    python bench/toy_comfyui.py [--out out/toy_comfyui.png] [--batch 64]
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import comfy_host  # noqa: E402
import comfy_server  # noqa: E402

log = logging.getLogger("negative_guidance.toy_comfyui")
GRAPHS = [
    ("negative_guidance_toy_1_positive", "'portrait of a man'"),
    ("negative_guidance_toy_2_without", "'portrait of a man without mustache'"),
    ("negative_guidance_toy_3_negative", "'portrait of a man', negative 'mustache' (cfg 4)"),
]
COLUMNS = 16


def prompt_of(name: str, batch: int) -> dict:
    prompt = json.loads((ROOT / "example_workflows" / "api" / f"{name}.json").read_text())
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"]["batch_size"] = batch
    return prompt


def decode_png(data: bytes) -> torch.Tensor:
    """A saved PNG as ComfyUI's IMAGE: [1, H, W, 3] in [0, 1]."""
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0)[None]


def contact_sheet(rows: list, out: Path) -> None:
    """One block per graph: its title, its mustache share and its pictures, ``COLUMNS`` to a line."""
    tile = rows[0][2].shape[1]
    lines = [-(-len(r[2]) // COLUMNS) for r in rows]
    sheet = Image.new("RGB", (COLUMNS * tile, sum(n * tile + 22 for n in lines)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for (title, share, pictures), n in zip(rows, lines):
        draw.text((4, y + 5), f"{title}: {share:.0%} with a mustache", fill=(0, 0, 0))
        for j, picture in enumerate(pictures):
            image = Image.fromarray((picture.numpy() * 255).round().astype(np.uint8))
            sheet.paste(image, ((j % COLUMNS) * tile, y + 22 + (j // COLUMNS) * tile))
        y += n * tile + 22
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def run(batch: int, out: Path) -> list:
    comfy_host.load_pack()
    from negative_guidance_pack.samplers import toy

    host = comfy_host.ensure(comfy_host.host())
    rows = []
    with tempfile.TemporaryDirectory(prefix="negative_guidance_demo_") as base:
        started = time.time()
        with comfy_server.serve(str(host.path), Path(base)) as server:
            log.info("ComfyUI %s serving at %s (%.0f s to start)", host.path, server["url"], time.time() - started)
            for name, title in GRAPHS:
                entry = comfy_server.run(server["url"], prompt_of(name, batch))
                if entry["status"]["status_str"] != "success":
                    raise SystemExit(f"{name} did not succeed: {entry['status']}")
                pictures = torch.cat([decode_png(png) for png in comfy_server.images(server["url"], entry)])
                share = float(toy.has_mustache(pictures).float().mean())
                rows.append((title, share, pictures))
                log.info("  %-58s %3d pictures, %5.1f%% with a mustache", title, len(pictures), 100 * share)
    contact_sheet(rows, out)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "toy_comfyui.png")
    parser.add_argument("--batch", type=int, default=64)
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.time()
    try:
        run(opts.batch, opts.out)
    except (comfy_host.HostNotFound, comfy_server.ServerError) as why:
        log.error("error: %s", why)
        return 1
    log.info("contact sheet: %s (%.0f s in all)", opts.out, time.time() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
