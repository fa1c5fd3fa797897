#!/usr/bin/env bash
# README command (1): set up the environment and run the main job end to end on synthetic data.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/tools/setup_env.sh"
venv=${SLIDECHAT_VENV:-$repo/.venv}
cd "$repo"
exec "$venv/bin/slidechat" demo "$@"
