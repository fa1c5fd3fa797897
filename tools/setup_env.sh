#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with the exact tested versions.
# Re-running is cheap: it reinstalls only when requirements/constraints.txt or setup.py changed.
#   SLIDECHAT_VENV=path  where the venv lives (default: .venv in the repository)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${SLIDECHAT_VENV:-$repo/.venv}
py=${PYTHON:-python3}
stamp_src=$(cat "$repo/requirements/constraints.txt" "$repo/setup.py" | sha256sum | cut -c1-16)
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.slidechat-stamp" 2>/dev/null)" = "$stamp_src" ]; then
  exit 0
fi
echo "[setup] creating environment in $venv (first run downloads ~5 GB of PyTorch wheels)" >&2
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -c "$repo/requirements/constraints.txt" -e "$repo[train,dev]"
echo "$stamp_src" > "$venv/.slidechat-stamp"
echo "[setup] environment ready: $venv" >&2
