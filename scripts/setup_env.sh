#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/demo.sh: finds or makes the host release COMFYUI_VERSION asks
# for (the newest tested when unset; scripts/comfy_host.py), then makes .venv/<version> with that host's
# requirements and the test tools, torch pinned to the CPU build: one venv per release, since each pins its
# own frontend. pip runs only when what it would install changed; its output goes to .venv/<version>/setup.log,
# printed on failure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
COMFYUI_VERSION="$("$PY" "$ROOT/scripts/comfy_host.py" version)"
export COMFYUI_VERSION
VENV="${NEGATIVE_GUIDANCE_VENV:-$ROOT/.venv/$COMFYUI_VERSION}"
SETUP_LOG="$VENV/setup.log"

# The pack's own test tools; the host's requirements follow, less the torch family: an unpinned torch
# pulls a CUDA build of several GB, and PyPI's torchvision only imports beside it once patched.
TEST_REQUIREMENTS=("torch==2.13.0" "torchvision==0.28.0" "numpy>=1.25,<3" "pillow>=10" "pytest==8.*"
  "hypothesis==6.*" "diffusers==0.35.2" "requests" "playwright==1.65.*" "ruff==0.17.6")

setup_failed() {
  echo "error: $1; the last lines of $SETUP_LOG:" >&2
  tail -n 40 "$SETUP_LOG" >&2 || true
  exit 1
}

COMFYUI_PATH="$("$PY" "$ROOT/scripts/comfy_host.py" host)"
export COMFYUI_PATH

if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV" || { echo "error: $PY -m venv $VENV failed" >&2; exit 1; }
fi

HOST_REQUIREMENTS="$VENV/host-requirements.txt"
grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFYUI_PATH/requirements.txt" > "$HOST_REQUIREMENTS"
STAMP="$VENV/.requirements.sha256"
WANTED="$( { printf '%s\n' "${TEST_REQUIREMENTS[@]}"; cat "$HOST_REQUIREMENTS" "$ROOT/scripts/fix_torchvision_cpu.py"; } \
  | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANTED" ]; then
  echo "installing the host's requirements and the test tools into $VENV (log: $SETUP_LOG)"
  {
    "$VENV/bin/python" -m pip install --disable-pip-version-check "${TEST_REQUIREMENTS[@]}" -r "$HOST_REQUIREMENTS" \
      && "$VENV/bin/python" "$ROOT/scripts/fix_torchvision_cpu.py"
  } > "$SETUP_LOG" 2>&1 || setup_failed "pip could not install the requirements"
  echo "$WANTED" > "$STAMP"
fi
