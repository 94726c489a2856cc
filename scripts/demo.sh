#!/usr/bin/env bash
# The main job: the pack's sampler against KSampler in the real host, on a tiny random model.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${COMFYUI_PATH:-}" ]; then
  echo "COMFYUI_PATH must point at a ComfyUI checkout (see README)" >&2
  exit 2
fi
source "$ROOT/scripts/setup_env.sh"
exec "$VENV/bin/python" "$ROOT/bench/demo_host.py" "$@"
