# syntax=docker/dockerfile:1.7
# The image that k8s/ runs: the official PyTorch CUDA runtime image, dml-cluster and its pinned
# dependencies (docker/requirements.txt), a non-root user, `dml-cluster` as entry point.
# Build from the repository root:
#   docker build -t dml-cluster:0.1.0 .
# Pick another base with --build-arg PYTORCH_IMAGE=... (a PyTorch 2.4-2.14 runtime image with
# Python 3.11 or later); in production pin it by digest (IMAGE@sha256:...).
ARG PYTORCH_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime

# -- build: the package as a wheel; the build backend lives and dies in this stage -------------
FROM ${PYTORCH_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY dml_cluster ./dml_cluster
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# -- runtime --------------------------------------------------------------------------------
FROM ${PYTORCH_IMAGE}
LABEL org.opencontainers.image.title="dml-cluster" \
      org.opencontainers.image.description="Distributed deep mutual learning: one process per peer network" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The wheel and the pins are bind-mounted, not copied: neither stays in a layer. --no-deps
# installs exactly the pinned closure; the import check fails the build on a missing one.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    --mount=type=bind,source=docker/requirements.txt,target=/tmp/requirements.txt \
    python -m pip install --no-cache-dir --no-deps -r /tmp/requirements.txt /dist/*.whl \
    && dml-cluster --help > /dev/null \
    && python -c "import torch, torchvision, zmq, prometheus_client, sklearn, dml_cluster.launch" \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /workspace \
        --shell /usr/sbin/nologin dml \
    && mkdir -p /workspace \
    && chown dml:dml /workspace
COPY configs /opt/dml-cluster/configs
WORKDIR /workspace
# numeric, so that Kubernetes' runAsNonRoot can verify it
USER 10001:10001
# 9400 Prometheus metrics, 23456 PyTorchJob master (torch store), 29400 c10d rendezvous
EXPOSE 9400 23456 29400
ENTRYPOINT ["dml-cluster"]
CMD ["--help"]
