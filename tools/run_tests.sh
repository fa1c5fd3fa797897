#!/usr/bin/env bash
# README command (2): set up the environment and run the whole test suite.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/tools/setup_env.sh"
bash "$repo/tools/setup_browser.sh"  # Chromium for tests/test_serve_browser.py (apt-get as root)
venv=${SLIDECHAT_VENV:-$repo/.venv}
cd "$repo"
# two pytest workers (pytest-xdist), one test file each at a time: most tests wait on child processes
# (xtuner train, slidechat commands), so 2 cores finish in ~3/4 of the serial time.
# SLIDECHAT_TEST_WORKERS=0 runs serially (as pytest -x or a debugger wants).
workers=${SLIDECHAT_TEST_WORKERS:-2}
if [ "$workers" = 0 ] || [ "$workers" = 1 ]; then
  exec "$venv/bin/python" -m pytest -q tests "$@"
fi
exec "$venv/bin/python" -m pytest -q -n "$workers" --dist loadfile tests "$@"
