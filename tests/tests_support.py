"""Host-test helpers: the tiny model and friends live in bench/tiny.py, shared with the benchmarks."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import families  # noqa: E402,F401
from tiny import (  # noqa: E402,F401
    UNET_CONFIG,
    cond,
    count_forwards,
    latent,
    make_tiny_sd15,
    random_sd15_clip,
    rel_diff,
    write_tiny_sd15_checkpoint,
)
