#!/usr/bin/env bash
# Several nodes: every node runs this same command, with its own NODE_RANK.
#
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29400 launch/multinode.sh CONFIG [--set KEY=VALUE ...]
#   NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=node0:29400 launch/multinode.sh CONFIG [--set KEY=VALUE ...]
#
# torchrun's c10d rendezvous: node 0's agent hosts it at RDZV_ENDPOINT (HOST:PORT, reachable
# from every node), the others join; each node starts NPROC_PER_NODE peers (default: cohort
# size / NNODES). Ranks are handed out by the rendezvous; NODE_RANK only says who hosts it.
# The config needs bus.transport zmq or torch, and every node must reach every other one
# (the zmq bus binds this node's address on the route to the rendezvous master).
# Environment: NNODES, NODE_RANK (default $SLURM_NODEID), RDZV_ENDPOINT: required.
# NPROC_PER_NODE; RDZV_ID (default $SLURM_JOB_ID or dml-cluster: the same on every node);
# MAX_RESTARTS (default 0); LOCAL_ADDR (this node's address as the others reach it, when its
# host name does not resolve to it); PYTHON (default python3); OMP_NUM_THREADS (default 1).
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: NNODES=N NODE_RANK=I RDZV_ENDPOINT=HOST:PORT $0 CONFIG [--set KEY=VALUE ...]" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
CONFIG=$1
shift
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
for var in NNODES NODE_RANK RDZV_ENDPOINT; do
    if [ -z "${!var:-}" ]; then
        echo "$0: set $var (see the comment at the top of this script)" >&2
        exit 2
    fi
done

if [ -z "${NPROC_PER_NODE:-}" ]; then
    size=$("$PYTHON" "$here/cohort_size.py" "$CONFIG" "$@")
    if [ $((size % NNODES)) -ne 0 ]; then
        echo "$0: the cohort has $size peers, which $NNODES nodes cannot share evenly: set NPROC_PER_NODE" >&2
        exit 2
    fi
    NPROC_PER_NODE=$((size / NNODES))
fi
# node 0 hosts the rendezvous store; saying so beats torchrun's guess from host names
is_host=0
if [ "$NODE_RANK" = 0 ]; then
    is_host=1
fi
local_addr=()
if [ -n "${LOCAL_ADDR:-}" ]; then
    local_addr=(--local-addr "$LOCAL_ADDR")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# restarts with gloo need a fresh store per attempt (stale keys in the shared one break them)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# after passing a SIGTERM on, wait for the peers' checkpoint save (checkpoint.on_signal.grace_s
# + 5 s) before killing them; torch's default, 30 s, would cut a longer grace
TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$("$PYTHON" "$here/stop_wait.py" "$CONFIG" "$@")}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT

exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" \
    --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$RDZV_ENDPOINT" \
    --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-dml-cluster}}" \
    --rdzv-conf "is_host=$is_host" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    "${local_addr[@]}" \
    -m dml_cluster train "$CONFIG" "$@"
