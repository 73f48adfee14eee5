"""Seconds per round of ``byzps simulate`` on one grid cell (a benchmark, not a test) -- issue 14.

The cell: ``benchmarks/robustness_f3.yaml``'s 13 workers (10 honest + f = 3 Byzantine),
cnn_mnist, worker momentum 0.9, server momentum 0, pre-aggregators clipping + NNM, then trimmed
mean, one attack (default ``sign_flip(-4)``), built by :meth:`byzps.grid.Grid.config` exactly as
``byzps grid`` builds it.

What it reports per run (one child process each, so a run never inherits another's threads):

* ``s/round``: the mean of the metrics records' ``seconds_round`` over the rounds that were not
  evaluated (with ``eval_every`` 50 and fewer rounds, every round but the last), round 0 (warm-up)
  left out too, so the evaluations are left out the same way for every version of the code;
* ``theta+buf``: BLAKE2b-128 of the PS replica's theta followed by its momentum buffer (zeros
  when the optimizer has none yet), i.e. the replica digest as it was defined before issue 14,
  computed here from the replica so that versions whose own digest differs can be compared
  bit for bit;
* ``cpu/round``: process CPU seconds (all threads) per round between the first record and the
  last record before the final one: the work done, which a busy machine inflates less than the
  wall time;
* ``digest``: the version's own ``SimResult.digest``; ``accuracy``: the final test accuracy;
* ``summary``: the version's own ``SimResult.seconds_per_round`` (with turns it includes the
  time spent waiting for them, so it is only meaningful with ``--block 0``).

``--compare SRC`` runs another copy of the package (a ``src`` folder, e.g. a detached worktree
of the starting commit) in lockstep with this one, so that the load other users put on a shared
machine hits both alike: every version runs in its own process, all started together, and they
take turns, ``--block`` rounds at a time (each child waits in its per-round callback, outside the
timed part of the round, until the parent lets it go on; the parent lets one child run at a
time). On a machine whose scheduler shares the CPUs between sessions (Linux autogroups), the
load of the others changes from second to second; runs one after the other were found to differ
by 3x for the same code, which the turns of a few rounds even out. Each child imports byzps from
its ``src`` through ``PYTHONPATH``. ``--threads 1,2`` runs the version under test once per
count (labels ``this@1``, ``this@2``; ``simulate(threads=...)``); without it, ``this`` runs with
its own default. The compared version (``base``) always runs with its own default (before issue
14: one torch thread, workers one after the other). The machine's load average
(``/proc/loadavg``) is recorded before each run and at the end.

Usage (from the repository root)::

    git worktree add --detach /tmp/base <start-commit>
    .venv/bin/python benchmarks/simulator_speed.py --rounds 40 --reps 2 --threads 1,2 \\
        --compare /tmp/base/src --out benchmarks/results/simulator_speed.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CELL_RULE = "clipping+nnm>trimmed_mean"


def _load() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def child(args: argparse.Namespace) -> dict:
    """Run the cell once in this process; return the measurements (see the module docstring).

    Raises:
        SystemExit: the grid file has no cell with the requested rule and attack label.
    """
    import logging

    import torch

    import byzps
    from byzps.grid import load_grid
    try:
        from byzps.job import parse_config
    except ImportError:     # a version before issue 12's job builder
        from byzps.config import parse_config
    from byzps.simulate import Simulation, simulate

    logging.getLogger("byzps").setLevel(logging.ERROR)
    grid = load_grid(args.grid)
    cells = [c for c in grid.cells if c.rule == CELL_RULE and c.attack_display == args.attack]
    if not cells:
        raise SystemExit(f"no cell {CELL_RULE} x {args.attack} in {args.grid}; attacks: "
                         f"{sorted({c.attack_display for c in grid.cells})}")
    cfg = parse_config(grid.config(cells[0]))
    captured = {}
    original_run = Simulation.run

    def run_and_keep(self, *a, **k):     # keeps the Simulation to read its replica afterwards
        captured["sim"] = self
        return original_run(self, *a, **k)

    Simulation.run = run_and_keep
    kwargs = {} if args.threads is None else {"threads": args.threads}
    cpu_at: list[float] = []
    records: list[dict] = []   # collected here: SimResult keeps them only when asked to

    def on_record(rec: dict) -> None:
        cpu_at.append(time.process_time())
        records.append(rec)
        done = rec["round"] + 1
        if args.block and done % args.block == 0 and done < args.rounds:
            sys.stdout.write("tick\n")          # my turn is over: wait for the next one
            sys.stdout.flush()
            if sys.stdin.readline().strip() != "go":
                raise SystemExit("benchmark parent went away")

    t0 = time.perf_counter()
    res = simulate(cfg, args.data_root, rounds=args.rounds, on_record=on_record, **kwargs)
    wall = time.perf_counter() - t0
    replica = captured["sim"].replica
    h = hashlib.blake2b(digest_size=16)
    h.update(replica.theta.detach().contiguous().numpy().tobytes())
    h.update(replica.momentum_buffer().contiguous().numpy().tobytes())
    steady = [r["seconds_round"] for r in records
              if r.get("test_accuracy") is None and r["round"] > 0]
    return {"package": str(Path(byzps.__file__).parent), "rounds": res.rounds,
            "s_per_round": statistics.fmean(steady), "s_per_round_median": statistics.median(steady),
            "summary_s_per_round": res.seconds_per_round, "wall_s": wall,
            "cpu_s_per_round": (cpu_at[-2] - cpu_at[0]) / (len(cpu_at) - 2),
            "per_round": [r["seconds_round"] for r in records],
            "theta_buf_hash": h.hexdigest(), "digest": res.digest,
            "accuracy": res.test_accuracy, "torch_threads_after": torch.get_num_threads()}


def _lockstep(args: argparse.Namespace, versions: list) -> list[tuple[str, dict]]:
    """Run one child per version, taking turns ``args.block`` rounds at a time; returns
    ``(label, measurements)`` per version.

    Raises:
        RuntimeError: a child failed (its stderr is in the message).
    """
    children = []
    for label, src, threads in versions:
        cmd = [sys.executable, __file__, "--child", "--rounds", str(args.rounds), "--block",
               str(args.block), "--attack", args.attack, "--grid", args.grid, "--data-root",
               args.data_root]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        err = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=src), text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        children.append([label, proc, err, None])
        _turn(children[-1], first=True)          # set-up and the first block, alone
    while any(c[3] is None for c in children):
        for c in children:
            if c[3] is None:
                _turn(c, first=False)
    return [(c[0], c[3]) for c in children]


def _turn(child_: list, first: bool) -> None:
    """Let one child run until its next ``tick`` (or its final JSON line, kept in child_[3])."""
    label, proc, err, _ = child_
    if not first:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    line = proc.stdout.readline()
    if line.strip() == "tick":
        return
    if not line:
        proc.wait()
        err.seek(0)
        raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{err.read()}")
    child_[3] = json.loads(line)
    proc.wait()


def parent(args: argparse.Namespace) -> int:
    here = str(REPO / "src")
    counts = [None] if args.threads is None else [int(c) for c in args.threads.split(",")]
    versions = [("this" if c is None else f"this@{c}", here, c) for c in counts]
    if args.compare:
        versions = [("base", str(Path(args.compare).resolve()), None)] + versions
    runs = []
    load_before = _load()
    for rep in range(args.reps):
        load = _load()
        for label, rec in _lockstep(args, versions):
            rec.update(label=label, rep=rep, load_at_start=load)
            runs.append(rec)
            print(f"rep {rep} {label:7s} {rec['s_per_round']:.4f} s/round "
                  f"(median {rec['s_per_round_median']:.4f}; summary "
                  f"{rec['summary_s_per_round']:.4f}; cpu {rec['cpu_s_per_round']:.4f}) theta+buf {rec['theta_buf_hash']} digest "
                  f"{rec['digest']} acc {rec['accuracy']:.4f} load {load}", flush=True)
    summary = {}
    for label, _, _ in versions:
        mine = [r for r in runs if r["label"] == label]
        summary[label] = {"s_per_round_mean_of_runs": statistics.fmean(r["s_per_round"]
                                                                      for r in mine),
                          "s_per_round_best": min(r["s_per_round"] for r in mine),
                          "cpu_s_per_round_mean": statistics.fmean(r["cpu_s_per_round"]
                                                                   for r in mine),
                          "theta_buf_hashes": sorted({r["theta_buf_hash"] for r in mine}),
                          "digests": sorted({r["digest"] for r in mine})}
    if args.compare:
        base = summary["base"]
        for label, _, _ in versions[1:]:
            mine = summary[label]
            mine["speedup_mean"] = base["s_per_round_mean_of_runs"] / mine[
                "s_per_round_mean_of_runs"]
            mine["speedup_best"] = base["s_per_round_best"] / mine["s_per_round_best"]
            mine["same_final_model_as_base"] = base["theta_buf_hashes"] == mine[
                "theta_buf_hashes"]
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv),
              "block": args.block,
              "cell": f"{CELL_RULE} x {args.attack}, 10 honest + 3 Byzantine, cnn_mnist",
              "rounds": args.rounds, "threads_this": counts,
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
              "load_before": load_before, "load_after": _load(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "summary": summary, "runs": runs}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default=str(HERE / "robustness_f3.yaml"))
    p.add_argument("--attack", default="sign_flip(-4)", help="attack label of the grid file")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--block", type=int, default=2,
                   help="rounds per turn when versions take turns (0 = no turns, child only)")
    p.add_argument("--threads", default=None,
                   help="comma-separated simulate(threads=...) values for this version, one "
                        "run each per rep (default: one run with its own default)")
    p.add_argument("--compare", default=None, help="another package's src folder to interleave")
    p.add_argument("--data-root", default="./data")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.threads = None if args.threads is None else int(args.threads)
        print(json.dumps(child(args)))
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
