#!/usr/bin/env bash
# Set up from nothing: the Debian packages the tests use (when run as root), then .venv with a
# CPU build of torch (never the multi-GB CUDA wheels) and the package. Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: iproute2 (network namespaces for the two-host test), prometheus (a real
# server and promtool for the metrics tests), dataset-fashion-mnist (the benchmark dataset).
missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Debian packages: ${missing[*]}"
        # never start the packaged services (prometheus) in this container
        policy_added=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            policy_added=1
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
        [ "$policy_added" = 1 ] && rm -f /usr/sbin/policy-rc.d
    else
        echo "setup: not root or no apt-get; tests needing ${missing[*]} will be skipped"
    fi
fi

PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # pip takes a local wheel of this version where one lies in its find-links; otherwise the
    # PyTorch CPU index serves the CPU build. Either way no CUDA libraries are pulled.
    .venv/bin/pip install --quiet "torch==${TORCH_VERSION}" \
        || .venv/bin/pip install --quiet "torch==${TORCH_VERSION}" \
            --index-url https://download.pytorch.org/whl/cpu
fi
# torchvision must be the release built for the installed torch; named explicitly so that pip
# never resolves a newer one that would replace torch with a CUDA build. PyPI's wheel is built
# against CUDA torch: its compiled operators do not load beside the CPU build, which
# dml_cluster/vision.py handles (models, datasets and transforms are pure Python).
TORCHVISION_VERSION=${TORCHVISION_VERSION:-$(.venv/bin/python - <<'PY'
import torch
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
print(f"0.{minor + 15}.0" if major == 2 else "")
PY
)}
if ! .venv/bin/python -c "import torchvision.version as v, sys; sys.exit(v.__version__.split('+')[0] != '${TORCHVISION_VERSION}')" 2>/dev/null; then
    .venv/bin/pip install --quiet --no-deps "torchvision==${TORCHVISION_VERSION}"
fi
.venv/bin/pip install --quiet -e ".[test]"
