#!/usr/bin/env bash
# README command (2): set up the environment and run the whole test suite.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/tools/setup_env.sh"
venv=${SLIDECHAT_VENV:-$repo/.venv}
cd "$repo"
exec "$venv/bin/python" -m pytest -q tests "$@"
