"""Shared fixtures: config builders and helpers to run real nodes as subprocesses."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import settings

# Hypothesis profiles: ``HYPOTHESIS_PROFILE=full`` runs 1,000 examples per property test that
# does not fix its own count (tests/test_breakdown.py: per rule); the default profile (100)
# keeps the suite fast.
settings.register_profile("full", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

ROOT = Path(__file__).resolve().parent.parent

BASE_CONFIG = {
    "training": {"rounds": 3, "batch_size": 32, "learning_rate": 0.05, "momentum": 0.9,
                 "seed": 0, "model": "small_cnn", "eval_every": 1, "round_timeout": 30.0,
                 "train_limit": 2000, "test_limit": 500,
                 # many tests compare exact digests or accepted sets: wait for every worker
                 # (the default, quorum, closes at the n - f fastest; tests of it drop this)
                 "close_at": "all"},
    "aggregation": {"method": "coordinate_wise_median"},
    "server": {"host": "127.0.0.1", "port": 9000, "bind_host": "127.0.0.1",
               "connect_timeout": 60.0},
    "workers": [
        {"id": 0, "type": "honest", "data_shard": 0},
        {"id": 1, "type": "honest", "data_shard": 1},
        {"id": 2, "type": "honest", "data_shard": 2},
        {"id": 3, "type": "byzantine", "data_shard": 3, "attack_scale": -1.0},
    ],
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def base_config() -> dict:
    """A deep copy of a small, valid 4-worker config (3 honest + 1 sign-flip)."""
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["server"]["port"] = free_port()
    return cfg


def model_signature(cfg: dict, rounds: int | None = None) -> str:
    """The model signature a real worker of config ``cfg`` (a dict) sends in its HELLO
    (:meth:`byzps.replica.Replica.signature`), for tests that speak the protocol by hand."""
    from byzps.job import Job, parse_config

    return Job(parse_config(copy.deepcopy(cfg)), rounds=rounds).replica().signature()


def write_config(path: Path, cfg: dict) -> Path:
    """Write ``cfg`` as YAML to ``path`` and return the path."""
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def node_env() -> dict:
    """Environment for node subprocesses: one thread each, src on the path."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT / "src")
    return env


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_leftover_nodes():
    """Kill every node process a test started and left running (e.g. after a failure)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_node(config: Path, role: str, *extra: str, worker_id: int | None = None,
               log: Path | None = None) -> subprocess.Popen:
    """Start ``ps_node.py`` as a real process; stdout+stderr go to ``log`` (or a pipe).
    The process is killed at the end of the test if it is still running."""
    cmd = [sys.executable, str(ROOT / "ps_node.py"), "--config", str(config), "--role", role]
    if worker_id is not None:
        cmd += ["--worker-id", str(worker_id)]
    cmd += list(extra)
    out = open(log, "w") if log else subprocess.PIPE
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True,
                            env=node_env(), cwd=ROOT)
    _STARTED.append(proc)
    return proc


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, limit: float = 90) -> None:
    """Block until 127.0.0.1:port accepts connections; fail with the log if proc dies."""
    deadline = time.time() + limit
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.time() < deadline, log.read_text()
            time.sleep(0.2)
