#!/usr/bin/env bash
# Set up lvr on a fresh machine: ffmpeg, a virtualenv in .venv, torch (CPU
# wheel, pinned) and the package. `--dev` adds the test tools.
# Quiet when all is well; a failing step shows its own messages and stops setup.
# Usage: bash scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"

fail() { echo "setup: $1 failed" >&2; exit 1; }
# A step's messages go to stderr, minus notes that say nothing is wrong: apt's
# debconf note and pip's note on a find-links folder this machine lacks.
show_problems() { grep -v -e '^debconf: delaying package configuration' -e '^WARNING: Location' >&2 || true; }

apt_install() {
  local sudo=""; [[ "$(id -u)" != 0 ]] && sudo="sudo"
  $sudo apt-get update -qq >/dev/null 2>&1 || true
  { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" 2>&1 >/dev/null; } | show_problems \
    || fail "installing $1 with apt-get"
}

if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then
  echo "setup: installing ffmpeg" >&2
  apt_install ffmpeg
fi

# --dev: headless Chromium renders trace pages in tests/test_trace_html.py.
if [[ -n "$extras" ]] && ! command -v chromium >/dev/null; then
  echo "setup: installing chromium" >&2
  apt_install chromium
fi

PY="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv || fail "making .venv with $PY"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: an unpinned torch pulls GBs of CUDA packages.
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | show_problems || fail "installing torch"
# setuptools prints an "Editable installation" notice box for every editable install whose
# packages map to other folders (ours: cli/ -> lvr.cli, ...). It is information, not a
# problem, and setuptools documents PYTHONWARNINGS as the way to filter its warnings.
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q -e ".${extras}" 2>&1 \
  | show_problems || fail "installing lvr"
.venv/bin/python -c "import lvr, torch, av" || fail "installing lvr"
echo "setup: ready (.venv/bin/lvr)" >&2
