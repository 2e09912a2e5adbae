#!/usr/bin/env bash
# Set up lvr on a fresh machine: ffmpeg, a virtualenv in .venv, torch (CPU
# wheel, pinned) and the package. `--dev` adds the test tools.
# Usage: bash scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"

if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then
  echo "setup: installing ffmpeg" >&2
  SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg >/dev/null
fi

# --dev: headless Chromium renders trace pages in tests/test_trace_html.py.
if [[ -n "$extras" ]] && ! command -v chromium >/dev/null; then
  echo "setup: installing chromium" >&2
  SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

PY="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: an unpinned torch pulls GBs of CUDA packages.
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -e ".${extras}" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import lvr, torch, av" || { echo "setup: install failed" >&2; exit 1; }
echo "setup: ready (.venv/bin/lvr)" >&2
