"""How a byzps node process is started: the command, its environment, a free port.

Shared by the local launcher (:mod:`byzps.launcher`, which also exports these names) and the
Ray actors of ``byzps run --ray`` (:mod:`byzps.raynode`). Imports nothing of byzps and not
torch, so a Ray actor that only starts a node stays light.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Optional


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def node_cmd(config: str | Path, role: str, data_root: str, rounds: Optional[int],
             worker_id: Optional[int] = None) -> list[str]:
    """The command line of one node: ``python -m byzps.cli`` (``ps_node.py``'s entry) with
    ``--config``, ``--role``, ``--data-root`` and, where given, ``--worker-id``/``--rounds``."""
    cmd = [sys.executable, "-m", "byzps.cli", "--config", str(config), "--role", role,
           "--data-root", data_root]
    if worker_id is not None:
        cmd += ["--worker-id", str(worker_id)]
    if rounds is not None:
        cmd += ["--rounds", str(rounds)]
    return cmd


def node_env() -> dict[str, str]:
    """This process's environment for a node: ``OMP_NUM_THREADS=1`` (one torch thread, as
    every node of a local run) and this byzps's ``src`` first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


