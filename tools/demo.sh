#!/usr/bin/env bash
# README command (1): set up the environment and run the main job end to end on synthetic data.
# The terminal shows one line per step and a closing summary (also in work_dirs/demo/summary.txt);
# the steps' full output is in work_dirs/demo/demo.log. Flags go to `slidechat demo` (--fresh, --show-output).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/tools/setup_env.sh"
venv=${SLIDECHAT_VENV:-$repo/.venv}
cd "$repo"
exec "$venv/bin/slidechat" demo "$@"
