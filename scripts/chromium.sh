#!/usr/bin/env bash
# Sourced by scripts/test.sh: installs Debian's Chromium for the browser test when it is missing
# (playwright drives it; it downloads no browser). Output goes to the setup log; a failure is reported,
# and the browser test then fails with the reason.
CHROMIUM_BIN="${NEGATIVE_GUIDANCE_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM_BIN" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser test (log: $SETUP_LOG)"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >> "$SETUP_LOG" 2>&1 \
      || echo "warning: could not install chromium (see $SETUP_LOG): the browser test will fail" >&2
  else
    echo "warning: no Chromium at $CHROMIUM_BIN and no root apt-get to install it: the browser test will fail;" \
      "install Debian's 'chromium' or set NEGATIVE_GUIDANCE_CHROMIUM" >&2
  fi
fi
