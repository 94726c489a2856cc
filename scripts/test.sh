#!/usr/bin/env bash
# The test command: finds or makes the host and .venv (scripts/setup_env.sh), makes sure Chromium is
# there for the browser test, lints the pack (ruff, configured in pyproject.toml: any finding fails the
# run), then runs every test. Arguments go to pytest. A test skipped for want of the host, the browser or
# an oracle fails the run (tests/conftest.py); only GPU-only checks may skip.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
source "$ROOT/scripts/chromium.sh"
cd "$ROOT"
"$VENV/bin/ruff" check --quiet . || { echo "error: ruff found the findings above (fix them, or run ruff check --fix)" >&2; exit 1; }
exec "$VENV/bin/python" -m pytest "$@"
