#!/usr/bin/env bash
# The test command: set up .venv if needed, lint (ruff) and type-check (mypy) the code, then run
# the whole pytest suite. A lint or type error stops it with the tool's message, before pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
