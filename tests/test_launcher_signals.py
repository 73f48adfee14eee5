"""`byzps run` under signals and early failures, with real processes: SIGTERM to the launcher
stops every node it started (none is orphaned)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import node_env, write_config

BYZPS = [sys.executable, "-c", "import sys; from byzps.cli import byzps_main; "
                               "sys.exit(byzps_main())"]


def tiny(cfg: dict, rounds: int = 100_000) -> dict:
    """PS + 2 honest logreg workers on a few hundred examples: starts fast, runs long."""
    cfg["training"].update(rounds=rounds, model="logreg", train_limit=400, test_limit=100,
                           eval_every=1000, batch_size=16)
    cfg["workers"] = [{"id": 0, "type": "honest"}, {"id": 1, "type": "honest"}]
    return cfg


def children(pid: int) -> set[int]:
    """The direct children of ``pid`` (Linux /proc)."""
    out: set[int] = set()
    task = Path(f"/proc/{pid}/task")
    for t in task.iterdir() if task.exists() else []:
        try:
            out |= {int(c) for c in (t / "children").read_text().split()}
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(cond, what: str, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def test_sigterm_to_byzps_run_stops_every_node(tmp_path, base_config):
    cfg = write_config(tmp_path / "c.yaml", tiny(base_config))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*BYZPS, "run", str(cfg), "--run-dir", str(run_dir)],
                            env=node_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    kids: set[int] = set()
    try:
        # the nodes are up once the PS has written a round record
        wait_for(lambda: proc.poll() is not None or (
            (run_dir / "metrics.jsonl").exists()
            and (run_dir / "metrics.jsonl").stat().st_size > 0), "the first round")
        assert proc.poll() is None, proc.communicate()[0]
        kids = children(proc.pid)
        assert len(kids) == 3
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 143, out
        assert "byzps run: terminated (SIGTERM)" in out
        assert "PS failed" not in out
        survivors = [k for k in kids if alive(k)]
        assert not survivors, f"nodes left running: {survivors}\n{out}"
    finally:
        for k in kids:
            if alive(k):
                os.kill(k, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
