#!/usr/bin/env bash
# Installs PyTorch into the given Python environment, choosing the build by machine:
# a CUDA machine gets the default (CUDA) wheel; a CPU-only machine gets a CPU build instead of
# several GB of CUDA libraries it cannot use.
set -euo pipefail
PY=${1:-.venv/bin/python}
CPU_VERSION=2.13.0

if "$PY" -c "import torch" 2>/dev/null; then
    exit 0  # already there: keep whatever build the user chose
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    exec "$PY" -m pip install "torch>=2.4"
fi
# 1. A CPU wheel already on this machine's disk (pip's find-links), without touching the network.
"$PY" -m pip install --no-index "torch==$CPU_VERSION" && exit 0
# 2. PyTorch's CPU wheel index.
"$PY" -m pip install "torch==$CPU_VERSION" --index-url https://download.pytorch.org/whl/cpu && exit 0
# 3. Last resort: the default wheel from PyPI.
exec "$PY" -m pip install "torch==$CPU_VERSION"
