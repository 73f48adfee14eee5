#!/usr/bin/env bash
# Train on real MNIST over TCP on this machine: the PS and every worker of the config
# (nodes_example.yaml: 3 honest + 1 Byzantine) as separate processes over 127.0.0.1.
#
#   ./test_local.sh [CONFIG] [--rounds R]      env: MIN_ACC (default 0.97), DATA_ROOT
#
# Exits non-zero if any process fails or the final test accuracy is below MIN_ACC.
set -euo pipefail
cd "$(dirname "$0")"
CONFIG=nodes_example.yaml
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) EXTRA+=(--rounds "$2"); shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) CONFIG=$1; shift ;;
  esac
done
MIN_ACC=${MIN_ACC:-0.97}
DATA_ROOT=${DATA_ROOT:-./data}
[ -f "$CONFIG" ] || { echo "test_local: no config file $CONFIG" >&2; exit 2; }

bash scripts/setup_env.sh
PY=.venv/bin/python
RUN_DIR=runs/local-$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$RUN_DIR"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # several processes share this machine's cores

# A copy of the config on a free port, with metrics written into the run folder.
"$PY" - "$CONFIG" "$RUN_DIR" <<'PYEOF'
import json, socket, sys
from pathlib import Path
import yaml
from byzps.config import ConfigError, load_config
src, run_dir = sys.argv[1], Path(sys.argv[2])
try:
    load_config(src)
except ConfigError as e:
    sys.exit(f"config error: {e}")
text = Path(src).read_text()
data = json.loads(text) if src.endswith(".json") else yaml.safe_load(text)
s = socket.socket(); s.bind((data["server"].get("bind_host") or data["server"]["host"], 0))
data["server"]["port"] = s.getsockname()[1]; s.close()
data.setdefault("training", {})["metrics_file"] = str(run_dir / "metrics.jsonl")
(run_dir / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
(run_dir / "worker_ids").write_text(" ".join(str(w["id"]) for w in data["workers"]))
PYEOF
CFG=$RUN_DIR/config.yaml
read -r -a IDS < "$RUN_DIR/worker_ids" || true

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

echo "test_local: run folder $RUN_DIR (logs, metrics.jsonl); PS + ${#IDS[@]} workers" >&2
"$PY" ps_node.py --config "$CFG" --role server --data-root "$DATA_ROOT" "${EXTRA[@]}" \
  > >(tee "$RUN_DIR/server.out") 2> >(tee "$RUN_DIR/server.log" >&2) &
SERVER=$!; PIDS+=("$SERVER")
declare -A WPID
for id in "${IDS[@]}"; do
  "$PY" ps_node.py --config "$CFG" --role worker --worker-id "$id" --data-root "$DATA_ROOT" \
    "${EXTRA[@]}" > "$RUN_DIR/worker-$id.log" 2>&1 &
  WPID[$id]=$!; PIDS+=("$!")
done

status=0
wait "$SERVER" || { echo "test_local: the PS failed (exit $?); see $RUN_DIR/server.log" >&2; status=1; }
for id in "${IDS[@]}"; do
  wait "${WPID[$id]}" || { echo "test_local: worker $id failed (exit $?); see $RUN_DIR/worker-$id.log" >&2; status=1; }
done
[ $status -eq 0 ] || exit $status

ACC=$(grep -o 'final test accuracy: [0-9.]*' "$RUN_DIR/server.out" | awk '{print $4}')
[ -n "$ACC" ] || { echo "test_local: the PS printed no final accuracy" >&2; exit 1; }
if "$PY" -c "import sys; sys.exit(0 if float('$ACC') >= float('$MIN_ACC') else 1)"; then
  echo "test_local: OK, final test accuracy $ACC >= $MIN_ACC"
else
  echo "test_local: FAILED, final test accuracy $ACC < $MIN_ACC" >&2; exit 1
fi
