#!/usr/bin/env bash
# The test command: set up .venv if needed, lint (ruff) and type-check (mypy) the code, then run
# the whole pytest suite. A lint or type error stops it with the tool's message, before pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy
# Two pytest processes (pytest-xdist), each taking whole test files (a file's fixtures, such
# as a Ray cluster, start once): most tests wait on real processes and sockets, so two halve
# the wall time even on 2 cores. BYZPS_TEST_JOBS=1 runs everything in one process.
jobs="${BYZPS_TEST_JOBS:-2}"
if [ "$jobs" = 1 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest -n "$jobs" --dist loadfile "$@"
