"""Seconds per round: ``byzps run CONFIG --ray`` against a local ``byzps run CONFIG`` (a
benchmark, not a test) -- issue 15.

Runs ``byzps run CONFIG --rounds R`` (the PS and the workers as local processes, mode
``local``), ``byzps run CONFIG --rounds R --ray`` (the same node processes, each started by a
Ray actor on a local Ray instance bound to 127.0.0.1, mode ``ray``) and the latter again with
``RAY_worker_niceness=0`` (mode ``ray_nice0``) alternately, ``--repeats`` times each, each into
a new run folder, so the machine's load falls on all alike. Ray starts its worker processes at
niceness 15 (Ray's ``worker_niceness``) and a node process inherits its actor's niceness;
``ray_nice0`` shows whether that costs the nodes CPU on a machine shared with other jobs (where
the kernel groups processes by session, ``sched_autogroup``, niceness ranks processes only
within a session, and every node runs in a session of its own, so it should not). Reported per
run, from the PS's ``metrics.jsonl``: the mean and median of ``seconds_round`` (one round: ROUND
out, gradients in, aggregate, UPDATE out; the part that runs the nodes' TCP code), and the
command's wall seconds (start-up of Python, Ray, the actors and the nodes included); per mode
the median over runs; the overhead of running the nodes as actors = median Ray s/round - median
local s/round (for each Ray mode). Also the load averages before and after.

    python benchmarks/run_ray.py [--config nodes_example.yaml] [--rounds 60] [--repeats 2]
                                 [--out benchmarks/results/run_ray]

Writes ``OUT.json`` (every run) and ``OUT.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


MODES = ("local", "ray", "ray_nice0")


def run(config: Path, run_dir: Path, rounds: int, mode: str) -> dict:
    """One ``byzps run`` in ``mode`` (see :data:`MODES`): its wall seconds and the rounds'
    seconds from its metrics file."""
    cmd = [sys.executable, "-c", "import sys; from byzps.cli import byzps_main; "
           "sys.exit(byzps_main())", "run", str(config), "--rounds", str(rounds),
           "--run-dir", str(run_dir)] + (["--ray"] if mode != "local" else [])
    env = dict(os.environ)
    if mode == "ray_nice0":
        env["RAY_worker_niceness"] = "0"
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    secs = [rec["seconds_round"] for rec in records]
    if len(secs) != rounds:
        raise SystemExit(f"{run_dir}: {len(secs)} rounds recorded, expected {rounds}")
    return {"mode": mode, "wall": round(wall, 2),
            "mean_s_per_round": round(statistics.fmean(secs), 4),
            "median_s_per_round": round(statistics.median(secs), 4),
            "final_accuracy": next((rec["test_accuracy"] for rec in reversed(records)
                                    if rec.get("test_accuracy") is not None), None)}


def main() -> None:
    """Parse the flags, run both modes alternately, write OUT.json and OUT.md."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "nodes_example.yaml"))
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "run_ray"))
    args = ap.parse_args()
    config = Path(args.config).resolve()
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="byzps-run-ray-") as tmp:
        for i in range(args.repeats):
            for mode in MODES:
                res = run(config, Path(tmp) / f"{mode}-{i}", args.rounds, mode)
                print(json.dumps(res), flush=True)
                runs.append(res)
    load_after = os.getloadavg()
    median = {m: statistics.median(r["mean_s_per_round"] for r in runs if r["mode"] == m)
              for m in MODES}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
         "rounds": args.rounds, "cpus": os.cpu_count(), "load_before": load_before,
         "load_after": load_after, "runs": runs}, indent=1) + "\n")
    lines = [f"`byzps run` s/round, local processes vs Ray actors: `{config.name}`, "
             f"{args.rounds} rounds, {os.cpu_count()} CPUs, load average before "
             f"{load_before[0]:.1f} / after {load_after[0]:.1f} (1 min)", "",
             "| mode | mean s/round per run | median s/round per run | wall s per run "
             "| final accuracy |", "|---|---|---|---|---|"]
    for m in MODES:
        mine = [r for r in runs if r["mode"] == m]

        def cells(key: str, spec: str, mine: list = mine) -> str:
            return ", ".join(format(r[key], spec) for r in mine)

        lines.append(f"| {m} | {cells('mean_s_per_round', '.3f')} | "
                     f"{cells('median_s_per_round', '.3f')} | {cells('wall', '.1f')} | "
                     f"{cells('final_accuracy', '')} |")
    lines += ["", f"Overhead of the nodes as Ray actors (median over runs of the mean s/round, "
              f"Ray - local): {median['ray'] - median['local']:+.3f} s/round with Ray's "
              f"default worker niceness 15, {median['ray_nice0'] - median['local']:+.3f} "
              f"s/round with RAY_worker_niceness=0. Command: `python benchmarks/run_ray.py "
              f"--rounds {args.rounds} --repeats {args.repeats}`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
