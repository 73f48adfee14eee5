"""Grid wall time: local processes against Ray, for the same small grid (a benchmark, not a
test) -- issue 15.

Runs ``byzps grid GRID --jobs J --no-plots`` (a fresh process per cell, J at a time) and
``byzps grid GRID --ray --jobs J --no-plots`` (a local Ray instance on 127.0.0.1 with J CPUs;
every cell a Ray task in a fresh Ray worker) alternately, ``--repeats`` times each, each into a
new out folder, so the machine's load falls on both alike. Reported per mode: the wall seconds
of the whole command (start-up of Python and Ray included), their median, the mean simulation
seconds inside a cell (``results.csv``'s ``seconds``: the part that is the same work in both
modes), and the Ray overhead per cell = (median Ray - median local) / cells. Also the load
averages before and after, and a check that both modes wrote the same numbers (``results.csv``
without the timing columns).

    python benchmarks/grid_ray.py [--grid benchmarks/grid_ray.yaml] [--jobs 2] [--repeats 2]
                                  [--out benchmarks/results/grid_ray]

Writes ``OUT.json`` (every run) and ``OUT.md`` (the table).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMING = ("seconds", "seconds_per_round")


def cell_seconds(out: Path) -> float:
    """Mean simulation seconds of the cells of a grid folder."""
    with open(out / "results.csv", newline="") as fh:
        secs = [float(r["seconds"]) for r in csv.DictReader(fh)]
    return sum(secs) / len(secs)


def numbers(out: Path) -> list[dict]:
    """``results.csv`` of a grid folder without its timing columns."""
    with open(out / "results.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


def run(grid: Path, out: Path, jobs: int, ray: bool) -> float:
    """Wall seconds of one ``byzps grid`` command."""
    cmd = [sys.executable, "-c", "import sys; from byzps.cli import byzps_main; "
           "sys.exit(byzps_main())", "grid", str(grid), "--out", str(out), "--jobs", str(jobs),
           "--no-plots"] + (["--ray"] if ray else [])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return wall


def main() -> None:
    """Run the benchmark (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default=str(ROOT / "benchmarks" / "grid_ray.yaml"))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grid_ray"))
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from byzps.grid import load_grid

    cells = len(load_grid(a.grid).cells)
    load_before = os.getloadavg()
    walls: dict[str, list[float]] = {"local": [], "ray": []}
    inside: dict[str, list[float]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="bz-gridray-") as tmp:
        ref = None
        for i in range(a.repeats):
            for mode in ("local", "ray"):
                out = Path(tmp) / f"{mode}-{i}"
                walls[mode].append(run(Path(a.grid), out, a.jobs, mode == "ray"))
                print(f"{mode} #{i}: {walls[mode][-1]:.1f} s", file=sys.stderr, flush=True)
                inside[mode].append(cell_seconds(out))
                got = numbers(out)
                if ref is None:
                    ref = got
                elif got != ref:
                    raise SystemExit(f"{mode} #{i} wrote other numbers than the first run")
    load_after = os.getloadavg()
    med = {m: statistics.median(w) for m, w in walls.items()}
    result = {"grid": os.path.relpath(a.grid, ROOT), "cells": cells, "jobs": a.jobs,
              "repeats": a.repeats, "walls": walls, "median": med,
              "mean_cell_simulation_seconds": inside,
              "ray_overhead_per_cell": (med["ray"] - med["local"]) / cells,
              "same_numbers": True, "cpus": os.cpu_count(),
              "loadavg_before": load_before, "loadavg_after": load_after,
              "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"Grid wall time, `{result['grid']}` ({cells} cells), --jobs {a.jobs}, "
          f"{os.cpu_count()} CPUs, load average before {load_before[0]:.1f} / after "
          f"{load_after[0]:.1f} (1 min)", "",
          "| mode | runs (s) | median (s) | wall s per cell | simulation s in a cell (mean per run) |",
          "|---|---|---|---|---|"]
    for m in ("local", "ray"):
        md.append(f"| {m} | {', '.join(f'{w:.1f}' for w in walls[m])} | {med[m]:.1f} | "
                  f"{med[m] / cells:.2f} | {', '.join(f'{x:.1f}' for x in inside[m])} |")
    md += ["", f"Ray overhead: {result['ray_overhead_per_cell']:+.2f} s per cell "
               f"(median Ray - median local, over {cells} cells); both modes wrote the same "
               f"numbers. Command: `{result['command']}`"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
