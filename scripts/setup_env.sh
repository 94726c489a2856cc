#!/usr/bin/env bash
# Creates .venv with what the tests and the demo need. Sourced by scripts/test.sh and scripts/demo.sh.
# With COMFYUI_PATH set it also installs the host's requirements (torch pinned to the CPU build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEGATIVE_GUIDANCE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "torch==2.13.0" "numpy>=1.25,<3" "pillow>=10" "pytest==8.*" "hypothesis==6.*" "diffusers==0.35.2"

if [ -n "${COMFYUI_PATH:-}" ]; then
  if [ ! -f "$COMFYUI_PATH/requirements.txt" ]; then
    echo "COMFYUI_PATH=$COMFYUI_PATH has no requirements.txt: not a ComfyUI checkout" >&2
    exit 2
  fi
  # The host's own requirements, less the torch family (pinned here: an unpinned torch pulls a CUDA build).
  grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFYUI_PATH/requirements.txt" > "$VENV/comfyui-requirements.txt"
  "${PIP[@]}" "torch==2.13.0" "torchvision==0.28.0" requests "playwright==1.65.*" -r "$VENV/comfyui-requirements.txt"
  "$VENV/bin/python" "$ROOT/scripts/fix_torchvision_cpu.py"
fi
