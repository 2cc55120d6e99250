#!/usr/bin/env bash
# Optional, for bench/bench_encoder.py's outside peer only: infinity-emb with its optimum (ONNX Runtime)
# engine in its own virtualenv, .venv-infinity-optimum/. Not needed by the tests or the service.
# The pins are the set that imports together: infinity-emb 0.0.78 imports optimum.bettertransformer,
# which needs optimum 1.x and transformers < 4.49; optimum 2.x passes infinity's absolute ONNX path to a
# loader that wants a file name. torch is pinned to the CPU build, as in scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv-infinity-optimum
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PINS=("torch==2.13.0" "infinity-emb[server,optimum]==0.0.78" "optimum[onnxruntime]==1.24.0"
      "transformers==4.48.3" "numpy<2" "pandas<3")
"$VENV/bin/python" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q "${PINS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip check
echo "infinity-emb with the optimum engine: $VENV/bin/infinity_emb"
