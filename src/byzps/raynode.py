"""The Ray actor of ``byzps run --ray`` (:class:`NodeActor`): one byzps node on a Ray node.

Kept apart from :mod:`byzps.rayrun` (the driver) so that an actor's process imports neither
torch nor the config schema: it only starts the node command (:mod:`byzps.nodeproc`), which
imports them itself. See :mod:`byzps.rayrun` for the whole picture.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from byzps.net.auth import ENV_SECRETS
from byzps.nodeproc import free_port, node_cmd, node_env

#: most bytes of one file (a log, the metrics) handed to the driver per call of
#: :meth:`NodeActor.sync`
SYNC_CHUNK = 1 << 20

# Runs in the node's process before it becomes the node command: ask the kernel for SIGKILL
# when the parent (the actor's process) ends (Linux only); let SIGINT in again (Ray 2.60's
# worker process blocks it, and a blocked mask survives fork and exec: the node would never
# see Ctrl-C); then exec.
_DIE_WITH_ACTOR = """
import os, signal, sys
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))   # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
signal.signal(signal.SIGINT, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])
if os.getppid() != int(sys.argv[1]):
    sys.exit("byzps: the Ray actor that started this node is gone")
os.execv(sys.argv[2], sys.argv[2:])
"""



#: scratch folders are ``<temp folder>/byzps-node-<node name>-<random>``
SCRATCH_PREFIX = "byzps-node-"
#: the file in a scratch folder that its actor holds an exclusive ``flock`` on while it lives
LIVE_LOCK = ".alive"


def remove_orphans(temp: Optional[str] = None) -> list[str]:
    """Remove the scratch folders of actors that died without :meth:`NodeActor.stop`
    (``ray.kill``, a crash) from ``temp`` (default: the temp folder).

    An actor holds an exclusive ``flock`` on its folder's :data:`LIVE_LOCK` while it lives;
    the kernel drops it when the actor's process ends, whatever PID namespace it ran in. A
    folder whose lock can be taken is an orphan; one without a lock file is left alone for a
    minute (its actor may be creating it). Orphans hold a node's config copy and log (never its
    keys). A folder that cannot be removed (another user's) is left alone.

    Returns:
        the folders removed.
    """
    temp = temp or tempfile.gettempdir()
    removed: list[str] = []
    try:
        entries = [e for e in os.listdir(temp) if e.startswith(SCRATCH_PREFIX)]
    except OSError:
        return removed
    for entry in entries:
        path = os.path.join(temp, entry)
        try:
            fd = os.open(os.path.join(path, LIVE_LOCK), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            try:
                if time.time() - os.stat(path).st_mtime < 60:
                    continue
            except OSError:
                continue
        except OSError:
            continue
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:     # held: its actor lives
                continue
            finally:
                os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    return removed


class NodeActor:
    """One byzps node inside a Ray actor (decorated with ``ray.remote`` by
    :func:`launch_ray`): a scratch folder on its Ray node, its secret files in memory, and the
    node command as a child process that dies with the actor.

    Args:
        name: the node's name (``server``, ``worker-<id>``), for the scratch folder's name.
        files: file kind -> content (see :func:`node_files`); each becomes a memfd (mode 0600)
            shown to the node as ``/dev/fd/N``, or, without memfd, a 0600 file in the 0700
            scratch folder.
    """

    def __init__(self, name: str, files: dict[str, bytes]) -> None:
        remove_orphans()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{name}-"))
        # held until this process ends; the node process does not inherit it (close_fds)
        self._alive = os.open(self.dir / LIVE_LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._alive, fcntl.LOCK_EX)
        self.fds: list[int] = []
        self.paths = {kind: self._private_file(kind, content) for kind, content in files.items()}
        self.proc: Optional[subprocess.Popen] = None
        self.files = {"log": self.dir / "node.log", "metrics": self.dir / "metrics.jsonl"}

    def _private_file(self, kind: str, content: bytes) -> str:
        try:
            fd = os.memfd_create(f"byzps-{kind}")
        except (AttributeError, OSError):
            path = self.dir / kind
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") \
                    as fh:
                fh.write(content)
            return str(path)
        os.fchmod(fd, 0o600)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        self.fds.append(fd)
        return f"/dev/fd/{fd}"

    def where(self) -> dict[str, Any]:
        """This actor's place: ``host`` (its Ray node's address), ``node_id``, ``pid``,
        ``dir`` (the scratch folder) and ``paths`` (file kind -> path for the node)."""
        import ray

        return {"host": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "dir": str(self.dir), "paths": self.paths}

    def free_port(self, host: str) -> int:
        """A TCP port on ``host`` (this node's address) that was free a moment ago."""
        return free_port(host)

    def start(self, config_text: str, role: str, data_root: str, rounds: Optional[int],
              worker_id: Optional[int], cwd: str) -> int:
        """Write ``config_text`` to the scratch folder and start the node command there.

        The node's output goes to the scratch folder's ``node.log``; its working folder is
        ``cwd`` (the driver's) where that exists on this node, else the scratch folder.
        ``$BYZPS_SECRETS`` is removed from its environment: the config names its key file.

        Returns:
            the node process's pid.
        """
        cfg = self.dir / "config.yaml"
        cfg.write_text(config_text, encoding="utf-8")
        cmd = node_cmd(cfg, role, data_root, rounds, worker_id)
        env = node_env()
        env.pop(ENV_SECRETS, None)
        with open(self.files["log"], "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _DIE_WITH_ACTOR, str(os.getpid()), *cmd],
                stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=cwd if os.path.isdir(cwd) else self.dir, start_new_session=True,
                pass_fds=self.fds)
        return self.proc.pid

    def sync(self, offsets: dict[str, int], limit: int = SYNC_CHUNK
             ) -> tuple[Optional[int], dict[str, bytes]]:
        """The node's exit code (None while it runs) and what its files hold past ``offsets``.

        The code is read first, so once it is not None the bytes returned (at most ``limit``
        per file) are the files' final contents from those offsets.
        """
        code = self.proc.poll() if self.proc is not None else None
        out: dict[str, bytes] = {}
        for kind, path in self.files.items():
            try:
                with open(path, "rb") as fh:
                    fh.seek(int(offsets.get(kind, 0)))
                    out[kind] = fh.read(limit)
            except FileNotFoundError:
                out[kind] = b""
        return code, out

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the node's process group (nothing once it has ended)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, grace: float = 5.0) -> None:
        """End the node (SIGTERM, then SIGKILL after ``grace`` s), close the secret files and
        remove the scratch folder."""
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._alive)
