"""Soak run (a benchmark, not a test): many rounds with random worker kills and restarts.

Starts a real PS and n workers on 127.0.0.1 (small_cnn on a slice of MNIST, so rounds are cheap),
then every few seconds kill -9s a random worker and starts it again after a pause. Reports the
rounds completed, rounds that closed without some worker, rejected gradients, worker
disconnects seen by the PS, and the PS's resident memory after the first round and at the end.

    .venv/bin/python benchmarks/soak.py [--rounds 1000] [--workers 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import free_port, node_env  # noqa: E402


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(cfg: Path, role: str, log: Path, wid: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "ps_node.py"), "--config", str(cfg), "--role", role]
    if wid is not None:
        cmd += ["--worker-id", str(wid)]
    return subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=node_env(),
                            cwd=ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills")
    ap.add_argument("--settle", type=float, default=15.0,
                    help="a worker is killed only after running this many seconds")
    ap.add_argument("--model", default="small_cnn", help="model name (see byzps list)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="byzps-soak-"))
    n = args.workers
    config = {
        "training": {"rounds": args.rounds, "batch_size": 32, "learning_rate": 0.05,
                     "momentum": 0.9, "model": args.model, "eval_every": 100,
                     "round_timeout": 2.0, "round_retries": 50, "max_missed_rounds": 3,
                     "quorum": max(1, n - 2),
                     "train_limit": 5000, "test_limit": 2000,
                     "metrics_file": str(tmp / "metrics.jsonl")},
        "aggregation": {"method": "coordinate_wise_median", "f": 1},
        "server": {"host": "127.0.0.1", "port": free_port(), "connect_timeout": 120.0},
        "workers": [{"id": i, "type": "byzantine" if i == n - 1 else "honest"}
                    for i in range(n)],
    }
    cfg = tmp / "soak.yaml"
    cfg.write_text(yaml.safe_dump(config))
    started = time.time()
    server = start(cfg, "server", tmp / "ps.log")
    workers = {i: start(cfg, "worker", tmp / f"w{i}.log", i) for i in range(n)}
    born = {i: time.time() for i in range(n)}
    metrics = tmp / "metrics.jsonl"
    while not metrics.exists() or not metrics.read_text().strip():
        if server.poll() is not None:
            print((tmp / "ps.log").read_text())
            return 1
        time.sleep(0.2)
    rss_start = rss_end = rss_mib(server.pid)
    kills = 0
    next_kill = time.time() + args.kill_every
    dead: dict[int, float] = {}
    while server.poll() is None:
        now = time.time()
        if now >= next_kill:
            victim = rng.randrange(n)
            # kill only workers that had time to start and register (start-up takes seconds)
            if victim not in dead and workers[victim].poll() is None and \
                    now - born[victim] > args.settle:
                workers[victim].kill()
                workers[victim].wait()
                dead[victim] = now + rng.uniform(1.0, 4.0)
                kills += 1
            next_kill = now + args.kill_every
        for wid, when in list(dead.items()):
            if now >= when:
                workers[wid] = start(cfg, "worker", tmp / f"w{wid}.log", wid)
                born[wid] = now
                del dead[wid]
        try:
            rss = rss_mib(server.pid)
            rss_end = rss if rss == rss else rss_end   # nan once the PS has exited
        except OSError:
            pass
        time.sleep(0.1)
    wall = time.time() - started
    for p in workers.values():
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    log = (tmp / "ps.log").read_text()
    partial = sum(1 for r in records if r["missing"] or len(r["accepted"]) < n)
    rejected = sum(len(r["rejected"]) for r in records)
    final = re.search(r"final test accuracy: ([0-9.]+)", log)
    print(f"soak: {len(records)} of {args.rounds} rounds completed in {wall:.0f} s "
          f"(PS exit {server.returncode}); {kills} worker kills + restarts")
    print(f"rounds closed without some worker: {partial}; rejected gradients: {rejected}; "
          f"worker disconnects seen by the PS: "
          f"{len(re.findall(r'connection lost|closed the connection|dropped', log))}")
    print(f"PS resident memory: {rss_start:.0f} MiB after round 1, {rss_end:.0f} MiB at the end")
    print(f"final test accuracy: {final.group(1) if final else 'n/a'}; logs in {tmp}")
    return 0 if server.returncode == 0 and len(records) == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
