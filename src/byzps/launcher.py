"""``byzps run``: the PS and every worker of a config as local processes over 127.0.0.1.

:func:`prepare_run_dir` writes a copy of the config into a run folder, on a free port, with
``training.metrics_file`` pointing into the folder; :func:`launch` starts one
``python -m byzps.cli --role ...`` process (the same entry as ``ps_node.py``) per node, each with
``OMP_NUM_THREADS=1`` and its log in the folder, shows one progress line read from the PS's
metrics file, forwards Ctrl-C (SIGINT) to every node, and returns a :class:`RunSummary`.
SIGTERM to the launcher (``kill``, ``timeout``, a job scheduler) is handled like Ctrl-C
(:class:`SigtermGuard`): every node gets SIGTERM, and SIGKILL after
:data:`TERM_KILL_AFTER` seconds if it is still there, so no node outlives the launcher.

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
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, TextIO

import yaml

from byzps.config import ConfigError
from byzps.job import Job, check_over_tcp, eval_split, load_config
from byzps.metrics import JsonlFollower, iter_jsonl, round_status
from byzps.nodeproc import free_port, node_cmd, node_env  # noqa: F401 - public here too
from byzps.progress import Progress
from byzps.safeio import MAX_CONFIG_BYTES, load_yaml, read_text


def default_run_dir(config: str | Path, root: str | Path = "runs") -> Path:
    """``runs/<config stem>-<YYYYmmdd-HHMMSS>-<pid>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{Path(config).stem}-{stamp}-{os.getpid()}"


def config_data(config: str | Path) -> dict:
    """The raw mapping of a config file (YAML or JSON), after validating it.

    Raises:
        byzps.config.ConfigError: the config is invalid (file type, size, YAML aliases and
            the schema are checked by :func:`byzps.config.load_config` before this second read).
    """
    load_config(config)
    p = Path(config)
    text = read_text(p, MAX_CONFIG_BYTES, "config file")
    return json.loads(text) if p.suffix.lower() == ".json" else load_yaml(text)


def prepare_run_dir(config: str | Path, run_dir: str | Path) -> Path:
    """Validate ``config`` and write its local-run copy to ``run_dir/config.yaml``.

    The copy listens and connects on 127.0.0.1 at a free port, and writes its metrics to
    ``run_dir/metrics.jsonl`` (an existing file there is replaced).

    Returns:
        the path of the copy.

    Raises:
        byzps.config.ConfigError: the config is invalid.
    """
    data = config_data(config)
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
        interrupted: Ctrl-C was pressed, or the launcher got SIGTERM.
        terminated: the launcher got SIGTERM (``interrupted`` is set too).
        stopped: nodes the launcher stopped because the others had ended (the PS once every
            worker had exited with an error).
        failed: names of the nodes that exited non-zero.
        min_accuracy: the accuracy the run had to reach (``--min-accuracy``), or None.
        split: what the accuracy was measured on: ``test``, or ``validation``
            (``training.validation``, :func:`byzps.job.eval_split`).
    """

    exit_codes: dict[str, int]
    rounds: int
    test_accuracy: Optional[float]
    seconds: float
    run_dir: Path
    interrupted: bool = False
    failed: list[str] = field(default_factory=list)
    min_accuracy: Optional[float] = None
    terminated: bool = False
    stopped: list[str] = field(default_factory=list)
    split: str = "test"

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


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the launcher (raised by :class:`SigtermGuard`'s handler); handled where
    Ctrl-C is, except that the nodes get SIGTERM instead of SIGINT."""


class SigtermGuard:
    """While active (``with SigtermGuard() as guard:``), the first SIGTERM to this process
    raises :class:`Terminated` in the main thread and sets :attr:`fired`; later ones are
    ignored (the shutdown under way escalates by itself). Outside the main thread it does
    nothing. The previous handler is restored on exit."""

    def __init__(self) -> None:
        self.fired = False
        self._old: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.fired:
            self.fired = True
            raise Terminated()

    def __enter__(self) -> SigtermGuard:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._old)
            self._installed = False


class NodeProcess(Protocol):
    """What :func:`watch` needs of a running node: a local process (:class:`LocalNode`) or a
    node run by a Ray actor (:mod:`byzps.rayrun`)."""

    def poll(self) -> Optional[int]:
        """The node's exit code, or None while it runs."""

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the node (and the processes it started)."""


class LocalNode:
    """A node started here with ``start_new_session=True``: signals go to its process group."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen

    def poll(self) -> Optional[int]:
        """The exit code, or None while it runs."""
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the node's process group (nothing if it has ended)."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _remove_unused_run_dir(run_dir: Path) -> None:
    """Remove a run folder this launch created when no node started: its ``config.yaml``,
    then the folder if nothing else is in it (never anything else)."""
    try:
        (run_dir / "config.yaml").unlink(missing_ok=True)
        run_dir.rmdir()
    except OSError:
        pass


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
        the :class:`RunSummary`; on Ctrl-C every node gets SIGINT (again after 5 s, SIGTERM
        after 10 s, SIGKILL after 15 s) and the summary has ``interrupted`` set; on SIGTERM
        every node gets SIGTERM (SIGKILL after :data:`TERM_KILL_AFTER` s) and the summary has
        ``interrupted`` and ``terminated`` set.

    Raises:
        byzps.config.ConfigError: invalid config, or a worker's data shard smaller than one
            batch (:func:`check_shards`; no node is started, and a run folder this call
            created is removed again).
        byzps.data.DatasetNotFound, byzps.data.IdxFormatError: no usable copy of the data.
    """
    out = out or sys.stderr
    run_dir = Path(run_dir)
    fresh = not run_dir.exists()
    try:
        cfg_path = prepare_run_dir(config, run_dir)
        cfg = load_config(cfg_path)
        check_over_tcp(cfg, str(config))
        check_shards(cfg, str(config), data_root)
    except BaseException:
        if fresh:   # stopped before any node: leave no run folder behind
            _remove_unused_run_dir(run_dir)
        raise
    total = rounds or cfg.training.rounds
    env = node_env()
    nodes: dict[str, LocalNode] = {}
    logs: list[Any] = []

    def start(name: str, cmd: list[str]) -> None:
        fh = open(run_dir / f"{name}.log", "w")
        logs.append(fh)
        nodes[name] = LocalNode(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                                 env=env, start_new_session=True))

    t0 = time.perf_counter()
    print(f"byzps run: PS + {cfg.n} workers on 127.0.0.1:{cfg.server.port}, {total} rounds; "
          f"run folder {run_dir}", file=out, flush=True)
    print_status_hint(cfg, out)
    interrupted = False
    stopped: set[str] = set()
    with SigtermGuard() as guard:
        try:
            try:
                start("server", node_cmd(cfg_path, "server", data_root, rounds))
                for w in cfg.workers:
                    start(f"worker-{w.id}", node_cmd(cfg_path, "worker", data_root, rounds,
                                                     w.id))
            except KeyboardInterrupt as e:   # Ctrl-C or SIGTERM while starting the nodes
                interrupted = True
                term = isinstance(e, Terminated)
                _signal_all(nodes, signal.SIGTERM if term else signal.SIGINT)
                _wait_all(nodes, interrupted=True, terminated=term)
            else:
                interrupted = watch(nodes, run_dir, total, out, poll, stopped=stopped)
        finally:
            for fh in logs:
                fh.close()
    return finish({name: node.poll() for name, node in nodes.items()}, run_dir, t0, total, out,
                  interrupted, min_accuracy, terminated=guard.fired, stopped=stopped,
                  split=eval_split(cfg))


def check_shards(cfg: Any, source: str, data_root: str) -> None:
    """Run the job's start-up checks here, before any node starts: the task (a user's task is
    tried on a few items), every node's device, and the shards (one smaller than a batch would
    make every worker exit at once while the PS waits out ``server.connect_timeout``).

    Raises:
        byzps.config.ConfigError: a shard is too small (the job's message, naming the worker
            and the sizes), a device this machine does not have, or the task's problem.
        byzps.data.DatasetNotFound, byzps.data.IdxFormatError: no usable copy of the data.
    """
    try:
        job = Job(cfg, data_root, source=source)
        job.device()                      # the PS's and every worker's device exist here
        for w in cfg.workers:
            job.device(w.id)
        job.shard_indices()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(source, [str(e)]) from None


def print_status_hint(cfg: Any, out: TextIO, where: str = "") -> None:
    """Say where the PS's status endpoint will answer, if ``server.metrics_port`` is set."""
    if cfg.server.metrics_port is not None:
        print(f"byzps run: PS status (once the PS is up) on http://"
              f"{cfg.server.metrics_host}:{cfg.server.metrics_port}/status and /metrics{where}",
              file=out, flush=True)


def watch(nodes: Mapping[str, NodeProcess], run_dir: Path, total: int, out: TextIO,
          poll: float = 0.5, refresh: Callable[[], None] = lambda: None,
          stopped: Optional[set[str]] = None) -> bool:
    """Show progress from ``run_dir/metrics.jsonl`` until every node has ended.

    A progress bar (:class:`byzps.progress.Progress`; round, test accuracy, reported loss,
    rejected gradients, s/round, see :func:`byzps.metrics.round_status`) on a terminal, else one
    line per evaluated round. If the PS (node ``server``) fails, the others get SIGTERM after a grace
    period; if every worker has ended and one of them failed while the PS runs, the PS gets
    SIGTERM (it would wait out its timeouts) and a line says why. Ctrl-C sends SIGINT to every
    node and waits for them; :class:`Terminated` (SIGTERM under a :class:`SigtermGuard`) sends
    SIGTERM, then SIGKILL to what is left.

    Args:
        nodes: node name (``server``, ``worker-<id>``) -> its process.
        run_dir: the run folder; every ``poll`` seconds the records appended to its
            ``metrics.jsonl`` since the last read are read (from the last offset, lines of at
            most :data:`byzps.metrics.MAX_RECORD_BYTES`; a partial last line waits).
        total: rounds planned (for the progress line).
        out: where the progress goes.
        poll: seconds between reads.
        refresh: called before each look at the nodes and the metrics file (a Ray run copies
            what the nodes wrote into ``run_dir`` and fetches their states there).
        stopped: if given, the names of the nodes the launcher stopped because the others
            had ended are added to it (for :func:`finish`).

    Returns:
        True if Ctrl-C or SIGTERM interrupted the run.
    """
    progress = Progress(total, out)
    stopped = set() if stopped is None else stopped
    interrupted = terminated = False
    acc = None
    seconds, timed = 0.0, 0      # sum and count of the records' seconds_round
    follower = JsonlFollower(run_dir / "metrics.jsonl")
    try:
        refresh()
        while any(p.poll() is None for p in nodes.values()):
            time.sleep(poll)
            refresh()
            # the PS failed (e.g. its port or metrics port is taken): stop the rest now
            # instead of letting the workers wait out server.connect_timeout
            if nodes["server"].poll() not in (None, 0):
                break
            if _workers_all_failed(nodes, out):
                stopped.add("server")
                nodes["server"].signal(signal.SIGTERM)
                break
            records = follower.read_new()   # only what the PS appended since the last poll
            if not records:
                continue
            for r in records:
                if r.get("seconds_round"):
                    seconds += float(r["seconds_round"])
                    timed += 1
            spr = seconds / timed if timed else None
            for r in records:
                if r.get("test_accuracy") is not None:
                    acc = r["test_accuracy"]
                    if not progress.tty:   # one line per evaluated round
                        progress.line(round_status(r, total, spr, None))
            progress.advance_to(int(records[-1]["round"]) + 1,
                                round_status(records[-1], total, spr, acc, show_round=False))
    except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM under a SigtermGuard
        interrupted = True
        terminated = isinstance(e, Terminated)
        _signal_all(nodes, signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        _wait_all(nodes, refresh=refresh, interrupted=interrupted, terminated=terminated)
        progress.close()
    return interrupted


def _workers_all_failed(nodes: Mapping[str, NodeProcess], out: TextIO) -> bool:
    """True (and a line on ``out``) when the PS runs but every worker has ended, one of them
    with a non-zero status: nothing will connect to the PS any more."""
    workers = {n: p.poll() for n, p in nodes.items() if n != "server"}
    if (not workers or nodes["server"].poll() is not None
            or any(c is None for c in workers.values())
            or all(c == 0 for c in workers.values())):
        return False
    codes = ", ".join(f"{n} {c}" for n, c in sorted(workers.items())[:8])
    more = f" and {len(workers) - 8} more" if len(workers) > 8 else ""
    print(f"byzps run: every worker has exited (exit status: {codes}{more}); stopping the PS",
          file=out, flush=True)
    return True


def finish(codes: dict[str, Optional[int]], run_dir: Path, started: float, total: int,
           out: TextIO, interrupted: bool = False,
           min_accuracy: Optional[float] = None, terminated: bool = False,
           stopped: Optional[set[str]] = None, split: str = "test") -> RunSummary:
    """The :class:`RunSummary` of an ended run, printed to ``out``.

    Args:
        codes: node name -> exit code (None: the node never ran to an end; counted as -1).
        run_dir: the run folder (``metrics.jsonl`` and ``<node>.log`` are read).
        started: ``time.perf_counter()`` at launch.
        total: rounds planned.
        interrupted, min_accuracy, terminated, stopped, split: see :class:`RunSummary`.
    """
    ended: dict[str, int] = {name: -1 if c is None else c for name, c in codes.items()}
    rounds, acc = 0, None
    try:
        for r in iter_jsonl(run_dir / "metrics.jsonl", keys=("test_accuracy",)):
            rounds += 1
            if r.get("test_accuracy") is not None:
                acc = r["test_accuracy"]
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:   # FileRefused is a ValueError
        print(f"byzps run: cannot read the metrics file: {e}", file=out, flush=True)
    summary = RunSummary(ended, rounds, acc, time.perf_counter() - started, run_dir,
                         interrupted or terminated, [n for n, c in ended.items() if c != 0],
                         min_accuracy, terminated, sorted(stopped or ()), split)
    _print_summary(summary, total, out)
    return summary


def _signal_all(nodes: Mapping[str, NodeProcess], sig: int) -> None:
    for node in nodes.values():
        if node.poll() is None:
            node.signal(sig)


#: after Ctrl-C: seconds until the nodes still running get SIGINT again, SIGTERM, and SIGKILL
INTERRUPT_AGAIN, INTERRUPT_TERM, INTERRUPT_KILL = 5.0, 10.0, 15.0
#: exit codes of a node stopped by the launcher's SIGINT, SIGTERM or SIGKILL
STOPPED_CODES = (130, 143, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL)
#: after SIGTERM to the launcher: seconds until the nodes still running get SIGKILL
TERM_KILL_AFTER = 3.0


def _wait_all(nodes: Mapping[str, NodeProcess], grace: float = 2.0,
              refresh: Callable[[], None] = lambda: None, interrupted: bool = False,
              again: float = INTERRUPT_AGAIN, term: float = INTERRUPT_TERM,
              terminated: bool = False) -> None:
    """Wait for every node; if the PS failed, the workers get SIGTERM after ``grace`` s.

    After Ctrl-C (``interrupted``: every node already got SIGINT) the nodes still running get
    SIGINT again after ``again`` s (a second SIGINT interrupts ``asyncio.run`` even where the
    first one's cancellation was lost, as Python 3.11's ``asyncio.wait_for`` can lose it when
    its inner future completes at the same moment), SIGTERM after ``term`` s and SIGKILL after
    :data:`INTERRUPT_KILL` s. A node still shutting down when the second SIGINT comes may end by
    it (exit code -2) instead of 130. After SIGTERM to the launcher (``terminated``: every node
    already got SIGTERM) the nodes still running get SIGKILL after :data:`TERM_KILL_AFTER` s.
    """
    start = time.monotonic()
    deadline = start + grace
    server = nodes.get("server")
    steps = ([(TERM_KILL_AFTER, signal.SIGKILL)] if terminated
             else [(again, signal.SIGINT), (term, signal.SIGTERM),
                   (max(term, INTERRUPT_KILL), signal.SIGKILL)] if interrupted else [])
    while True:
        try:
            refresh()
            if all(p.poll() is not None for p in nodes.values()):
                return
            server_failed = server is not None and server.poll() not in (None, 0)
            if server_failed and time.monotonic() > deadline:
                _signal_all(nodes, signal.SIGTERM)
                deadline = time.monotonic() + grace
            while steps and time.monotonic() - start > steps[0][0]:
                _signal_all(nodes, steps.pop(0)[1])
            time.sleep(0.1)
        except KeyboardInterrupt:
            _signal_all(nodes, signal.SIGTERM)


def _print_summary(s: RunSummary, total: int, out: TextIO) -> None:
    acc = f"{s.test_accuracy:.4f}" if s.test_accuracy is not None else "n/a"
    status = ("terminated (SIGTERM)" if s.terminated else "interrupted" if s.interrupted
              else "OK" if s.ok else "FAILED")
    threshold = ""
    if s.min_accuracy is not None:
        threshold = f" ({'>=' if s.accuracy_ok else 'below'} --min-accuracy {s.min_accuracy:g})"
    print(f"byzps run: {status}: {s.rounds}/{total} rounds, final {s.split} accuracy {acc}"
          f"{threshold}, {s.seconds:.1f} s; logs and metrics.jsonl in {s.run_dir}", file=out,
          flush=True)
    ps_failed = s.exit_codes.get("server") not in (None, 0) and "server" not in s.stopped
    # the PS's reason first, unless the launcher stopped it
    for name in sorted(s.failed, key=lambda n: (n in s.stopped, n != "server")):
        if s.interrupted and s.exit_codes[name] in STOPPED_CODES:   # stopped on purpose
            print(f"  {name} exited {s.exit_codes[name]}: "
                  f"{'terminated' if s.terminated else 'interrupted'}", file=out, flush=True)
            continue
        if name in s.stopped:
            print(f"  {name} exited {s.exit_codes[name]}: stopped by byzps run after every "
                  f"worker had exited", file=out, flush=True)
            continue
        if ps_failed and name != "server":
            print(f"  {name} exited {s.exit_codes[name]}: stopped because the PS failed",
                  file=out, flush=True)
            continue
        log = s.run_dir / f"{name}.log"
        tail = last_line(log)
        print(f"  {name} exited {s.exit_codes[name]}: {tail}  (see {log})", file=out,
              flush=True)


def last_line(path: Path, window: int = 64 << 10) -> str:
    """The last non-blank line among the last ``window`` bytes of ``path`` ("" when the file
    is missing, unreadable or blank), cut to 500 characters: a long run's log is not read
    whole."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - window))
            text = fh.read(window).decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""


def final_digest(run_dir: str | Path) -> Optional[str]:
    """The ``PS replica digest`` the PS logged in ``run_dir/server.log``, or None."""
    p = Path(run_dir) / "server.log"
    if not p.exists():
        return None
    m = re.findall(r"PS replica digest ([0-9a-f]{32})", p.read_text(errors="replace"))
    return m[-1] if m else None
