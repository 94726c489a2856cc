"""What the Guidance Visualizer shows, on the toy picture model (known truth, no ComfyUI).

Samples "man" with the negative "mustache" on toy 24x24 pictures (a face, the same face with a
mustache, ...; ``samplers/toy.py``), records the run with the same ``Trace`` the ComfyUI nodes
use, and renders it with the visualizer's own drawing code. The heatmap should light up where the
mustache would be, and only while the negative acts.

    python bench/trace_demo.py [--out out/trace_demo.png] [--start 0.0]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from PIL import Image
from toy_demo import ROOT, load_pack

log = logging.getLogger("negative_guidance.trace_demo")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "trace_demo.png")
    parser.add_argument("--start", type=float, default=0.0, help="negative_start_percent of the main negative")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--show", type=int, default=5)
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rules, toy = load_pack()
    from negative_guidance_pack.nodes import drawing
    from negative_guidance_pack.samplers.trace import Trace

    trace = Trace(preview_size=32)
    trace.meta.update(rgb_factors=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], rgb_bias=[0.0, 0.0, 0.0])
    run = toy.ToyRun("man", "mustache", 4.0, primary_window=toy.window(opts.start, 1.0))
    x = toy.sample(run, n=1, steps=opts.steps, images=True, trace=trace, seed=3)
    trace.finish()
    image = drawing.render(trace, opts.show, cell=96)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image[0].numpy() * 255).round().astype("uint8")).save(opts.out)
    final = toy.Mixture.for_prompt("man", images=True)
    nearest = min(final.names, key=lambda n: float(((x[0] - toy.image_template(n).flatten().double()) ** 2).sum()))
    log.info("%d evaluations, %d branches; the sample is closest to '%s'; picture: %s",
             run.evaluations, run.branches, nearest, opts.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
