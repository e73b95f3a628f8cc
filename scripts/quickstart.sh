#!/usr/bin/env bash
# The main job on the embedded default: set up, then a 2-peer DML cohort on digits, in one
# process; prints one line per epoch, the per-class table and where the summary is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
.venv/bin/dml-cluster train configs/digits-dml.yaml "$@"
