"""Keyless strangers against a training PS (a benchmark, not a test): issue 11, items 5 and 6.

Starts a real PS with per-worker keys and 4 workers (3 honest, 1 sign-flip; mlp on a slice of
MNIST; a checkpoint every round) on 127.0.0.1, the PS under an open-file soft limit of
``--nofile`` (default 1024, the common default), waits for round 3, then attacks for
``--hold`` seconds, keeping the attack's connections open and reopening every one the PS
closes (every 0.5 s):

* ``flood``: ``--connections`` (3,000) keyless TCP connections to the training port that
  never say HELLO, from ``--sources`` loopback addresses (127.0.0.2, 127.0.0.3, ...);
* ``status``: ``--idle`` (150) idle connections plus ``--huge`` (40) that send an endless
  request head (header lines of 60 KB, as fast as the PS takes them) to the status endpoint
  (``server.metrics_port``); a scraper GETs ``/status`` every second meanwhile.

It samples the PS process every 0.2 s from /proc (resident memory, peak resident memory
VmHWM, threads, open descriptors) and reports them with the PS's exit status, the rounds it
completed, the checkpoints it wrote, its seconds per round before and during the attack, and
the lines its log gained. The PS is then stopped with SIGTERM (``ps_exit`` -15) unless it died
during the attack. ``--src`` runs another source tree's PS (e.g. an export of ``main``
for the "before" figures); the workers always run this tree's code.

    .venv/bin/python benchmarks/stranger_load.py flood [--src DIR] [--out results.json]
    .venv/bin/python benchmarks/stranger_load.py status [--src DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from byzps.net import auth  # noqa: E402

from conftest import free_port, node_env  # noqa: E402


def proc_sample(pid: int) -> dict:
    """VmRSS/VmHWM (MiB), Threads and open descriptors of ``pid`` (empty once it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
            elif key == "Threads":
                out[key] = int(value)
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return {}
    return out


class Sampler(threading.Thread):
    """Samples a process every ``every`` seconds; keeps the maxima and the samples."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, dict]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            s = proc_sample(self.pid)
            if not s:
                return
            self.samples.append((time.monotonic(), s))
            time.sleep(self.every)

    def peak(self, key: str, since: float = 0.0) -> float:
        vals = [s[key] for t, s in self.samples if t >= since and key in s]
        return max(vals) if vals else float("nan")

    def last(self, key: str) -> float:
        return self.samples[-1][1].get(key) if self.samples else None


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def open_conn(port: int, source: str) -> socket.socket | None:
    c = socket.socket()
    try:
        c.bind((source, 0))
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
    except OSError:
        c.close()
        return None
    return c


def alive(c: socket.socket) -> bool:
    """Whether the PS has not closed or refused ``c`` (drains what it sent); a connection
    still being set up (the PS's accept queue is full) counts as alive."""
    if c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
        return False
    try:
        while True:
            if not c.recv(65536, socket.MSG_DONTWAIT):
                return False
    except BlockingIOError:
        return True
    except OSError as e:
        return e.errno == errno.ENOTCONN


def attack(kind: str, args, port: int, stop: threading.Event, stats: dict) -> None:
    """Hold the attack's connections open, reopening each one the PS closes."""
    if kind == "flood":
        plan = [f"127.0.0.{2 + k % args.sources}" for k in range(args.connections)]
        huge = set()
    else:
        plan = ["127.0.0.2"] * (args.idle + args.huge)
        huge = set(range(args.idle, args.idle + args.huge))
    conns: list[socket.socket | None] = [None] * len(plan)
    pad = b"X-Pad: " + b"a" * 60_000 + b"\r\n"
    while not stop.is_set():
        for k, source in enumerate(plan):
            c = conns[k]
            if c is not None and not alive(c):
                c.close()
                c = conns[k] = None
                stats["closed_by_ps"] += 1
            if c is None:
                c = conns[k] = open_conn(port, source)
                stats["opened"] += 1
                if c is not None and k in huge:
                    try:
                        c.send(b"GET /status HTTP/1.1\r\n")
                    except OSError:
                        pass
            if c is not None and k in huge:
                try:
                    while True:
                        c.send(pad)
                        stats["header_bytes"] += len(pad)
                except OSError:
                    pass
        stats["held"] = sum(c is not None for c in conns)
        stop.wait(0.5)
    for c in conns:
        if c is not None:
            c.close()


def scraper(url: str, stop: threading.Event, stats: dict) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                resp.read()
            stats["scrapes_ok"] += 1
            stats["scrape_max_s"] = max(stats["scrape_max_s"], time.perf_counter() - start)
        except OSError:
            stats["scrapes_failed"] += 1
        stop.wait(1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=["flood", "status"])
    ap.add_argument("--src", default=str(ROOT / "src"),
                    help="source tree of the PS (its parent folder holds the ps_node.py run)")
    ap.add_argument("--nofile", type=int, default=1024, help="the PS's open-file soft limit")
    ap.add_argument("--connections", type=int, default=3000)
    ap.add_argument("--sources", type=int, default=30, help="flood: source addresses")
    ap.add_argument("--idle", type=int, default=150)
    ap.add_argument("--huge", type=int, default=40)
    ap.add_argument("--hold", type=float, default=30.0, help="seconds of attack")
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections + args.idle + args.huge + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(want, soft)), hard))

    tmp = Path(tempfile.mkdtemp(prefix="byzps-strangers-"))
    auth.write_keys(tmp / "ps.secrets.yaml", auth.generate_keys(range(4)))
    port, mport = free_port(), free_port()
    config = {
        "training": {"rounds": args.rounds, "batch_size": 32, "learning_rate": 0.05,
                     "momentum": 0.9, "seed": 0, "model": "mlp", "eval_every": 100000,
                     "round_timeout": 30.0, "train_limit": 4000, "test_limit": 1000,
                     "metrics_file": str(tmp / "metrics.jsonl"), "checkpoint_every": 1,
                     "checkpoint_dir": str(tmp / "ck")},
        "aggregation": {"method": "coordinate_wise_median"},
        "server": {"host": "127.0.0.1", "port": port, "connect_timeout": 120.0,
                   "secrets_file": str(tmp / "ps.secrets.yaml"),
                   **({"metrics_port": mport} if args.scenario == "status" else {})},
        "workers": [{"id": i, "type": "byzantine" if i == 3 else "honest"} for i in range(4)],
    }
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    ps_env = dict(node_env(), PYTHONPATH=args.src)

    def low_nofile():
        import resource as r
        r.setrlimit(r.RLIMIT_NOFILE, (args.nofile, r.getrlimit(r.RLIMIT_NOFILE)[1]))

    node = [sys.executable, str(ROOT / "ps_node.py"), "--config", str(cfg)]
    ps_node = [sys.executable, str(Path(args.src).resolve().parent / "ps_node.py"), "--config",
               str(cfg)]
    ps_log = tmp / "ps.log"
    ps = subprocess.Popen(ps_node + ["--role", "server"], stdout=open(ps_log, "w"),
                          stderr=subprocess.STDOUT, env=ps_env, cwd=ROOT,
                          preexec_fn=low_nofile)
    workers = [subprocess.Popen(node + ["--role", "worker", "--worker-id", str(i)],
                                stdout=open(tmp / f"w{i}.log", "w"),
                                stderr=subprocess.STDOUT, env=node_env(), cwd=ROOT)
               for i in range(4)]
    sampler = Sampler(ps.pid)
    sampler.start()
    deadline = time.time() + 300
    while len(records(tmp / "metrics.jsonl")) < 3:
        if ps.poll() is not None or time.time() > deadline:
            print(ps_log.read_text()[-3000:])
            return 1
        time.sleep(0.1)
    time.sleep(1.0)
    quiet = records(tmp / "metrics.jsonl")
    before = {k: sampler.last(k) for k in ("VmRSS", "Threads", "fds")}
    log_lines_before = len(ps_log.read_text().splitlines())
    stats = {"opened": 0, "closed_by_ps": 0, "held": 0, "header_bytes": 0, "scrapes_ok": 0,
             "scrapes_failed": 0, "scrape_max_s": 0.0}
    stop = threading.Event()
    threads = [threading.Thread(target=attack, args=(args.scenario, args,
                                                     port if args.scenario == "flood" else mport,
                                                     stop, stats), daemon=True)]
    if args.scenario == "status":
        threads.append(threading.Thread(target=scraper, args=(
            f"http://127.0.0.1:{mport}/status", stop, stats), daemon=True))
    for t in threads:
        t.start()
    stop.wait(args.hold)
    during = {k: sampler.last(k) for k in ("VmRSS", "Threads", "fds")}
    ps_alive_at_end = ps.poll() is None
    at_attack_end = records(tmp / "metrics.jsonl")
    stop.set()
    for t in threads:
        t.join(30)
    for p in [ps] + workers:
        if p.poll() is None:
            p.terminate()
    for p in [ps] + workers:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    sampler.stop.set()
    text = ps_log.read_text()
    quiet_s = [r["seconds_round"] for r in quiet]
    attacked = [r for r in at_attack_end if r["round"] >= len(quiet)]
    result = {
        "scenario": args.scenario, "src": args.src, "nofile_soft": args.nofile,
        "attack_seconds": args.hold, "attack": stats,
        "ps_alive_after_attack": ps_alive_at_end, "ps_exit": ps.returncode,
        "rounds_before_attack": len(quiet), "rounds_during_attack": len(attacked),
        "s_per_round_quiet": round(sum(quiet_s) / len(quiet_s), 4),
        "s_per_round_attack": round(sum(r["seconds_round"] for r in attacked) / len(attacked), 4)
        if attacked else None,
        "checkpoint_written": (tmp / "ck" / "latest.pt").exists(),
        "ps_before": before, "ps_during_end": during,
        "ps_peak_rss_mib": round(sampler.peak("VmHWM"), 1),
        "ps_peak_threads": sampler.peak("Threads"), "ps_peak_open_fds": sampler.peak("fds"),
        "ps_log_lines_added": len(text.splitlines()) - log_lines_before,
        "ps_log_warnings_added": sum(" WARNING " in ln or " ERROR " in ln
                                     for ln in text.splitlines()[log_lines_before:]),
        "ps_log_bytes": len(text.encode()),
        "ps_log_tracebacks": text.count("Traceback"),
        "ps_log_tail": text.splitlines()[-3:],
        "load_average": os.getloadavg(), "tmp": str(tmp),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
