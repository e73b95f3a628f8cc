#!/usr/bin/env bash
# Create .venv from nothing: a CPU build of torch (never the multi-GB CUDA wheels), then the package.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # The PyTorch CPU index serves the CPU build; where a local wheel of the same version lies
    # (pip's find-links), pip takes that one instead. Either way no CUDA libraries are pulled.
    .venv/bin/pip install --quiet "torch==${TORCH_VERSION}" \
        || .venv/bin/pip install --quiet "torch==${TORCH_VERSION}" \
            --index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/pip install --quiet -e ".[test]"
