"""``byzps run``: the PS and every worker of a config as local processes over 127.0.0.1.

:func:`prepare_run_dir` writes a copy of the config into a run folder, on a free port, with
``training.metrics_file`` pointing into the folder; :func:`launch` starts one
``python -m byzps.cli --role ...`` process (the same entry as ``ps_node.py``) per node, each with
``OMP_NUM_THREADS=1`` and its log in the folder, shows one progress line read from the PS's
metrics file, forwards Ctrl-C (SIGINT) to every node, and returns a :class:`RunSummary`.

Run folder layout::

    RUN_DIR/config.yaml      the config actually run (port, metrics_file filled in)
    RUN_DIR/metrics.jsonl    one record per round (written by the PS)
    RUN_DIR/server.log       the PS's output
    RUN_DIR/worker-<id>.log  each worker's output
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

import yaml

from byzps.config import OMNISCIENT_ONLY_IN_SIMULATION, ConfigError, load_config
from byzps.metrics import progress_line, read_jsonl
from byzps.safeio import MAX_CONFIG_BYTES, load_yaml, read_text


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_run_dir(config: str | Path, root: str | Path = "runs") -> Path:
    """``runs/<config stem>-<YYYYmmdd-HHMMSS>-<pid>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{Path(config).stem}-{stamp}-{os.getpid()}"


def prepare_run_dir(config: str | Path, run_dir: str | Path) -> Path:
    """Validate ``config`` and write its local-run copy to ``run_dir/config.yaml``.

    The copy listens and connects on 127.0.0.1 at a free port, and writes its metrics to
    ``run_dir/metrics.jsonl`` (an existing file there is replaced).

    Returns:
        the path of the copy.

    Raises:
        byzps.config.ConfigError: the config is invalid.
    """
    load_config(config)   # checks file type, size and YAML aliases before this second read
    p = Path(config)
    text = read_text(p, MAX_CONFIG_BYTES, "config file")
    data = json.loads(text) if p.suffix.lower() == ".json" else load_yaml(text)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data["server"]["host"] = "127.0.0.1"
    data["server"]["bind_host"] = "127.0.0.1"
    data["server"]["port"] = free_port()
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    data.setdefault("training", {})["metrics_file"] = str(metrics.resolve())
    out = run_dir / "config.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    load_config(out)
    return out


@dataclass
class RunSummary:
    """How a local run ended.

    Attributes:
        exit_codes: node name (``server``, ``worker-<id>``) -> exit code.
        rounds: rounds recorded in the metrics file.
        test_accuracy: the last evaluated accuracy, or None.
        seconds: wall seconds from launch to the last exit.
        run_dir: the run folder.
        interrupted: Ctrl-C was pressed.
        failed: names of the nodes that exited non-zero.
        min_accuracy: the accuracy the run had to reach (``--min-accuracy``), or None.
    """

    exit_codes: dict[str, int]
    rounds: int
    test_accuracy: Optional[float]
    seconds: float
    run_dir: Path
    interrupted: bool = False
    failed: list[str] = field(default_factory=list)
    min_accuracy: Optional[float] = None

    @property
    def accuracy_ok(self) -> bool:
        """No ``min_accuracy`` was asked for, or the final accuracy is known and reaches it."""
        return self.min_accuracy is None or (self.test_accuracy is not None
                                             and self.test_accuracy >= self.min_accuracy)

    @property
    def ok(self) -> bool:
        """Every node exited 0, nothing was interrupted, and ``min_accuracy`` was reached."""
        return (not self.interrupted and all(c == 0 for c in self.exit_codes.values())
                and self.accuracy_ok)


def _node_cmd(config: Path, role: str, data_root: str, rounds: Optional[int],
              worker_id: Optional[int] = None) -> list[str]:
    cmd = [sys.executable, "-m", "byzps.cli", "--config", str(config), "--role", role,
           "--data-root", data_root]
    if worker_id is not None:
        cmd += ["--worker-id", str(worker_id)]
    if rounds is not None:
        cmd += ["--rounds", str(rounds)]
    return cmd


def _node_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def launch(config: str | Path, run_dir: str | Path, data_root: str = "./data",
           rounds: Optional[int] = None, out: Optional[TextIO] = None,
           poll: float = 0.5, min_accuracy: Optional[float] = None) -> RunSummary:
    """Run every node of ``config`` locally and wait for all of them.

    Args:
        config: the user's config file (validated, copied by :func:`prepare_run_dir`).
        run_dir: the run folder (created).
        data_root: MNIST folder passed to every node.
        rounds: ``--rounds`` override for every node.
        out: where the progress line and summary go (default ``sys.stderr``). On a terminal
            the line is redrawn in place; otherwise one line per new evaluation is printed.
        poll: seconds between metrics-file reads.
        min_accuracy: the run fails (``summary.ok`` is False) unless the final test accuracy
            is at least this (in [0, 1]); None: no threshold.

    Returns:
        the :class:`RunSummary`; on Ctrl-C every node gets SIGINT (then SIGTERM after 10 s)
        and the summary has ``interrupted`` set.

    Raises:
        byzps.config.ConfigError: invalid config.
    """
    out = out or sys.stderr
    run_dir = Path(run_dir)
    cfg_path = prepare_run_dir(config, run_dir)
    cfg = load_config(cfg_path)
    omniscient = cfg.omniscient_workers()
    if omniscient:
        raise ConfigError(str(config), [OMNISCIENT_ONLY_IN_SIMULATION.format(
            ids=', '.join(map(str, omniscient)))])
    total = rounds or cfg.training.rounds
    env = _node_env()
    procs: dict[str, subprocess.Popen] = {}
    logs: list[Any] = []

    def start(name: str, cmd: list[str]) -> None:
        fh = open(run_dir / f"{name}.log", "w")
        logs.append(fh)
        procs[name] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)

    t0 = time.perf_counter()
    tty = hasattr(out, "isatty") and out.isatty()
    print(f"byzps run: PS + {cfg.n} workers on 127.0.0.1:{cfg.server.port}, {total} rounds; "
          f"run folder {run_dir}", file=out, flush=True)
    if cfg.server.metrics_port is not None:
        print(f"byzps run: PS status (once the PS is up) on http://"
              f"{cfg.server.metrics_host}:{cfg.server.metrics_port}/status and /metrics",
              file=out, flush=True)
    interrupted = False
    last_line, last_printed_round, acc = "", -1, None
    try:
        start("server", _node_cmd(cfg_path, "server", data_root, rounds))
        for w in cfg.workers:
            start(f"worker-{w.id}", _node_cmd(cfg_path, "worker", data_root, rounds, w.id))
        metrics = run_dir / "metrics.jsonl"
        first_time: Optional[float] = None
        while any(p.poll() is None for p in procs.values()):
            time.sleep(poll)
            # the PS failed (e.g. its port or metrics port is taken): stop the rest now
            # instead of letting the workers wait out server.connect_timeout
            if procs["server"].poll() not in (None, 0):
                break
            if not metrics.exists():
                continue
            records = read_jsonl(metrics)
            if not records:
                continue
            if first_time is None:
                first_time = time.perf_counter()
            for r in records:
                if r.get("test_accuracy") is not None:
                    acc = r["test_accuracy"]
            rec = records[-1]
            times = [r.get("seconds_round") for r in records if r.get("seconds_round")]
            spr = sum(times) / len(times) if times else None
            line = progress_line(rec, total, spr, acc)
            if tty:
                if line != last_line:
                    print("\r" + line, end="", file=out, flush=True)
            else:   # one line per evaluated round, also those a poll stepped over
                for r in records:
                    if r.get("test_accuracy") is not None and r["round"] > last_printed_round:
                        print(progress_line(r, total, spr, None), file=out, flush=True)
                        last_printed_round = r["round"]
            last_line = line
    except KeyboardInterrupt:
        interrupted = True
        _signal_all(procs, signal.SIGINT)
    finally:
        _wait_all(procs)
        for fh in logs:
            fh.close()
        if tty and last_line:
            print(file=out)
    codes = {name: p.returncode for name, p in procs.items()}
    records = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() \
        else []
    for r in records:
        if r.get("test_accuracy") is not None:
            acc = r["test_accuracy"]
    summary = RunSummary(codes, len(records), acc, time.perf_counter() - t0, run_dir,
                         interrupted, [n for n, c in codes.items() if c != 0], min_accuracy)
    _print_summary(summary, total, out)
    return summary


def _signal_all(procs: dict[str, subprocess.Popen], sig: int) -> None:
    for p in procs.values():
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _wait_all(procs: dict[str, subprocess.Popen], grace: float = 2.0) -> None:
    """Wait for every node; if the PS failed, the workers get SIGTERM after ``grace`` s."""
    deadline = time.monotonic() + grace
    server = procs.get("server")
    while any(p.poll() is None for p in procs.values()):
        server_failed = server is not None and server.poll() not in (None, 0)
        if server_failed and time.monotonic() > deadline:
            _signal_all(procs, signal.SIGTERM)
            deadline = time.monotonic() + grace
        try:
            time.sleep(0.1)
        except KeyboardInterrupt:
            _signal_all(procs, signal.SIGTERM)
    for p in procs.values():
        p.wait()


def _print_summary(s: RunSummary, total: int, out: TextIO) -> None:
    acc = f"{s.test_accuracy:.4f}" if s.test_accuracy is not None else "n/a"
    status = "interrupted" if s.interrupted else ("OK" if s.ok else "FAILED")
    threshold = ""
    if s.min_accuracy is not None:
        threshold = f" ({'>=' if s.accuracy_ok else 'below'} --min-accuracy {s.min_accuracy:g})"
    print(f"byzps run: {status}: {s.rounds}/{total} rounds, final test accuracy {acc}"
          f"{threshold}, {s.seconds:.1f} s; logs and metrics.jsonl in {s.run_dir}", file=out,
          flush=True)
    ps_failed = s.exit_codes.get("server") not in (None, 0)
    for name in sorted(s.failed, key=lambda n: n != "server"):   # the PS's reason first
        if ps_failed and name != "server":
            print(f"  {name} exited {s.exit_codes[name]}: stopped because the PS failed",
                  file=out, flush=True)
            continue
        log = s.run_dir / f"{name}.log"
        tail = ""
        if log.exists():
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            tail = lines[-1] if lines else ""
        print(f"  {name} exited {s.exit_codes[name]}: {tail}  (see {log})", file=out,
              flush=True)


def final_digest(run_dir: str | Path) -> Optional[str]:
    """The ``PS replica digest`` the PS logged in ``run_dir/server.log``, or None."""
    p = Path(run_dir) / "server.log"
    if not p.exists():
        return None
    m = re.findall(r"PS replica digest ([0-9a-f]{32})", p.read_text(errors="replace"))
    return m[-1] if m else None
