#!/usr/bin/env bash
# Set up from nothing: the Debian packages the tests use (when run as root), then .venv with a
# build of torch for this machine and the package. Safe to run twice.
#
# Which torch: with a working NVIDIA GPU (`nvidia-smi -L` lists one) the CUDA build (multi-GB
# wheels, from PyPI, whose Linux torch is the CUDA build), else the CPU build (a local wheel in
# pip's find-links, else the PyTorch CPU index). DML_TORCH=cpu or DML_TORCH=cuda overrides the
# choice; DML_TORCH_INDEX names another index for the CUDA build (e.g. a cu126 one for an older
# driver). The script says which it chose.
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
build=${DML_TORCH:-auto}
case "$build" in
    auto)
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
            build=cuda
            why="an NVIDIA GPU is present ($(nvidia-smi -L | head -n 1))"
        else
            build=cpu
            why="no working NVIDIA GPU (nvidia-smi absent or lists none)"
        fi
        ;;
    cpu | cuda) why="DML_TORCH=$build" ;;
    *)
        echo "setup: DML_TORCH must be cpu, cuda or auto, not '$build'" >&2
        exit 2
        ;;
esac
echo "setup: torch ${TORCH_VERSION}, ${build} build: ${why}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# the build already installed: "cuda" for a CUDA build, "cpu" for a CPU one, "" for none
installed=$(.venv/bin/python -W ignore -c "import torch; print('cuda' if torch.version.cuda else 'cpu')" \
    2>/dev/null || true)
# torchvision must be the release built for torch VERSION (argument)
torchvision_for() {
    "$PY" - "$1" <<'PY'
import sys
major, minor = (int(p) for p in sys.argv[1].split("+")[0].split(".")[:2])
print(f"0.{minor + 15}.0" if major == 2 else "")
PY
}
if [ "$build" = cuda ]; then
    if [ "$installed" != cuda ]; then
        # torch and torchvision together, from the index only (a local +cpu wheel in pip's
        # find-links would otherwise win: its local version label sorts higher)
        PIP_FIND_LINKS= .venv/bin/pip install --quiet --force-reinstall \
            --index-url "${DML_TORCH_INDEX:-https://pypi.org/simple}" "torch==${TORCH_VERSION}" \
            "torchvision==${TORCHVISION_VERSION:-$(torchvision_for "$TORCH_VERSION")}"
    fi
    .venv/bin/python -W ignore -c "import torch; assert torch.version.cuda, 'not a CUDA build'; \
print(f'setup: torch {torch.__version__} (CUDA {torch.version.cuda}), GPU visible: {torch.cuda.is_available()}')"
else
    if [ "$installed" != cpu ]; then
        replace=()
        [ "$installed" = cuda ] && replace=(--force-reinstall)
        # a local wheel of this version in pip's find-links (CI's disk), then its dependencies
        # from the index; without one the PyTorch CPU index (PyPI's Linux torch is the CUDA
        # build: never asked for here)
        if .venv/bin/pip install --quiet --no-index --no-deps "${replace[@]}" \
            "torch==${TORCH_VERSION}" 2>/dev/null; then
            .venv/bin/pip install --quiet "torch==${TORCH_VERSION}"
        else
            .venv/bin/pip install --quiet "${replace[@]}" "torch==${TORCH_VERSION}" \
                --index-url https://download.pytorch.org/whl/cpu
        fi
    fi
    # named explicitly, without its dependencies, so that pip never replaces torch by the CUDA
    # build. PyPI's wheel is built against CUDA torch: its compiled operators do not load beside
    # the CPU build, which dml_cluster/vision.py handles (models, datasets and transforms are
    # pure Python) for every `import torchvision` in .venv: the package's install below writes
    # dml_cluster_torchvision.pth into site-packages (setup.py).
    TORCHVISION_VERSION=${TORCHVISION_VERSION:-$(torchvision_for \
        "$(.venv/bin/python -c 'import torch; print(torch.__version__)')")}
    if ! .venv/bin/python -c "import torchvision.version as v, sys; sys.exit(v.__version__.split('+')[0] != '${TORCHVISION_VERSION}')" 2>/dev/null; then
        .venv/bin/pip install --quiet --no-deps "torchvision==${TORCHVISION_VERSION}"
    fi
    .venv/bin/python -W ignore -c "import torch; print(f'setup: torch {torch.__version__} (CPU build)')"
fi
.venv/bin/pip install --quiet -e ".[test]"
