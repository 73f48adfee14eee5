#!/usr/bin/env bash
# The test command: set up .venv if needed, lint (ruff) and type-check (mypy) the code, then run
# the whole pytest suite. A lint or type error stops it with the tool's message, before pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy
# Two pytest processes (pytest-xdist), each taking whole test files (a file's fixtures start
# once): most tests wait on real processes and sockets, so two halve the wall time even on 2
# cores. The Ray cluster tests and the stranger flood measure timing under a machine they have
# to themselves, so they run after, in one process. BYZPS_TEST_JOBS=1 runs everything in one
# process; arguments that name tests (not only options) run just those, in one xdist run.
jobs="${BYZPS_TEST_JOBS:-2}"
if [ "$jobs" = 1 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
for arg in "$@"; do
  case "$arg" in
    -*) ;;
    *) exec .venv/bin/python -m pytest -n "$jobs" --dist loadfile "$@" ;;
  esac
done
ALONE=(tests/test_ray.py tests/test_strangers.py)
rc=0
.venv/bin/python -m pytest -n "$jobs" --dist loadfile "${ALONE[@]/#/--ignore=}" "$@" || rc=$?
.venv/bin/python -m pytest "${ALONE[@]}" "$@" || rc=$?
exit "$rc"
