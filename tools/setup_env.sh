#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with the exact tested versions.
# Re-running is cheap: it reinstalls only when requirements/constraints.txt or setup.py changed.
#   SLIDECHAT_VENV=path  where the venv lives (default: .venv in the repository)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${SLIDECHAT_VENV:-$repo/.venv}
py=${PYTHON:-python3}
stamp_src=$(cat "$repo/requirements/constraints.txt" "$repo/setup.py" "$repo/requirements/web/package-lock.json" \
  | sha256sum | cut -c1-16)
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.slidechat-stamp" 2>/dev/null)" = "$stamp_src" ]; then
  exit 0
fi
echo "[setup] creating environment in $venv (first run downloads ~5 GB of PyTorch wheels)" >&2
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# xtuner 0.2.0 pins transformers==4.48.0; we run it on transformers 5 (README: "The stack"), so it is
# installed without its dependencies, which setup.py's [train] extra lists instead. pip then reports
# that one pin as a conflict; nothing else may conflict (tests/test_stack.py runs `pip check`).
"$venv/bin/python" -m pip install -q -c "$repo/requirements/constraints.txt" --no-deps xtuner==0.2.0
# torchscale (the tests' reference for MUSK's BEiT-3, never imported by slidechat) pins timm==0.6.13 and
# fairscale==0.4.0, which it needs only for activation checkpointing and FSDP: also installed alone.
"$venv/bin/python" -m pip install -q -c "$repo/requirements/constraints.txt" --no-deps torchscale==0.3.0
log=$(mktemp)
if ! "$venv/bin/python" -m pip install -q -c "$repo/requirements/constraints.txt" -e "$repo[train,dev]" >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"; exit 1
fi
grep -v -e "xtuner 0.2.0 requires transformers==4.48.0" -e "torchscale 0.3.0 requires" -e "dependency resolver does not currently" \
  -e "is ignored: it is neither a file nor a directory" "$log" >&2 || true
if ! "$venv/bin/python" -c "import slidechat_compat, xtuner.tools.train" >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"
  echo "[setup] xtuner does not import on this stack (see slidechat_compat.py)" >&2; exit 1
fi
rm -f "$log"
# the browser side of `slidechat serve` (OpenSeadragon, pinned in requirements/web/package-lock.json) from
# the npm registry into the venv; without npm the rest works and `slidechat serve` says what is missing.
web="$venv/share/slidechat-web"
if command -v npm >/dev/null 2>&1; then
  mkdir -p "$web" && cp "$repo/requirements/web/package.json" "$repo/requirements/web/package-lock.json" "$web/"
  if ! (cd "$web" && npm ci --no-audit --no-fund --silent >"$log" 2>&1); then
    cat "$log" >&2; rm -f "$log"; echo "[setup] npm could not install requirements/web (OpenSeadragon)" >&2; exit 1
  fi
  rm -f "$log"
else
  echo "[setup] npm not found: \`slidechat serve\` needs OpenSeadragon (install Node.js, re-run this script)" >&2
fi
echo "$stamp_src" > "$venv/.slidechat-stamp"
echo "[setup] environment ready: $venv" >&2
