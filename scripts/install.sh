#!/usr/bin/env bash
# Create .venv and install kubetune with the given extras (default: sdk,trainer). Idempotent.
# Usage: scripts/install.sh [EXTRAS]     e.g. scripts/install.sh operator,sdk,trainer,onnx,dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-sdk,trainer}"
python="${PYTHON:-python3}"
if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv python3-dev >/dev/null
  else
    echo "error: $python lacks venv/ensurepip: install python3-venv (apt-get install python3-venv)" >&2
    exit 1
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.kubetune-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras//,/_}"
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[${extras}]"
  touch "$stamp"
fi
