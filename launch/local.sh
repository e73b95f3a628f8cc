#!/usr/bin/env bash
# One node, K peers: one torchrun agent starts one process per peer of the cohort in CONFIG.
#
#   launch/local.sh CONFIG [--set KEY=VALUE ...]
#   launch/local.sh CONFIG --set cohort.replicas=2      # K peers x 2 data-parallel replicas
#
# K (K x D with cohort.replicas D) comes from CONFIG after the overrides (NPROC overrides it). The rendezvous is c10d
# on 127.0.0.1, not --standalone: with --standalone, a restarted worker group failed to set up
# gloo 4 times of 4 (keys of the failed attempt stay in the reused store, pytorch/pytorch#135712).
# Environment: PYTHON (default python3; e.g. .venv/bin/python), NPROC, RDZV_PORT (default: a
# free port), MAX_RESTARTS (default 0), OMP_NUM_THREADS (default 1).
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 CONFIG [--set KEY=VALUE ...]" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
CONFIG=$1
shift

NPROC=${NPROC:-$("$PYTHON" "$here/cohort_size.py" "$CONFIG" "$@")}
RDZV_PORT=${RDZV_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# restarts with gloo need a fresh store per attempt (stale keys in the shared one break them)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# after passing a SIGTERM on, wait for the peers' checkpoint save (checkpoint.on_signal.grace_s
# + 5 s) before killing them; torch's default, 30 s, would cut a longer grace
TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$("$PYTHON" "$here/stop_wait.py" "$CONFIG" "$@")}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT

exec "$PYTHON" -m torch.distributed.run \
    --nnodes 1 \
    --nproc-per-node "$NPROC" \
    --rdzv-backend c10d \
    --rdzv-endpoint "127.0.0.1:$RDZV_PORT" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    -m dml_cluster train "$CONFIG" "$@"
