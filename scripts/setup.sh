#!/usr/bin/env bash
# One command sets everything up: a virtualenv at .venv/ with semsearch (all extras) installed.
# torch is installed first, pinned to the CPU build, so no dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[trainer,dev]"
.venv/bin/python -m pip check || true
echo "semsearch is set up: .venv/bin/semsearch --help"
