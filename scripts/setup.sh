#!/usr/bin/env bash
# One command sets everything up: a virtualenv at .venv/ with semsearch (all extras) installed.
# torch is installed first, pinned to the CPU build, so no dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# pip, quiet on success (this host's index settings print many harmless warnings); loud on failure.
pip_install() {
  local log
  log=$(mktemp)
  if ! .venv/bin/python -m pip install -q "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2 || true
    rm -f "$log"
    echo "setup failed: pip install $*" >&2
    exit 1
  fi
  rm -f "$log"
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install --upgrade pip
pip_install "torch==2.13.0"
pip_install -e ".[trainer,dev]"
if .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 1)"; then
  echo "torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') (CPU build)"
else
  echo "warning: a CUDA build of torch is installed" >&2
fi
echo "semsearch is set up: .venv/bin/semsearch --help"
