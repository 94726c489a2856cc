#!/usr/bin/env bash
# The main job: what a negative prompt does, in a real ComfyUI, on a model with known truth. Finds or
# makes the host and .venv (scripts/setup_env.sh), starts the server with this pack, queues three
# example workflows over its HTTP API, writes out/toy_comfyui.png and logs each mustache share.
# Arguments go to bench/toy_comfyui.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
exec "$VENV/bin/python" "$ROOT/bench/toy_comfyui.py" "$@"
