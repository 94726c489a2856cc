#!/usr/bin/env bash
# The main job: what a negative prompt does, on the analytic toy model (no ComfyUI, no weights).
# Writes out/toy_demo.png and logs the figures it drew. Arguments go to bench/toy_demo.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
exec "$VENV/bin/python" "$ROOT/bench/toy_demo.py" "$@"
