"""Seconds per simulated round of the grid cell under each attack (what an attack adds).

The cell of the robustness grids: 10 honest + 3 Byzantine workers, cnn_mnist, worker momentum
0.9, one torch thread, a configurable rule (default clipping + nnm > trimmed_mean). Each
attack runs ``--rounds`` rounds in its own process (``byzps simulate``, the evaluation after
the last round is not timed); the table reports the mean s/round the simulator prints, so the
cost of an attack is its row minus the sign_flip row. The optimised attacks run the rule
``evals`` times per round (once for all omniscient attackers of a round).

    python benchmarks/attack_cost.py [--rounds 10] [--rule trimmed_mean] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ATTACKS = [
    ("sign_flip", {}),
    ("alie", {"omniscient": True}),
    ("minmax", {"omniscient": True}),
    ("minsum", {"omniscient": True}),
    ("fang", {"omniscient": True}),
    ("opt_alie", {"omniscient": True}),
    ("opt_ipm", {"omniscient": True}),
    ("fang", {}),
    ("opt_alie", {}),
]


def config(attack: str, params: dict, rule: str, rounds: int) -> dict:
    """The grid cell's config with 3 workers running ``attack``."""
    aggregation: dict = {"method": rule}
    if rule == "trimmed_mean":
        aggregation["pre_aggregators"] = [{"name": "clipping", "threshold": 2.0}, {"name": "nnm"}]
    workers = [{"id": i, "type": "honest"} for i in range(10)]
    workers += [{"id": i, "type": "byzantine", "attack": attack, "attack_params": params}
                for i in (10, 11, 12)]
    return {"training": {"rounds": rounds, "batch_size": 32, "learning_rate": 0.3,
                         "momentum": 0.0, "worker_momentum": 0.9, "seed": 0,
                         "model": "cnn_mnist", "eval_every": rounds},
            "aggregation": aggregation, "server": {"host": "127.0.0.1", "port": 9000},
            "workers": workers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--rule", default="trimmed_mean")
    ap.add_argument("--data-root", default="./data")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args()
    byzps = Path(sys.executable).with_name("byzps")
    lines = [f"# s/round, {args.rounds} rounds, rule {args.rule} "
             f"({'clipping+nnm>' if args.rule == 'trimmed_mean' else ''}{args.rule}), "
             f"load average before: {os.getloadavg()[0]:.1f}",
             "| attack | s/round | wall s (process) |", "|---|---|---|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for attack, params in ATTACKS:
            path = Path(tmp) / f"{attack}.yaml"
            path.write_text(yaml.safe_dump(config(attack, params, args.rule, args.rounds)))
            start = time.perf_counter()
            run = subprocess.run([str(byzps), "simulate", str(path), "--data-root",
                                  args.data_root], capture_output=True, text=True)
            wall = time.perf_counter() - start
            m = re.search(r"\(([0-9.]+) s/round\)", run.stdout)
            label = attack + ("-omni" if params.get("omniscient") else "")
            if run.returncode or m is None:
                row = f"| {label} | failed (rc {run.returncode}) | {wall:.0f} |"
                print(run.stdout[-2000:], run.stderr[-2000:], file=sys.stderr)
            else:
                row = f"| {label} | {float(m.group(1)):.3f} | {wall:.0f} |"
            lines.append(row)
            print(row, flush=True)
    lines.append(f"load average after: {os.getloadavg()[0]:.1f}")
    print(lines[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
