#!/usr/bin/env bash
# The test command: sets up .venv, then runs every test. Host tests run when COMFYUI_PATH points
# at a ComfyUI checkout and skip with the reason otherwise.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
