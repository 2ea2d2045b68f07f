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
# 1. A CPU wheel already on this machine's disk (pip's find-links): torch itself without the
#    network, then its small dependencies from the usual index.
if "$PY" -m pip install --no-index --no-deps "torch==$CPU_VERSION" 2>/dev/null; then
    exec "$PY" -m pip install "torch==$CPU_VERSION"
fi
# 2. PyTorch's CPU wheel index (fail fast where it is unreachable).
"$PY" -m pip install "torch==$CPU_VERSION" --retries 1 --timeout 20 \
    --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple && exit 0
# 3. Last resort: the default wheel from PyPI.
exec "$PY" -m pip install "torch==$CPU_VERSION"
