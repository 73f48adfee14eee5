"""What a slow or Byzantine worker costs the PS (issue 11, items 1-3), a benchmark, not a test.

Runs a real PS and real honest worker processes on 127.0.0.1 (per-worker keys, n = 4, f = 1,
coordinate-wise median), worker 3 being the one under study:

- ``slow``: worker 3 is an honest worker process whose every gradient takes ``--slow`` (1.0)
  extra seconds; reports seconds per round and the final test accuracy.
- ``late``: worker 3 is Byzantine (``tests/hostile.py``) and answers every ROUND with NaN
  ``--late`` (0.87) seconds after it arrived; ``round_timeout`` 1 s; seconds per round.
- ``resync``: worker 3 sends ``--resyncs`` (700) RESYNC frames, one each ``--interval`` s, and
  reads everything; reports the STATE bytes and frames it received and the RESYNC bytes sent.
- ``idclaim``: worker 3 answers every ROUND with a GRADIENT whose header claims a new worker
  id; reports the size of the PS's metrics.jsonl and of its last record.

``--close-at all|quorum`` sets ``training.close_at`` (left out of the config when not given, so
the script also drives code from before that field: ``--src DIR`` runs the PS and workers of
another checkout, e.g. ``git archive main | tar -x -C /tmp/main``). One JSON line of results
is printed and, with ``--out``, appended to that file.

    .venv/bin/python benchmarks/hostile_worker.py late --rounds 30 [--close-at quorum]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from byzps.metrics import read_jsonl  # noqa: E402
from byzps.models import build_model  # noqa: E402
from byzps.net import auth  # noqa: E402
from byzps.net.wire import MAC_BYTES, Resync, encode  # noqa: E402

from conftest import free_port  # noqa: E402
from hostile import HostileWorker  # noqa: E402

#: the honest worker process of ``slow``: ps_node's own code, each gradient delayed
SLOW_WORKER = """
import sys, time
sys.path.insert(0, {src!r})
import byzps.core.worker as bw
_compute = bw.WorkerCore.compute
def _slow(self, round_):
    time.sleep({delay!r})
    return _compute(self, round_)
bw.WorkerCore.compute = _slow
from byzps.cli import main
sys.exit(main({argv!r}))
"""


def model_size(name: str) -> int:
    """Number of parameters d of the model ``name``."""
    return sum(p.numel() for p in build_model(name, 0).parameters())


def start(src: Path, cfg: Path, role: str, log: Path, wid: int | None = None,
          slow: float = 0.0) -> subprocess.Popen:
    """A PS or worker process of the checkout ``src`` (one torch thread)."""
    argv = ["--config", str(cfg), "--role", role]
    if wid is not None:
        argv += ["--worker-id", str(wid)]
    if slow > 0:
        cmd = [sys.executable, "-c", SLOW_WORKER.format(src=str(src / "src"), delay=slow,
                                                        argv=argv)]
    else:
        cmd = [sys.executable, str(src / "ps_node.py"), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(src / "src"))
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            cwd=src)


def _signature(config: dict):
    """The model signature a worker of ``config`` sends in its HELLO (this checkout's PS
    refuses a worker whose model differs; an older PS takes none)."""
    from byzps.job import Job, parse_config

    return Job(parse_config(config)).replica().signature()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=["slow", "late", "resync", "idclaim"])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--close-at", choices=["all", "quorum"], default=None)
    ap.add_argument("--model", default=None, help="default: mlp (resync: cnn_mnist, "
                    "idclaim: logreg)")
    ap.add_argument("--slow", type=float, default=1.0, help="slow: extra seconds per gradient")
    ap.add_argument("--late", type=float, default=0.87, help="late: seconds before answering")
    ap.add_argument("--round-timeout", type=float, default=None,
                    help="default 1.0 (late), 10.0 (others)")
    ap.add_argument("--resyncs", type=int, default=700)
    ap.add_argument("--interval", type=float, default=0.005)
    ap.add_argument("--src", type=Path, default=ROOT, help="checkout whose nodes to run")
    ap.add_argument("--out", type=Path, default=None, help="append the JSON line here")
    args = ap.parse_args()
    model = args.model or {"resync": "cnn_mnist", "idclaim": "logreg"}.get(args.scenario, "mlp")
    timeout = args.round_timeout or (1.0 if args.scenario == "late" else 10.0)
    tmp = Path(tempfile.mkdtemp(prefix=f"byzps-{args.scenario}-"))
    port = free_port()
    keys = auth.generate_keys(range(4))
    auth.write_keys(tmp / "ps.secrets.yaml", keys)
    training = {"rounds": args.rounds, "batch_size": 32, "learning_rate": 0.05,
                "momentum": 0.9, "seed": 0, "model": model, "eval_every": args.rounds,
                "round_timeout": timeout, "train_limit": 10000, "test_limit": 2000,
                "metrics_file": str(tmp / "metrics.jsonl")}
    if args.close_at is not None:
        training["close_at"] = args.close_at
    config = {
        "training": training,
        "aggregation": {"method": "coordinate_wise_median", "f": 1},
        "server": {"host": "127.0.0.1", "port": port, "connect_timeout": 120.0,
                   "secrets_file": str(tmp / "ps.secrets.yaml")},
        "workers": [{"id": i, "type": "honest", "data_shard": i} for i in range(4)],
    }
    (tmp / "ps.yaml").write_text(yaml.safe_dump(config))
    ps = start(args.src, tmp / "ps.yaml", "server", tmp / "ps.log")
    procs, hostile = [], None
    d = model_size(model)
    if args.scenario != "slow":
        mode = {"late": "late", "resync": "resync", "idclaim": "claim_ids"}[args.scenario]
        hostile = HostileWorker(port, 3, keys[3], d, mode, delay=args.late, nan=True,
                                resyncs=args.resyncs, interval=args.interval,
                                model=None if args.src else _signature(config))
    honest = range(4) if args.scenario == "slow" else range(3)
    for i in honest:
        auth.write_keys(tmp / f"w{i}.secrets.yaml", {i: keys[i]})
        wcfg = dict(config, server=dict(config["server"],
                                        secrets_file=str(tmp / f"w{i}.secrets.yaml")))
        (tmp / f"w{i}.yaml").write_text(yaml.safe_dump(wcfg))
        procs.append(start(args.src, tmp / f"w{i}.yaml", "worker", tmp / f"w{i}.log", i,
                           slow=args.slow if (args.scenario == "slow" and i == 3) else 0.0))
    if hostile is not None:
        deadline = time.time() + 60
        while time.time() < deadline:           # connect once the PS listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        hostile.start()
    started = time.time()
    rc = ps.wait(3600)
    wall = time.time() - started
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    if hostile is not None:
        hostile.stop()
    log = (tmp / "ps.log").read_text()
    records = read_jsonl(tmp / "metrics.jsonl")
    acc = re.search(r"final test accuracy: ([0-9.]+)", log)
    secs = [r["seconds_round"] for r in records if "seconds_round" in r]
    result = {
        "scenario": args.scenario, "src": str(args.src), "close_at": args.close_at,
        "model": model, "d": d, "rounds": len(records), "round_timeout": timeout,
        "exit_code": rc, "wall_seconds": round(wall, 2),
        "seconds_per_round_mean": round(sum(secs) / len(secs), 4) if secs else None,
        "seconds_per_round_median": round(sorted(secs)[len(secs) // 2], 4) if secs else None,
        "final_test_accuracy": float(acc.group(1)) if acc else None,
        "load_average": os.getloadavg(),
    }
    if args.scenario == "slow":
        result["slow_seconds"] = args.slow
        result["rounds_with_worker_3"] = sum(3 in r["accepted"] for r in records)
    if hostile is not None:
        result["hostile_connects"] = hostile.connects
    if args.scenario == "late":
        result["late_seconds"] = args.late
    if args.scenario == "resync":
        result.update(resyncs_sent=hostile.resyncs_sent,
                      resync_bytes_sent=hostile.resyncs_sent * (MAC_BYTES + sum(
                          len(bytes(b)) for b in encode(Resync(0), mac=True))),
                      state_frames=hostile.frames_by_type["State"],
                      state_bytes=hostile.bytes_by_type["State"])
        result["amplification"] = round(result["state_bytes"] / max(1, result[
            "resync_bytes_sent"]), 1)
    if args.scenario == "idclaim":
        sizes = [len(json.dumps(r)) for r in records]
        result.update(metrics_bytes=(tmp / "metrics.jsonl").stat().st_size,
                      last_record_bytes=sizes[-1] if sizes else None,
                      first_record_bytes=sizes[0] if sizes else None,
                      rounds_rejected_3=sum("3" in r["rejected"] for r in records))
    line = json.dumps(result)
    print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as fh:
            fh.write(line + "\n")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
