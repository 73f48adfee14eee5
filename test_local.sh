#!/usr/bin/env bash
# Train on real MNIST over TCP on this machine: the PS and every worker of the config
# (nodes_example.yaml: 3 honest + 1 Byzantine) as separate processes over 127.0.0.1.
# A thin wrapper over `byzps run` (progress line, Ctrl-C forwarded to every node, summary,
# run folder runs/<config>-<time>-<pid>/ with config.yaml, metrics.jsonl and one log per node).
#
#   ./test_local.sh [CONFIG] [--rounds R] [other `byzps run` options, e.g. --run-dir DIR]
#   env: MIN_ACC (default 0.97), DATA_ROOT (default ./data)
#
# Exits non-zero if any process fails or the final test accuracy is below MIN_ACC.
set -euo pipefail
cd "$(dirname "$0")"
CONFIG=nodes_example.yaml
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    --rounds|--run-dir|--data-root|--min-accuracy)
      [ $# -ge 2 ] || { echo "test_local: $1 needs a value" >&2; exit 2; }
      EXTRA+=("$1" "$2"); shift 2 ;;
    --*=*) EXTRA+=("$1"); shift ;;
    -*) echo "test_local: unknown option $1 (see ./test_local.sh --help)" >&2; exit 2 ;;
    *) CONFIG=$1; shift ;;
  esac
done
MIN_ACC=${MIN_ACC:-0.97}
DATA_ROOT=${DATA_ROOT:-./data}
[ -f "$CONFIG" ] || { echo "test_local: no config file $CONFIG" >&2; exit 2; }

bash scripts/setup_env.sh
# --data-root and --min-accuracy given on the command line come later and win
exec .venv/bin/byzps run "$CONFIG" --data-root "$DATA_ROOT" \
  --min-accuracy "$MIN_ACC" ${EXTRA[@]+"${EXTRA[@]}"}
