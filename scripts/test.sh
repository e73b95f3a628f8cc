#!/usr/bin/env bash
# The test command: set up from nothing (scripts/setup.sh), lint, then the test suite.
# Long checks are marked `slow` and left out; run them with: bash scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
.venv/bin/ruff check .
.venv/bin/python -m pytest -m "not slow" -p no:cacheprovider --timeout=900 --durations=25 "$@"
