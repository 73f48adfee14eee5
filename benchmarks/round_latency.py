"""Round latency of the networked path (a benchmark, not a test) -- issue 6.

What it times
-------------
**Networked** (one row per model x n x aggregator): the real parameter server
(``ps_node.py --role server``, unchanged) and n stand-in workers, all separate processes on
127.0.0.1. A stand-in worker speaks the real wire protocol (HELLO; STATE, ROUND, UPDATE, STOP
read frame by frame, prefix and header checked) but runs no model and imports neither torch nor
byzps (about 30 MB each, so 64 of them fit anywhere): on every ROUND it sends back at once a
fixed random ``(d,)`` float32 GRADIENT, it applies nothing (payloads are read and dropped),
and it notes when each UPDATE fully arrived. So only the system is timed. Reported per row,
medians over the steady rounds (the first round and the last, which evaluates, are left out),
from the PS's ``training.metrics_file`` and the stand-ins' UPDATE times:

* ``s/round``: wall time between consecutive round closes (a record's ``time`` is its
  round's close), the real round rate, split additively into
* ``bcast``: close of round r -> the last worker holds UPDATE r (the UPDATE bytes; the PS
  meanwhile writes the record and hashes the replica for the next ROUND in a thread);
* ``recv``: that moment -> the PS holds every GRADIENT of round r+1 (ROUND out, turn-around,
  gradient bytes in), validation excluded;
* ``valid``: ``seconds_validate`` (the NaN/Inf check of the n rows, in place);
* ``agg``: ``seconds_aggregate`` (rows moved together if some were missing, the rule, its
  non-finite check, the optimizer step, the per-row distances of the metrics);
* ``cpu``: PS CPU seconds (user + system, /proc) per round;
* ``peak``: the PS's VmHWM; ``base``: its VmRSS after start-up, before any worker connected
  (torch, model, test set); ``x-stack``: (peak - base) / bytes of one (n, d) float32 stack
  (the issue's target: at most 2.5, the model being already in ``base``);
* ``limit``: in this same run, the time to push n*d*4 bytes (n gradients) through a plain
  TCP loopback socket pair, then n*d*4 bytes back (the aggregate to n workers), plus the
  rule's own time on an in-memory (n, d) tensor; ``ratio`` = s/round / limit.

**In-process** (clearly labelled; no sockets, one process): the PS's round logic
(:class:`byzps.core.rounds.ServerRounds`) on an (n, d) workload whose rows are written straight
into its round buffer, as the network layer does: ``fill`` = writing the n rows (a memory copy,
standing in for the kernel's), ``digest`` = ``begin_round`` (the replica digest for ROUND),
``valid`` / ``agg`` = the round's ``seconds_validate`` / ``seconds_aggregate``, ``bcast`` =
``wire.encode`` of the UPDATE (zero-copy; the socket writes are in the limit).

d = 11,000,000: no model of byzps has that size, so the PS cannot run it over the network
as shipped. The model spec ``wide:D`` stands for a one-layer ``Flatten, Linear(784, k)``
classifier with k = round(D / 785) (d = 785 k, e.g. ``wide:11000000`` -> d = 11,000,205),
registered *only inside the benchmark's processes* by replacing ``byzps.models._BUILDERS
["logreg"]`` before the PS starts (src/ is not changed; the PS is then started through
``byzps.cli.main`` with the same arguments as ps_node.py). ``wide:D`` works both in
``--models`` (networked) and ``--inproc-models``.

Threads: the PS and the limit's aggregator run with ``--threads`` torch threads (default 1,
reproducible on a shared machine; see benchmarks/aggregators.py).

Usage (from the repository root)::

    # default, a few minutes on 2 idle cores: n in {4, 16}, cnn_mnist, 20 rounds, both rules
    .venv/bin/python benchmarks/round_latency.py

    # issue 6's headline row: n = 16, d = 11M, networked (PS ~1.3 GB, stand-ins ~1.2 GB)
    .venv/bin/python benchmarks/round_latency.py --workers 16 --models wide:11000000 \\
        --inproc-models none --rounds 10

    # 64 workers x cnn_mnist, 100 rounds
    .venv/bin/python benchmarks/round_latency.py --workers 64 --rounds 100 \\
        --aggregators coordinate_wise_median --inproc-models none

    # where the PS spends its time: one networked run (last n, first model and rule) with
    # the PS under cProfile, and its top functions
    .venv/bin/python benchmarks/round_latency.py --workers 16 --rounds 10 --profile

Other flags: ``--f`` (Byzantine tolerance given to the rule; default min(n // 4, (n - 3) // 2)
so multi_krum's n >= 2f + 3 holds), ``--repeats`` (limit / in-process repetitions),
``--timeout`` (seconds per networked run), ``--json FILE`` (all figures), ``--keep`` (keep the
temporary folder with the PS logs and metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

# torch, yaml and byzps are imported where needed: the stand-in workers (this file run with
# --_worker) must stay light.

# Started with ``python -c`` for a PS that runs a ``wide:D`` model and/or runs under cProfile:
# argv[1] = JSON {"wide": D or null, "profile": path or null}, argv[2:] = ps_node.py arguments.
_PS_BOOT = r"""
import json, sys
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["src"])
if spec.get("wide"):
    from torch import nn
    import byzps.models as models
    k = spec["wide"]
    models._BUILDERS["logreg"] = lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, k))
from byzps.cli import main
if spec.get("profile"):
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
    try:
        rc = main(sys.argv[2:])
    finally:
        prof.disable()
        prof.dump_stats(spec["profile"])
else:
    rc = main(sys.argv[2:])
sys.exit(rc)
"""


# ---------------------------------------------------------------------------------------------
# Models and small helpers


def model_d(name: str) -> int:
    """d of a shipped model, counted from the module itself (not from a table)."""
    from byzps.models import build_model, model_names
    if name not in model_names():
        raise SystemExit(f"unknown model {name!r}: one of {', '.join(model_names())} or wide:D")
    return sum(p.numel() for p in build_model(name, 0).parameters())


def parse_model(spec: str) -> tuple[str, int, Optional[int]]:
    """``cnn_mnist`` -> (config model name, d, None); ``wide:D`` -> ("logreg", 785 k, k)."""
    if spec.startswith("wide:"):
        k = max(1, round(int(spec[5:]) / 785))
        return "logreg", 785 * k, k
    return spec, model_d(spec), None


def label(spec: str) -> str:
    return spec if not spec.startswith("wide:") else f"wide(d={parse_model(spec)[1]:,})"


def default_f(n: int) -> int:
    return max(0, min(n // 4, (n - 3) // 2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int, key: str) -> Optional[int]:
    """A ``kB`` field of /proc/<pid>/status in bytes, or None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def proc_cpu(pid: int) -> Optional[float]:
    """User + system CPU seconds of ``pid`` (threads included), or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def node_env(threads: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(SRC)
    env.setdefault("BYZPS_LOG_LEVEL", "WARNING")
    return env


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------------------
# The stand-in worker (a separate process: this file with --_worker); numpy only

PREFIX = struct.Struct("<4sBBHIQ")     # byzps.net.wire's frame prefix
HELLO, STATE, ROUND, GRADIENT, UPDATE, STOP, REFUSE = 1, 2, 3, 4, 5, 6, 8


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got, size = 0, len(view)
    while got < size:
        k = sock.recv_into(view[got:], size - got)
        if k == 0:
            raise ConnectionError("PS closed the connection")
        got += k


def _discard(sock: socket.socket, size: int, scratch: memoryview) -> None:
    while size:
        k = sock.recv_into(scratch, min(size, len(scratch)))
        if k == 0:
            raise ConnectionError("PS closed the connection")
        size -= k


def _send(sock: socket.socket, buffers: list) -> None:
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def _head(mtype: int, header: dict, payload_len: int = 0) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return PREFIX.pack(b"BZPS", 1, mtype, 0, len(h), payload_len) + h


def stand_in_worker(port: int, wid: int, d: int, seed: int, times_path: str) -> int:
    """Speak the worker side of the protocol with a fixed random gradient; returns exit code.
    Writes ``{"updates": {round: time.time() when its UPDATE fully arrived}}`` to
    ``times_path`` at the end."""
    grad = np.random.default_rng(seed).standard_normal(d, dtype=np.float32)
    grad *= np.float32(0.01)
    payload = memoryview(grad).cast("B")
    deadline = time.monotonic() + 120
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            if time.monotonic() > deadline:
                print(f"stand-in {wid}: PS unreachable on port {port}", file=sys.stderr)
                return 1
            time.sleep(0.2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as asyncio does on the PS
    _send(sock, [_head(HELLO, {"worker_id": wid, "nonce": None})])
    prefix = bytearray(PREFIX.size)
    header = bytearray(4096)
    scratch = memoryview(bytearray(1 << 20))
    updates: dict[int, float] = {}
    rc = 1
    try:
        while True:
            _recv_into(sock, memoryview(prefix))
            magic, version, mtype, flags, hlen, plen = PREFIX.unpack(prefix)
            if magic != b"BZPS" or version != 1 or flags or not 2 <= hlen <= 4096:
                raise ConnectionError(f"bad frame prefix {bytes(prefix)!r}")
            hview = memoryview(header)[:hlen]
            _recv_into(sock, hview)
            h = json.loads(bytes(hview))
            _discard(sock, plen, scratch)
            if mtype == ROUND:
                _send(sock, [_head(GRADIENT, {"round": h["round"], "worker_id": wid, "loss": None,
                                              "dtype": "float32", "shape": [d]}, d * 4),
                             payload])
            elif mtype == UPDATE:
                updates[h["round"]] = time.time()
            elif mtype == STOP:
                rc = 0 if h["ok"] else 1
                return rc
            elif mtype == REFUSE:
                print(f"stand-in {wid}: refused: {h['reason']}", file=sys.stderr)
                return 1
    except (ConnectionError, OSError, ValueError) as e:
        print(f"stand-in {wid}: {e} after {len(updates)} updates", file=sys.stderr)
        return 1
    finally:
        sock.close()
        Path(times_path).write_text(json.dumps({"updates": updates}))


# ---------------------------------------------------------------------------------------------
# The limit: loopback socket pair + the rule on an in-memory tensor


def socket_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
    return a, b


def push(src: socket.socket, dst: socket.socket, rows: int, row: memoryview,
         into: memoryview) -> float:
    """Seconds to send ``rows`` copies of ``row`` from src and receive them at dst (row by row,
    into one preallocated row buffer, as a zero-copy receiver would)."""
    def receiver():
        for _ in range(rows):
            _recv_into(dst, into)
    t = threading.Thread(target=receiver)
    start = time.perf_counter()
    t.start()
    for _ in range(rows):
        src.sendall(row)
    t.join()
    return time.perf_counter() - start


def socket_limit(n: int, d: int, repeats: int) -> tuple[float, float]:
    """Median seconds to move n (d,) float32 rows in, and n out, over TCP loopback."""
    row = memoryview(np.ones(d, dtype=np.float32)).cast("B")
    into = memoryview(bytearray(d * 4))
    a, b = socket_pair()
    try:
        push(a, b, 1, row, into)                                  # warm-up
        t_in = med([push(a, b, n, row, into) for _ in range(repeats)])
        t_out = med([push(b, a, n, row, into) for _ in range(repeats)])
    finally:
        a.close()
        b.close()
    return t_in, t_out


def rule_seconds(method: str, f: int, x, repeats: int) -> float:
    from byzps import aggregators
    agg = aggregators.build(method, f=f)
    agg(x)                                                        # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        agg(x)
        times.append(time.perf_counter() - start)
    return med(times)


# ---------------------------------------------------------------------------------------------
# In-process: the PS's round logic on an (n, d) workload, no sockets


def make_replica(spec: str):
    """A real :class:`byzps.replica.Replica` of the spec's size (``wide:D`` patched in)."""
    from byzps import models
    from byzps.replica import Replica
    name, d, k = parse_model(spec)
    saved = models._BUILDERS["logreg"]
    if k is not None:
        from torch import nn
        models._BUILDERS["logreg"] = lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, k))
    try:
        replica = Replica(name, 0, 0.01, 0.9)
    finally:
        models._BUILDERS["logreg"] = saved
    assert replica.d == d, (spec, replica.d, d)
    return replica


def in_process(spec: str, n: int, methods: list[str], f: int, repeats: int) -> list[dict]:
    import torch

    from byzps import aggregators, wire
    from byzps.core.rounds import Broadcast, RoundClosed, ServerRounds
    _, d, _ = parse_model(spec)
    base = torch.randn(d, generator=torch.Generator().manual_seed(0)) * 0.01
    scales = [1.0 + 0.01 * i for i in range(n)]
    t_in, t_out = socket_limit(n, d, repeats)
    out = []
    for method in methods:
        rule = aggregators.build(method, f=f)
        rule.check(n)
        machine = ServerRounds(list(range(n)), make_replica(spec), rule, rounds=repeats + 1,
                               quorum=n)
        for w in range(n):
            machine.connect(w)
        pieces: dict[str, list[float]] = {k: [] for k in ("fill", "digest", "valid", "agg",
                                                          "bcast")}
        for rep in range(repeats + 1):                            # the first is a warm-up
            t = {}
            s = time.perf_counter()
            r = machine.round
            machine.begin_round()
            t["digest"] = time.perf_counter() - s
            t["fill"], actions = 0.0, []
            for w in range(n):
                s = time.perf_counter()
                row = machine.receive_buffer(w, r)
                torch.mul(base, scales[w], out=row)
                t["fill"] += time.perf_counter() - s
                actions = machine.on_message(w, wire.Gradient(r, w, row, None))
            closed = next(a for a in actions if isinstance(a, RoundClosed))
            t["valid"], t["agg"] = closed.seconds_validate, closed.seconds_aggregate
            update = next(a.message for a in actions if isinstance(a, Broadcast))
            s = time.perf_counter()
            wire.encode(update)
            t["bcast"] = time.perf_counter() - s
            if rep:
                for k, v in t.items():
                    pieces[k].append(v)
        del machine
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
        t_rule = rule_seconds(method, f, x, repeats)
        del x
        res = {k: med(v) for k, v in pieces.items()}
        res["total"] = sum(res.values())
        limit = t_in + t_rule + t_out
        out.append({"model": spec, "d": d, "n": n, "method": method, "f": f, **res,
                    "limit": limit, "limit_in": t_in, "limit_rule": t_rule, "limit_out": t_out,
                    "ratio_total_over_limit": res["total"] / limit, "load": load()})
    return out


# ---------------------------------------------------------------------------------------------
# Networked run


def split_rounds(records: list[dict], updates: list[dict[int, float]]) -> dict[str, Any]:
    """Per steady round pair (r, r+1): period, bcast, recv, valid, agg (see the docstring);
    medians."""
    by_round = {r["round"]: r for r in records}
    rounds = sorted(by_round)[1:-1] if len(by_round) >= 3 else sorted(by_round)
    cols: dict[str, list[float]] = {k: [] for k in ("period", "bcast", "recv", "valid", "agg",
                                                    "latency_max", "bytes_per_worker")}
    for r in rounds:
        a, b = by_round[r], by_round.get(r + 1)
        if b is None or r + 1 not in rounds:
            continue
        held = [u.get(r) for u in updates]
        if not held or any(t is None for t in held):
            continue
        period = b["time"] - a["time"]
        bcast = max(held) - a["time"]
        valid = b.get("seconds_validate") or 0.0
        agg = b["seconds_aggregate"]
        cols["period"].append(period)
        cols["bcast"].append(bcast)
        cols["valid"].append(valid)
        cols["agg"].append(agg)
        cols["recv"].append(period - bcast - valid - agg)
        lat = [w.get("latency") for w in b["workers"].values() if w.get("latency") is not None]
        nbytes = [w.get("bytes") for w in b["workers"].values() if w.get("bytes") is not None]
        if lat:
            cols["latency_max"].append(max(lat))
        if nbytes:
            cols["bytes_per_worker"].append(statistics.mean(nbytes))
    out = {k: med(v) for k, v in cols.items()}
    out["pairs"] = len(cols["period"])
    return out


def networked(spec: str, n: int, method: str, f: int, rounds: int, threads: int,
              repeats: int, tmp: Path, data_root: str, timeout: float,
              profile: Optional[Path] = None) -> dict:
    import yaml
    name, d, wide_k = parse_model(spec)
    tag = f"{label(spec)}-n{n}-{method}" + ("-profile" if profile else "")
    run_dir = tmp / tag
    run_dir.mkdir(parents=True)
    metrics = run_dir / "metrics.jsonl"
    port = free_port()
    cfg = {
        "training": {"rounds": rounds, "batch_size": 32, "learning_rate": 0.01,
                     "momentum": 0.9, "model": name, "eval_every": rounds,
                     "round_timeout": max(60.0, timeout), "test_limit": 100,
                     "metrics_file": str(metrics)},
        "aggregation": {"method": method, "f": f},
        "server": {"host": "127.0.0.1", "port": port, "connect_timeout": max(120.0, timeout),
                   "write_timeout": 120.0, "hello_timeout": 60.0},
        "workers": [{"id": i} for i in range(n)],
    }
    cfg_path = run_dir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    args = ["--config", str(cfg_path), "--role", "server", "--data-root", data_root]
    if wide_k is None and profile is None:
        cmd = [sys.executable, str(ROOT / "ps_node.py")] + args
    else:
        spec_json = json.dumps({"src": str(SRC), "wide": wide_k,
                                "profile": str(profile) if profile else None})
        cmd = [sys.executable, "-c", _PS_BOOT, spec_json] + args
    load_start = load()
    ps_log = open(run_dir / "ps.log", "w")
    ps = subprocess.Popen(cmd, stdout=ps_log, stderr=subprocess.STDOUT, env=node_env(threads),
                          cwd=ROOT)
    workers: list[subprocess.Popen] = []
    times = [run_dir / f"w{i}.json" for i in range(n)]
    try:
        deadline = time.monotonic() + timeout
        while True:                                               # wait until it listens
            if ps.poll() is not None:
                raise RuntimeError(f"PS exited with {ps.returncode} before listening; "
                                   f"log:\n{(run_dir / 'ps.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("PS did not listen in time") from None
                time.sleep(0.1)
        base = proc_status(ps.pid, "VmRSS")
        wlog = open(run_dir / "workers.log", "w")
        for i in range(n):
            workers.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--_worker", str(port), str(i),
                 str(d), str(1000 + i), str(times[i])], stdout=wlog, stderr=subprocess.STDOUT,
                env=node_env(threads), cwd=ROOT))
        peak, cpu_marks = base, {}
        while ps.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"networked run over --timeout {timeout:g} s")
            dead = [i for i, w in enumerate(workers) if w.poll() not in (None, 0)]
            if dead:
                raise RuntimeError(f"stand-in worker(s) {dead} failed; log:\n"
                                   f"{(run_dir / 'workers.log').read_text()[-2000:]}")
            peak = proc_status(ps.pid, "VmHWM") or peak
            done = metrics.read_text().count("\n") if metrics.exists() else 0
            if done >= 1 and done not in cpu_marks:
                cpu = proc_cpu(ps.pid)
                if cpu is not None:
                    cpu_marks[done] = cpu
            time.sleep(0.02)
        if ps.returncode != 0:
            raise RuntimeError(f"PS exited with {ps.returncode}; log:\n"
                               f"{(run_dir / 'ps.log').read_text()[-3000:]}")
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
    finally:
        for p in workers + [ps]:
            if p.poll() is None:
                p.kill()
                p.wait()
        ps_log.close()
    records = sorted((json.loads(line) for line in metrics.read_text().splitlines()),
                     key=lambda r: r["round"])
    if len(records) != rounds:
        raise RuntimeError(f"{len(records)} of {rounds} rounds in the metrics file")
    updates = [{int(k): v for k, v in json.loads(t.read_text())["updates"].items()}
               for t in times]
    split = split_rounds(records, updates)
    marks = sorted(k for k in cpu_marks if k <= rounds - 1)
    cpu = ((cpu_marks[marks[-1]] - cpu_marks[marks[0]]) / (marks[-1] - marks[0])
           if len(marks) >= 2 and marks[-1] > marks[0] else float("nan"))
    out = {"model": spec, "d": d, "n": n, "method": method, "f": f, "rounds": rounds,
           "seconds_round": split["period"], **{k: v for k, v in split.items()
                                                if k != "period"},
           "cpu_per_round": cpu, "peak_bytes": peak, "base_bytes": base,
           "stack_bytes": n * d * 4, "load_start": load_start, "load_end": load(),
           "run_dir": str(run_dir)}
    if profile is None:
        import torch
        t_in, t_out = socket_limit(n, d, repeats)
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
        t_rule = rule_seconds(method, f, x, repeats)
        del x
        limit = t_in + t_rule + t_out
        out.update(limit=limit, limit_in=t_in, limit_rule=t_rule, limit_out=t_out,
                   ratio=split["period"] / limit)
    return out


# ---------------------------------------------------------------------------------------------
# Output


def ms(x: float) -> str:
    return "nan" if x != x else (f"{x * 1e3:.1f}" if x < 10 else f"{x * 1e3:.0f}")


def mib(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x / 2**20:.0f}"


def print_networked(rows: list[dict]) -> None:
    print("\nNETWORKED: real PS (ps_node.py) + n stand-in worker processes on 127.0.0.1 "
          "(times in ms, medians over steady rounds; memory in MiB)")
    head = (f"{'model':<20}{'n':>4} {'rule':<23}{'s/round':>9}{'bcast':>8}{'recv':>8}"
            f"{'valid':>7}{'agg':>8}{'cpu':>8}{'peak':>7}{'base':>6}{'x-stack':>8}{'limit':>8}"
            f"{'(in+rule+out)':>22}{'ratio':>7}  load 1/5/15 at start")
    print(head)
    print("-" * len(head))
    for r in rows:
        extra = None if r["peak_bytes"] is None or r["base_bytes"] is None else \
            (r["peak_bytes"] - r["base_bytes"]) / r["stack_bytes"]
        parts = f"{ms(r['limit_in'])}+{ms(r['limit_rule'])}+{ms(r['limit_out'])}"
        print(f"{label(r['model']):<20}{r['n']:>4} {r['method']:<23}{ms(r['seconds_round']):>9}"
              f"{ms(r['bcast']):>8}{ms(r['recv']):>8}{ms(r['valid']):>7}{ms(r['agg']):>8}"
              f"{ms(r['cpu_per_round']):>8}{mib(r['peak_bytes']):>7}{mib(r['base_bytes']):>6}"
              f"{'n/a' if extra is None else f'{extra:.2f}':>8}{ms(r['limit']):>8}"
              f"{parts:>22}{r['ratio']:>7.2f}  {r['load_start']}")


def print_in_process(rows: list[dict]) -> None:
    print("\nIN-PROCESS (no sockets, one process: ServerRounds on an (n, d) workload; ms, "
          "medians)")
    head = (f"{'model':<22}{'n':>4} {'rule':<23}{'fill':>8}{'digest':>8}{'valid':>8}"
            f"{'agg':>8}{'bcast':>7}{'total':>9}{'limit':>9}{'(in+rule+out)':>24}"
            f"{'tot/lim':>8}  load")
    print(head)
    print("-" * len(head))
    for r in rows:
        parts = f"{ms(r['limit_in'])}+{ms(r['limit_rule'])}+{ms(r['limit_out'])}"
        print(f"{label(r['model']):<22}{r['n']:>4} {r['method']:<23}{ms(r['fill']):>8}"
              f"{ms(r['digest']):>8}{ms(r['valid']):>8}{ms(r['agg']):>8}{ms(r['bcast']):>7}"
              f"{ms(r['total']):>9}{ms(r['limit']):>9}{parts:>24}"
              f"{r['ratio_total_over_limit']:>8.2f}  {r['load']}")


def print_profile(path: Path, top: int = 25) -> None:
    import pstats
    print(f"\nPROFILE of the PS (cProfile, {path}); top {top} by own time:")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(top)


# ---------------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_worker":
        port, wid, d, seed = (int(a) for a in sys.argv[2:6])
        return stand_in_worker(port, wid, d, seed, sys.argv[6])
    import torch
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for what each column means.")
    ap.add_argument("--workers", default="4,16", help="comma-separated n values (default 4,16)")
    ap.add_argument("--models", default="cnn_mnist",
                    help="networked models: names or wide:D, comma-separated; 'none' to skip")
    ap.add_argument("--inproc-models", default="cnn_mnist",
                    help="in-process rows: names or wide:D; 'none' to skip")
    ap.add_argument("--aggregators", default="coordinate_wise_median,multi_krum")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--f", type=int, help="rule's f (default min(n // 4, (n - 3) // 2))")
    ap.add_argument("--threads", type=int, default=1, help="torch threads everywhere")
    ap.add_argument("--repeats", type=int, default=3, help="repetitions of limit/in-process")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per networked run")
    ap.add_argument("--data-root", default=str(ROOT / "data"))
    ap.add_argument("--profile", action="store_true",
                    help="instead of the table: one networked run (last n, first model and "
                         "rule) with the PS under cProfile; prints its top functions")
    ap.add_argument("--json", help="write all figures to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    if args.rounds < 5:
        ap.error("--rounds must be >= 5 (the first and last rounds are left out, and the "
                 "split needs two consecutive steady rounds)")
    torch.set_num_threads(args.threads)
    ns = [int(x) for x in args.workers.split(",")]
    split = lambda s: [] if s in ("", "none") else s.split(",")  # noqa: E731
    models, inproc, methods = split(args.models), split(args.inproc_models), \
        split(args.aggregators)
    for m in models + inproc:
        parse_model(m)
    tmp = Path(tempfile.mkdtemp(prefix="byzps-latency-"))
    print(f"round_latency: n={ns} models={models} in-process={inproc} rules={methods} "
          f"rounds={args.rounds} threads={args.threads} cpus={os.cpu_count()} "
          f"load(1/5/15)={load()}", flush=True)
    result: dict[str, Any] = {"args": vars(args), "load_start": load(), "networked": [],
                              "in_process": []}
    failed = 0
    try:
        if args.profile:
            prof = tmp / "ps.prof"
            spec, n, method = models[0], ns[-1], methods[0]
            f = default_f(n) if args.f is None else args.f
            print(f"  profiling networked {label(spec)} n={n} {method} f={f} ...", flush=True)
            r = networked(spec, n, method, f, args.rounds, args.threads, args.repeats, tmp,
                          args.data_root, args.timeout, profile=prof)
            print(f"  under cProfile: {ms(r['seconds_round'])} ms/round (inflated by the "
                  f"profiler), PS cpu {ms(r['cpu_per_round'])} ms/round, load {load()}")
            print_profile(prof)
            return 0
        for spec in models:
            for n in ns:
                for method in methods:
                    f = default_f(n) if args.f is None else args.f
                    print(f"  networked {label(spec)} n={n} {method} f={f} ...", flush=True)
                    try:
                        row = networked(spec, n, method, f, args.rounds, args.threads,
                                        args.repeats, tmp, args.data_root, args.timeout)
                        result["networked"].append(row)
                        print(f"    {ms(row['seconds_round'])} ms/round, limit "
                              f"{ms(row['limit'])} ms, ratio {row['ratio']:.2f}, x-stack "
                              f"{(row['peak_bytes'] - row['base_bytes']) / row['stack_bytes']:.2f}"
                              f", load {load()}", flush=True)
                    except RuntimeError as e:
                        failed += 1
                        print(f"    FAILED: {e}", flush=True)
        for spec in inproc:
            for n in ns:
                f = default_f(n) if args.f is None else args.f
                print(f"  in-process {label(spec)} n={n} f={f} ...", flush=True)
                result["in_process"] += in_process(spec, n, methods, f, args.repeats)
        if result["networked"]:
            print_networked(result["networked"])
        if result["in_process"]:
            print_in_process(result["in_process"])
        result["load_end"] = load()
        print(f"\nload average (1/5/15) at the end: {result['load_end']}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    finally:
        if args.keep or failed:
            print(f"run folders (PS logs, metrics) kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
