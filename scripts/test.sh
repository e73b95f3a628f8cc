#!/usr/bin/env bash
# The test command: set up from nothing (scripts/setup.sh), lint, then the test suite.
# Long checks are marked `slow` and left out; run them with: bash scripts/test.sh -m slow
# Tests run in DML_TEST_WORKERS pytest-xdist workers (default 2), a test file per worker at a
# time; most tests wait on processes they launch, so two workers keep two cores busy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
.venv/bin/ruff check .
.venv/bin/python -m pytest -m "not slow" -p no:cacheprovider --timeout=900 --durations=25 \
    -n "${DML_TEST_WORKERS:-2}" --dist loadfile "$@"
