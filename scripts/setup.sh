#!/usr/bin/env bash
# One command sets everything up: a virtualenv at .venv/ with semsearch (all extras) installed.
# torch is installed first, pinned to the CPU build, so no dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# pip into $VENV (default .venv), quiet on success (this host's index settings print many harmless
# warnings); loud on failure.
pip_install() {
  local log
  log=$(mktemp)
  if ! "${VENV:-.venv}/bin/python" -m pip install -q "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2 || true
    rm -f "$log"
    echo "setup failed: pip install $*" >&2
    exit 1
  fi
  rm -f "$log"
}

# infinity-emb in its own virtualenv (.venv-infinity/): a real third-party OpenAI-compatible server
# (/embeddings, /rerank) for the contract tests, whose pins must not move .venv/'s. CPU torch first
# and named again with infinity, so that nothing pulls CUDA wheels. Skipped when already installed.
# It installs in the background, beside .venv/ (two independent virtualenvs: about a minute saved).
INFINITY_VERSION=0.0.78
install_infinity() {
  if ! .venv-infinity/bin/python -c "import importlib.metadata as m, sys; \
      sys.exit(m.version('infinity-emb') != '$INFINITY_VERSION')" 2>/dev/null; then
    [ -x .venv-infinity/bin/python ] || "$PYTHON" -m venv .venv-infinity
    VENV=.venv-infinity pip_install "torch==2.13.0"
    VENV=.venv-infinity pip_install "torch==2.13.0" "infinity-emb[server,torch]==$INFINITY_VERSION"
  fi
}
install_infinity &
INFINITY_PID=$!
trap 'kill "$INFINITY_PID" 2>/dev/null || true' EXIT  # a failed main install stops it too

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install --upgrade pip
pip_install "torch==2.13.0"
pip_install -e ".[trainer,dev]"
if .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 1)"; then
  echo "torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') (CPU build)"
else
  echo "warning: a CUDA build of torch is installed" >&2
fi

# Debian's chromium for the browser test of the search console (tests/test_console.py drives it with
# Playwright; never `playwright install`, which downloads browsers), and a small Chinese font so its
# screenshots show text rather than boxes. Skipped when chromium is already there.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then APT=(apt-get); else APT=(sudo apt-get); fi
  { "${APT[@]}" update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
      "${APT[@]}" install -y -q chromium fonts-wqy-microhei >/dev/null; } \
    || { echo "setup failed: apt-get install chromium (needed by tests/test_console.py)" >&2; exit 1; }
fi

wait "$INFINITY_PID" || { echo "setup failed: infinity-emb in .venv-infinity/" >&2; exit 1; }
trap - EXIT
echo "infinity-emb $INFINITY_VERSION: .venv-infinity/bin/infinity_emb"
echo "semsearch is set up: .venv/bin/semsearch --help"
