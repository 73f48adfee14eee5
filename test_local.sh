#!/usr/bin/env bash
# Train on real MNIST over TCP on this machine: the PS and every worker of the config
# (nodes_example.yaml: 3 honest + 1 Byzantine) as separate processes over 127.0.0.1.
# A thin wrapper over `byzps run` (progress line, Ctrl-C forwarded to every node, summary,
# run folder runs/<config>-<time>-<pid>/ with config.yaml, metrics.jsonl and one log per node).
#
#   ./test_local.sh [CONFIG] [--rounds R] [other `byzps run` options, e.g. --run-dir DIR]
#   env: MIN_ACC (default 0.96), DATA_ROOT (default: byzps run's, ./data or the packaged copy)
#
# Relative paths (CONFIG, --run-dir, DATA_ROOT, the default runs/) are the caller's: from the
# folder the script is called in. Exits non-zero if any process fails or the final test
# accuracy is below MIN_ACC.
set -euo pipefail
REPO=$(cd "$(dirname "$0")" && pwd)
CONFIG=$REPO/nodes_example.yaml
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    --rounds|--run-dir|--data-root|--min-accuracy)
      [ $# -ge 2 ] || { echo "test_local: $1 needs a value" >&2; exit 2; }
      EXTRA+=("$1" "$2"); shift 2 ;;
    --*=*) EXTRA+=("$1"); shift ;;
    -*) echo "test_local: unknown option $1 (see ./test_local.sh --help)" >&2; exit 2 ;;
    *) CONFIG=$1; shift ;;
  esac
done
MIN_ACC=${MIN_ACC:-0.96}
[ -f "$CONFIG" ] || { echo "test_local: no config file $CONFIG" >&2; exit 2; }
ROOT_ARGS=()
[ -z "${DATA_ROOT:-}" ] || ROOT_ARGS=(--data-root "$DATA_ROOT")

bash "$REPO/scripts/setup_env.sh"
# --data-root and --min-accuracy given on the command line come later and win
exec "$REPO/.venv/bin/byzps" run "$CONFIG" ${ROOT_ARGS[@]+"${ROOT_ARGS[@]}"} \
  --min-accuracy "$MIN_ACC" ${EXTRA[@]+"${EXTRA[@]}"}
