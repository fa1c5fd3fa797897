#!/usr/bin/env bash
# Make sure the browser the `slidechat serve` browser tests drive is installed: the distribution's Chromium
# (/usr/bin/chromium, Debian package "chromium"). Playwright is pointed at it, so nothing is downloaded at
# test time. Fast and silent when it is already there; installs it with apt-get when run as root.
set -euo pipefail
chromium=/usr/bin/chromium
if [ -x "$chromium" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  log=$(mktemp)
  echo "[setup] installing chromium (apt-get) for the browser tests" >&2
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"
    echo "[setup] apt-get could not install chromium (needed by tests/test_serve_browser.py)" >&2
    exit 1
  fi
  rm -f "$log"
  if [ -x "$chromium" ]; then
    exit 0
  fi
  echo "[setup] chromium was installed but $chromium is missing" >&2
  exit 1
fi
echo "[setup] $chromium missing: install it as root with \`apt-get install chromium\` (needed by tests/test_serve_browser.py)" >&2
exit 1
