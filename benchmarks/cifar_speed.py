"""Seconds per round of CIFAR-10 ResNet-20 on this machine, over TCP and in simulation.

There is no internet on the project's machines, so no CIFAR-10: the time of a round does not
depend on pixel values, so this script writes a stand-in data root in the binary version's
format (``cifar-10-batches-bin/data_batch_1.bin`` .. ``data_batch_5.bin`` and
``test_batch.bin``, each ``--records`` records of 1 label byte + 3,072 pixel bytes, seeded
random bytes; 10,000 records per file as in the official files unless told otherwise), then

1. runs ``byzps run`` (a PS and ``--workers`` honest workers as real processes on 127.0.0.1)
   with ``task: {ref: cifar10, params: {model: resnet20}}``, batch 32, the given rule,
   ``training.close_at: all``, ``eval_every`` larger than the rounds (so only the last round is
   evaluated) and a small ``test_limit``, and reads ``seconds_round`` from the PS's
   ``metrics.jsonl``, leaving out round 0 (connections, first STATE) and evaluated rounds;
2. runs ``byzps simulate`` on the same config and reads its per-round ``seconds_round``
   (``--metrics``; same exclusions) and the summary's s/round (evaluations excluded).

Usage::

    .venv/bin/python benchmarks/cifar_speed.py [--rounds 15] [--workers 4] [--records 10000]
        [--method coordinate_wise_median] [--out /tmp/cifar-speed] [--threads N]

Prints the per-round seconds and the median and mean of both, and writes ``summary.json``
into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

RECORD_BYTES = 1 + 3 * 32 * 32
FILES = tuple(f"data_batch_{k}.bin" for k in range(1, 6)) + ("test_batch.bin",)


def make_data_root(root: Path, records: int, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-bin/`` with the six files of ``records`` random records
    each (labels 0..9, pixels 0..255); files already of the right size are kept."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in FILES:
        rec = rng.integers(0, 256, size=(records, RECORD_BYTES), dtype=np.uint8)
        rec[:, 0] = rng.integers(0, 10, size=records, dtype=np.uint8)
        path = folder / name
        if path.is_file() and path.stat().st_size == records * RECORD_BYTES:
            continue
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(rec.tobytes())
        os.replace(tmp, path)
    return root


def write_config(path: Path, rounds: int, workers: int, method: str, test_limit: int) -> Path:
    cfg = {
        "task": {"ref": "cifar10", "params": {"model": "resnet20", "download": False}},
        "training": {"rounds": rounds, "batch_size": 32, "learning_rate": 0.05,
                     "momentum": 0.9, "seed": 0, "eval_every": 100_000,
                     "test_limit": test_limit, "round_timeout": 600.0, "close_at": "all"},
        "aggregation": {"method": method},
        "server": {"host": "127.0.0.1", "port": 9000, "bind_host": "127.0.0.1",
                   "connect_timeout": 300.0},
        "workers": [{"id": i, "type": "honest", "data_shard": i} for i in range(workers)],
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def round_seconds(metrics: Path) -> list[tuple[int, float]]:
    """``(round, seconds_round)`` of every round but round 0 and the evaluated ones."""
    out = []
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if rec["round"] == 0 or rec.get("test_accuracy") is not None:
            continue
        out.append((rec["round"], float(rec["seconds_round"])))
    return out


def stats(xs: list[float]) -> dict:
    return {"n": len(xs), "median": statistics.median(xs), "mean": statistics.fmean(xs),
            "min": min(xs), "max": max(xs)} if xs else {"n": 0}


def uptime() -> str:
    try:
        loads = Path("/proc/loadavg").read_text().split()[:3]
        return f"load average {', '.join(loads)}"
    except OSError:
        return "load average unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--records", type=int, default=10_000,
                    help="records per batch file (1..10000; official: 10000)")
    ap.add_argument("--method", default="coordinate_wise_median")
    ap.add_argument("--test-limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="byzps simulate --threads")
    ap.add_argument("--out", default="/tmp/cifar-speed")
    ap.add_argument("--skip-run", action="store_true", help="simulation only")
    ap.add_argument("--skip-simulate", action="store_true", help="TCP run only")
    args = ap.parse_args(argv)

    byzps = str(Path(sys.executable).parent / "byzps")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    root = make_data_root(out / "data", args.records)
    print(f"data root {root} ({args.records} random records per file) in "
          f"{time.monotonic() - t:.1f} s", flush=True)
    config = write_config(out / "cifar_speed.yaml", args.rounds, args.workers, args.method,
                          args.test_limit)
    summary: dict = {"config": str(config), "records": args.records, "rounds": args.rounds,
                     "workers": args.workers, "method": args.method}

    if not args.skip_run:
        run_dir = out / f"run-{int(time.time())}"
        print(f"byzps run ({uptime()}) ...", flush=True)
        t = time.monotonic()
        rc = subprocess.run([byzps, "run", str(config), "--data-root", str(root),
                             "--run-dir", str(run_dir)]).returncode
        wall = time.monotonic() - t
        per = round_seconds(run_dir / "metrics.jsonl")
        summary["tcp"] = {"rc": rc, "wall_s": wall, "load_after": uptime(),
                          "per_round": per, **stats([s for _, s in per])}
        print(f"TCP: rc {rc}, wall {wall:.1f} s, {uptime()}", flush=True)

    if not args.skip_simulate:
        metrics = out / f"simulate-{int(time.time())}.jsonl"
        cmd = [byzps, "simulate", str(config), "--data-root", str(root),
               "--metrics", str(metrics)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(f"byzps simulate ({uptime()}) ...", flush=True)
        t = time.monotonic()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        wall = time.monotonic() - t
        print(proc.stdout, end="")
        m = re.search(r"\(([0-9.]+) s/round\)", proc.stdout)
        per = round_seconds(metrics)
        summary["simulate"] = {"rc": proc.returncode, "wall_s": wall, "load_after": uptime(),
                               "summary_s_per_round": float(m.group(1)) if m else None,
                               "per_round": per, **stats([s for _, s in per])}
        print(f"simulate: rc {proc.returncode}, wall {wall:.1f} s, {uptime()}", flush=True)

    for kind in ("tcp", "simulate"):
        if kind in summary:
            s = summary[kind]
            rounds = " ".join(f"{r}:{x:.2f}" for r, x in s["per_round"])
            extra = (f", summary {s['summary_s_per_round']} s/round"
                     if kind == "simulate" else "")
            med = f"{s['median']:.3f}" if s["n"] else "-"
            mean = f"{s['mean']:.3f}" if s["n"] else "-"
            print(f"{kind}: s/round median {med}, mean {mean} over {s['n']} rounds{extra}; "
                  f"per round {rounds}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0 if all(summary[k]["rc"] == 0 for k in ("tcp", "simulate") if k in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
