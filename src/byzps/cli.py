"""Command line: the seed's ``ps_node.py`` flags (:func:`main`, also installed as the
``byzps-node`` command) and the ``byzps`` command (:func:`byzps_main`) with subcommands::

    byzps run CONFIG [--rounds R] [--data-root DIR] [--run-dir DIR] [--min-accuracy ACC]
              [--ray [ADDRESS]] [--placement SPREAD|PACK|STRICT_SPREAD]
                                                  PS + workers over TCP, local or Ray actors
    byzps simulate CONFIG [--rounds R] [--data-root DIR] [--metrics F] one process, no sockets
    byzps grid GRID.yaml [--jobs J] [--out DIR] [--rounds R] [--ray [ADDRESS]] [--report]
                                                                       sweep in simulation
    byzps keygen CONFIG --out DIR                                      worker key files
    byzps list                                          rules, attacks, models, tasks, optimizers
    byzps plot METRICS.jsonl [...] -o out.png                          accuracy/loss curves

Exit codes: 0 success; 1 the run failed (no quorum, PS unreachable, refused, aborted, a node
failed, a port in use, or ``byzps run --min-accuracy`` not reached); 2 bad usage or config (one
line per problem, no traceback; also a task whose code fails, :class:`byzps.task.TaskError`);
130 interrupted; 143 ``byzps run`` got SIGTERM (its nodes were stopped too), or a PS got
SIGTERM (it told its workers to stop first, as on Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Optional

from byzps.checkpoint import CheckpointError
from byzps.config import ConfigError
from byzps.data import DatasetNotFound, IdxFormatError
from byzps.job import Job, check_over_tcp, eval_split, load_config
from byzps.task import TaskError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ps_node.py``."""
    p = argparse.ArgumentParser(
        prog="ps_node.py",
        description="Run one node (the parameter server or a worker) of a byzps training job.")
    p.add_argument("--config", required=True, help="YAML (.yaml/.yml) or JSON config file")
    p.add_argument("--role", required=True, choices=["server", "worker"])
    p.add_argument("--worker-id", type=int, help="required for workers: a workers[].id")
    p.add_argument("--worker-type", choices=["honest", "byzantine"],
                   help="override the config's type for this worker")
    p.add_argument("--rounds", type=int, help="override training.rounds")
    p.add_argument("--data-root", help="MNIST folder (default ./data; the packaged copy "
                   "where it has no MNIST)")
    p.add_argument("--resume", action="store_true",
                   help="server: continue from training.checkpoint_dir's latest checkpoint")
    return p


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: where the data is looked for first when --data-root is not given (it need not exist)
DEFAULT_DATA_ROOT = "./data"
DATA_ROOT_HELP = ("MNIST folder (default ./data, which need not exist; a folder given here "
                  "must exist)")


def resolve_data_root(given: Optional[str]) -> str:
    """The data folder: :data:`DEFAULT_DATA_ROOT` when ``--data-root`` was not given, else the
    folder given, which must exist (a mistyped one would silently fall back to the packaged
    MNIST copy).

    Raises:
        ConfigError: the given folder does not exist or is not a folder.
    """
    if given is None:
        return DEFAULT_DATA_ROOT
    if not os.path.isdir(given):
        raise ConfigError("--data-root", [f"{given}: no such folder (expected the folder "
                                          f"holding the dataset's files)"])
    return given


def _add_job_args(p: argparse.ArgumentParser) -> None:
    """The arguments every job-running subcommand shares: CONFIG, --rounds, --data-root."""
    p.add_argument("config")
    p.add_argument("--rounds", type=int, help="override training.rounds")
    p.add_argument("--data-root", help=DATA_ROOT_HELP)


def log_level(text: str) -> str:
    """Validate a log level name (any case); argparse type. Raises ArgumentTypeError."""
    if str(text).upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"unknown log level {text!r}; expected one of "
                                         f"{', '.join(LOG_LEVELS)}")
    return str(text).upper()


def unit_float(text: str) -> float:
    """A finite number in [0, 1]; argparse type. Raises ArgumentTypeError."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:   # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1; argparse type. Raises ArgumentTypeError."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _setup_logging(role: str, worker_id: Optional[int]) -> None:
    name = "ps" if role == "server" else f"worker-{worker_id}"
    level = os.environ.get("BYZPS_LOG_LEVEL", "INFO").upper()
    if level not in LOG_LEVELS:
        print(f"BYZPS_LOG_LEVEL={level!r} is not a log level ({', '.join(LOG_LEVELS)}); "
              f"using INFO", file=sys.stderr)
        level = "INFO"
    logging.basicConfig(level=level,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``ps_node.py``; returns the process exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds is not None and not 1 <= args.rounds <= 10**9:
        parser.error(f"--rounds must be in 1..10**9, got {args.rounds}")
    # not checked here: the launchers pass their folder on, and a Ray node without it reads
    # the packaged copy (``byzps`` checks a folder the user gives)
    args.data_root = args.data_root or DEFAULT_DATA_ROOT
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.role == "worker":
        if args.worker_id is None:
            parser.error("--worker-id is required with --role worker")
        ids = [w.id for w in cfg.workers]
        if args.worker_id not in ids:
            print(f"config error: --worker-id {args.worker_id} is not in {args.config}'s "
                  f"workers (ids {ids})", file=sys.stderr)
            return 2
    try:
        check_over_tcp(cfg, args.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.resume and args.role != "server":
        parser.error("--resume is for --role server")
    if args.role == "server" and (args.worker_id is not None or args.worker_type is not None):
        parser.error("--worker-id and --worker-type are for --role worker")
    _setup_logging(args.role, args.worker_id)
    return _guarded(lambda: _run_server(cfg, args) if args.role == "server"
                    else _run_worker(cfg, args))


def _guarded(command: Callable[[], int]) -> int:
    """Run ``command``; an expected error (bad config, task, data, keys, TLS files or
    checkpoint, Ctrl-C) becomes one line on stderr and its exit status (see the module
    docstring) instead of a traceback."""
    from byzps.net.auth import AuthError
    from byzps.net.transport import TlsError

    try:
        return command()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except TaskError as e:
        print(f"task error: {e}", file=sys.stderr)
        return 2
    except (DatasetNotFound, IdxFormatError) as e:
        print(f"data error: {e}", file=sys.stderr)
        return 1
    except (AuthError, TlsError) as e:
        print(f"security setup error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class SigTerm(BaseException):
    """SIGTERM arrived: the PS shut down as on Ctrl-C (STOP to every worker), or ``byzps
    grid`` stopped its running cells. A BaseException, so no ``except Exception`` of the
    code it interrupts takes it."""


RECANCEL_SECONDS = 0.1   # how often a signalled PS is cancelled again until it is stopping


def cancel_until(task: asyncio.Task, stopping: Callable[[], bool],
                 every: float = RECANCEL_SECONDS) -> None:
    """Cancel ``task`` now and again every ``every`` seconds until it is done or
    ``stopping()`` is true (it has begun its own shutdown).

    One ``task.cancel()`` is not enough on Python 3.10/3.11: ``asyncio.wait_for`` drops a
    cancellation that arrives in the loop iteration where its inner awaitable completes
    (CPython gh-86296, fixed in 3.12), and the PS's round loop waits that way on a steady
    stream of gradients, so a SIGTERM could be lost and the PS train on. Must be called on the
    task's event loop thread.
    """
    loop = task.get_loop()

    def again() -> None:
        if not task.done() and not stopping():
            task.cancel()
            loop.call_later(every, again)

    task.cancel()
    loop.call_later(every, again)


async def _until_signal(run, stopping: Callable[[], bool] = lambda: False):
    """Await the coroutine ``run`` (the PS); on SIGTERM or SIGINT cancel it (again until
    ``stopping()`` says its shutdown has begun, :func:`cancel_until`), so that its shutdown
    path tells every worker to stop instead of the process dying with workers left waiting
    for ``server.connect_timeout``. A second signal cancels the shutdown itself.

    Raises:
        SigTerm: SIGTERM stopped it.
        KeyboardInterrupt: SIGINT (Ctrl-C) stopped it.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(run)
    fired: list[int] = []

    def on_signal(signum: int) -> None:
        fired.append(signum)
        if len(fired) == 1:
            cancel_until(task, stopping)
        else:
            task.cancel()

    handled = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, on_signal, signum)
            handled.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):   # not the main thread / Windows
            break
    try:
        return await task
    except asyncio.CancelledError:
        if fired:
            if fired[0] == signal.SIGTERM:
                raise SigTerm from None
            raise KeyboardInterrupt from None
        raise
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


def _run_server(cfg, args) -> int:
    from byzps.net.server import ListenError, ParameterServer, TrainingFailed
    from byzps.status import StatusEndpointError

    try:
        core = Job(cfg, args.data_root, rounds=args.rounds,
                   source=args.config).ps_core(resume=args.resume)
        ps = ParameterServer(cfg, core)
        result = asyncio.run(_until_signal(ps.run(), lambda: ps.stopping))
    except SigTerm:
        print("terminated (SIGTERM): the workers were told to stop", file=sys.stderr)
        return 143
    except StatusEndpointError as e:
        print(f"server error: {e}", file=sys.stderr)
        return 1
    except TrainingFailed as e:
        print(f"training failed: {e}", file=sys.stderr)
        return 1
    except ListenError as e:   # names the port, and blames it only for EADDRINUSE
        print(f"server error: {e.strerror or e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"server error: {e}", file=sys.stderr)
        return 1
    print(f"final {eval_split(cfg)} accuracy: {result.test_accuracy:.4f} "
          f"(loss {result.test_loss:.4f}) after "
          f"{result.rounds} rounds in {result.seconds:.1f} s "
          f"({result.seconds / result.rounds:.3f} s/round)", flush=True)
    problem = core.checkpoint_problem()
    if problem:
        print(f"checkpoint error: {problem}", file=sys.stderr)
        return 1
    return 0


def _run_worker(cfg, args) -> int:
    from byzps.net.worker import Worker, WorkerFailed

    worker = Worker(cfg, Job(cfg, args.data_root, rounds=args.rounds,
                             source=args.config).worker_core(
        args.worker_id, args.worker_type))
    try:
        asyncio.run(worker.run())
    except WorkerFailed as e:
        print(f"worker error: {e}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# The `byzps` command


def build_byzps_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``byzps`` command (see the module docstring)."""
    p = argparse.ArgumentParser(prog="byzps", description="Byzantine-robust training with a "
                                "parameter server: run, simulate, sweep, plot.")
    p.add_argument("--log-level", type=log_level,
                   default=os.environ.get("BYZPS_LOG_LEVEL", "WARNING").upper()
                   if os.environ.get("BYZPS_LOG_LEVEL", "WARNING").upper() in LOG_LEVELS
                   else "WARNING",
                   help="logging level of this process (default WARNING, or $BYZPS_LOG_LEVEL)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run the PS and every worker as local processes over TCP")
    _add_job_args(r)
    r.add_argument("--run-dir", help="run folder (default runs/<config>-<time>-<pid>)")
    r.add_argument("--min-accuracy", type=unit_float, metavar="ACC",
                   help="exit 1 unless the final test accuracy is at least ACC (in [0, 1])")
    r.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run the PS and every worker as Ray actors (needs byzps[ray]), each "
                        "running the same TCP node: without ADDRESS on a local Ray instance "
                        "bound to 127.0.0.1; with HOST:PORT (the head's GCS port) on that "
                        "cluster, from one of its nodes")
    r.add_argument("--placement", choices=["SPREAD", "PACK", "STRICT_SPREAD"], default="SPREAD",
                   help="with --ray: the placement group's strategy (default SPREAD: the "
                        "nodes spread over the cluster's machines)")

    s = sub.add_parser("simulate", help="run the job in one process through the same round "
                       "logic, without sockets")
    _add_job_args(s)
    s.add_argument("--metrics", help="JSON Lines metrics file (default training.metrics_file)")
    s.add_argument("--threads", type=positive_int, default=None,
                   help="threads computing the workers' gradients at once, one torch thread "
                        "each (default: the CPUs available, at most n); the result is the "
                        "same for every count and bit-identical to `byzps run`")

    g = sub.add_parser("grid", help="sweep rules x attacks x f x ... in simulation")
    g.add_argument("grid")
    g.add_argument("--jobs", "-j", type=int, help="cells at a time: local processes (default "
                   "1); with --ray and no address, the local Ray instance's CPUs (default: all)")
    g.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run every cell as a Ray task (needs byzps[ray]): without ADDRESS on a "
                        "local Ray instance bound to 127.0.0.1; with HOST:PORT (the head's "
                        "GCS port) on that cluster, from one of its nodes")
    g.add_argument("--out", help="output folder (default runs/grid-<grid file stem>)")
    g.add_argument("--data-root", help=DATA_ROOT_HELP)
    g.add_argument("--rounds", type=int, help="override the grid's rounds")
    g.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    g.add_argument("--report", action="store_true",
                   help="run nothing: write results.csv and table.md from the cells finished "
                        "in --out so far (safe while another byzps grid runs into it)")

    k = sub.add_parser("keygen", help="write worker keys: DIR/ps.secrets.yaml (all) and "
                       "DIR/worker-<id>.secrets.yaml (one each)")
    k.add_argument("config")
    k.add_argument("--out", required=True, help="folder for the key files")
    k.add_argument("--force", action="store_true", help="overwrite existing key files")

    sub.add_parser("list", help="aggregators, pre-aggregators, attacks, models, distributions, "
                   "tasks, optimizers, lr schedules")

    pl = sub.add_parser("plot", help="plot accuracy and loss of metrics files")
    pl.add_argument("metrics", nargs="+", help="metrics.jsonl file(s)")
    pl.add_argument("-o", "--out", required=True, help="PNG path")
    return p


def byzps_main(argv: Optional[list[str]] = None) -> int:
    """Run the ``byzps`` command; returns the exit code (see the module docstring)."""
    parser = build_byzps_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=str(args.log_level).upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    if getattr(args, "rounds", None) is not None and not 1 <= args.rounds <= 10**9:
        parser.error(f"--rounds must be in 1..10**9, got {args.rounds}")
    if hasattr(args, "data_root"):
        try:
            args.data_root = resolve_data_root(args.data_root)
        except ConfigError as e:
            print(f"usage error: {e}", file=sys.stderr)
            return 2
    handler = {"run": _cmd_run, "simulate": _cmd_simulate, "grid": _cmd_grid,
               "keygen": _cmd_keygen, "list": _cmd_list, "plot": _cmd_plot}[args.command]
    return _guarded(lambda: handler(args))


def _cmd_run(args) -> int:
    from byzps.launcher import default_run_dir, launch

    run_dir = args.run_dir or default_run_dir(args.config)
    if args.ray is None:
        summary = launch(args.config, run_dir, data_root=args.data_root, rounds=args.rounds,
                         min_accuracy=args.min_accuracy)
    else:
        from byzps.raycluster import RayLoopbackError, RayUnavailable
        from byzps.rayrun import RayPlacementError, launch_ray

        try:
            summary = launch_ray(args.config, run_dir, args.ray, data_root=args.data_root,
                                 rounds=args.rounds, min_accuracy=args.min_accuracy,
                                 strategy=args.placement)
        except RayUnavailable as e:
            print(f"run error: {e}", file=sys.stderr)
            return 2
        except (RayPlacementError, RayLoopbackError, ConnectionError, RuntimeError) as e:
            print(f"run error: {e}", file=sys.stderr)
            return 1
    if summary.terminated:
        return 143
    if summary.interrupted:
        return 130
    return 0 if summary.ok else 1


def _cmd_simulate(args) -> int:
    from byzps.metrics import MetricsWriteError, round_status
    from byzps.progress import Progress
    from byzps.simulate import SimulationFailed, simulate

    cfg = load_config(args.config)
    total = args.rounds or cfg.training.rounds
    progress = Progress(total, sys.stderr)
    acc: Optional[float] = None
    seconds = 0.0

    def show(rec: dict) -> None:
        nonlocal acc, seconds
        if rec.get("test_accuracy") is not None:
            acc = rec["test_accuracy"]
        # the mean over the rounds so far (evaluations included; the summary leaves them out)
        seconds += rec.get("seconds_round") or 0.0
        spr = seconds / (rec["round"] + 1)
        progress.advance_to(rec["round"] + 1, round_status(rec, total, spr, acc,
                                                           show_round=False))
        if not progress.tty and rec.get("test_accuracy") is not None:
            progress.line(round_status(rec, total, spr, acc))

    try:
        result = simulate(cfg, args.data_root, args.rounds, args.metrics,
                          threads=args.threads, on_record=show)
    except SimulationFailed as e:
        progress.close()
        print(f"simulation failed: {e}", file=sys.stderr)
        return 1
    except ValueError as e:   # a data shard smaller than one batch; a task whose code fails
        progress.close()
        print(f"config error: {args.config}: {e}", file=sys.stderr)
        return 2
    except MetricsWriteError as e:   # --metrics (or training.metrics_file) a folder, /dev/full
        progress.close()
        print(f"simulate: {e}", file=sys.stderr)
        return 2
    progress.close()
    print(f"final {eval_split(cfg)} accuracy: {result.test_accuracy:.4f} "
          f"(loss {result.test_loss:.4f}) after {result.rounds} rounds in {result.seconds:.1f} s "
          f"({result.seconds_per_round:.3f} s/round); PS replica digest {result.digest}",
          flush=True)
    return 0


def _cmd_grid(args) -> int:
    from pathlib import Path

    from byzps.grid import GridError, load_grid, run_grid
    from byzps.raycluster import RayLoopbackError, RayUnavailable

    if args.jobs is not None and args.jobs < 1:
        print(f"usage error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    try:
        grid = load_grid(args.grid)
    except GridError as e:
        print(f"grid error: {e}", file=sys.stderr)
        return 2
    if args.rounds is not None:
        grid.rounds = args.rounds
    out = args.out or str(Path("runs") / f"grid-{Path(args.grid).stem}")

    def on_term(*_: object) -> None:
        raise SigTerm

    try:
        previous = signal.signal(signal.SIGTERM, on_term)   # the cells stop with the grid
    except ValueError:   # not the main thread: SIGTERM keeps its default
        previous = None
    try:
        run_grid(grid, out, data_root=args.data_root, jobs=args.jobs,
                 plots=not args.no_plots, ray=args.ray, report_only=args.report)
    except SigTerm:
        print("byzps grid: terminated (SIGTERM); the running cells were stopped, finished "
              "cells are kept (a rerun resumes)", file=sys.stderr)
        return 143
    except (RayUnavailable, GridError) as e:
        print(f"grid error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, ConnectionError, RayLoopbackError) as e:
        print(f"grid error: {e}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print((Path(out) / "table.md").read_text(), end="")
    return 0


def _cmd_keygen(args) -> int:
    from pathlib import Path

    from byzps.net.auth import generate_keys, write_keys

    cfg = load_config(args.config)
    out = Path(args.out)
    ids = [w.id for w in cfg.workers]
    targets = [out / "ps.secrets.yaml"] + [out / f"worker-{i}.secrets.yaml" for i in ids]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.force:
        print(f"keygen: refusing to overwrite {', '.join(existing)} (use --force)",
              file=sys.stderr)
        return 2
    keys = generate_keys(ids)
    try:
        write_keys(out / "ps.secrets.yaml", keys)
        for i in ids:
            write_keys(out / f"worker-{i}.secrets.yaml", {i: keys[i]})
    except OSError as e:
        print(f"keygen: cannot write the key files in {out}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    print(f"wrote {out / 'ps.secrets.yaml'} (all {len(ids)} keys: for the PS) and "
          f"worker-<id>.secrets.yaml for ids {ids} (one key each: copy each to its worker's "
          f"machine); set server.secrets_file or $BYZPS_SECRETS to the file on each machine")
    return 0


#: what a parameter whose default is None means, where the parameter's help does not say it
_DERIVED_DEFAULTS = {
    ("alie", "z"): "derived from n and f",
    ("mimic", "target_class"): "collude_seed, else own seed, mod num_classes",
    (None, "collude_seed"): "own seed",
    (None, "estimate_batches"): "n - f",
}


def _param_text(kind: str, name: str, params: dict, helps: Optional[dict] = None) -> str:
    """``k=v, ...`` for ``byzps list``: f is left out (it comes from aggregation.f) and a None
    default is replaced by what it stands for (``q=<n - f>``)."""
    import re

    parts = []
    for k, v in params.items():
        if k == "f" and kind in ("aggregator", "pre"):
            continue
        if v is None:
            m = re.search(r"\(default ([^)]*)\)", (helps or {}).get(k, ""))
            derived = m.group(1) if m else _DERIVED_DEFAULTS.get(
                (name, k), _DERIVED_DEFAULTS.get((None, k)))
            parts.append(f"{k}=<{derived}>" if derived else f"{k}=None")
        else:
            parts.append(f"{k}={v!r}")
    return ", ".join(parts) or "-"


def list_text() -> str:
    """The text of ``byzps list``: every aggregator, pre-aggregator, attack, model and data
    distribution with its parameters and their real defaults.

    The Byzantine count f of rules and pre-aggregators is not a per-rule default: it comes from
    ``aggregation.f`` (default: the number of ``byzantine`` workers), so it is stated once in
    the headings instead of being listed as ``f=0``. A parameter whose default is None is shown
    with what it stands for, e.g. ``q=<n - f>``.
    """
    from byzps import aggregators, attacks
    from byzps.models import model_names
    from byzps.partition import DISTRIBUTIONS

    def row(kind: str, name: str, params: dict, table: dict) -> str:
        # the rule classes' Param.help holds "(default n - f)"-style notes for None defaults
        helps = {k: p.help for k, p in table[name].PARAMS.items()} if name in table else None
        return f"  {name:24s} {_param_text(kind, name, params, helps)}"

    rules = getattr(aggregators, "_AGGREGATORS", {})
    pres = getattr(aggregators, "_PRE_AGGREGATORS", {})
    lines = ["aggregators (aggregation.method; parameters in aggregation.params; every rule's "
             "f comes from aggregation.f, default: the number of byzantine workers):"]
    lines += [row("aggregator", n, aggregators.params(n), rules) for n in aggregators.names()]
    lines.append("pre-aggregators (aggregation.pre_aggregators: [{name: ..., params...}]; "
                 "f defaults to aggregation.f):")
    lines += [row("pre", n, aggregators.pre_params(n), pres) for n in aggregators.pre_names()]
    lines.append("attacks (workers[].attack; parameters in workers[].attack_params; n and f "
                 "come from the config):")
    lines += [f"  {n:24s} {_param_text('attack', n, attacks.params(n))}"
              for n in attacks.names()]
    lines.append("models (training.model):")
    lines += [f"  {n}" for n in model_names()]
    lines.append("data distributions (training.distribution: {name: ...}):")
    extra = {"dirichlet": "alpha=1.0", "gamma": "gamma=0.5"}
    lines += [f"  {n:24s} {extra.get(n, '-')}" for n in DISTRIBUTIONS]
    lines += _task_list_lines()
    return "\n".join(lines)


def _task_list_lines() -> list[str]:
    """``byzps list``'s built-in tasks (parameters and models), optimizers and schedules."""
    from byzps import optimizers, tasks

    lines = ["built-in tasks (task: {ref: NAME, params: {...}}; or your own: ref: "
             "'file.py:factory'):"]
    for name in tasks.names():
        params = tasks.params(name)
        lines.append(f"  {name:24s} {_param_text('task', name, params)}")
        lines.append(f"  {'':24s} models: {', '.join(tasks.models(name))}")
    lines.append("optimizers (training.optimizer: {name: ...}; sgd's momentum is "
                 "training.momentum):")
    for name in optimizers.optimizer_names():
        params = {k: v for k, v in optimizers.optimizer_params(name).items() if k != "momentum"}
        lines.append(f"  {name:24s} {_param_text('optimizer', name, params)}")
    lines.append("lr schedules (training.lr_schedule: {name: ...}; a pure function of the "
                 "round):")
    derived = {"milestones": "required", "step_size": "required", "t_max": "training.rounds"}
    for name in optimizers.schedule_names():
        params = optimizers.schedule_params(name)
        helps = {k: f"(default {derived[k]})" for k in params if k in derived}
        shown = {k: (None if k in derived else v) for k, v in params.items()}
        lines.append(f"  {name:24s} {_param_text('schedule', name, shown, helps)}")
    return lines


def _cmd_list(args) -> int:
    print(list_text())
    return 0


def _cmd_plot(args) -> int:
    from byzps.plotting import PlottingUnavailable, plot_metrics
    from byzps.safeio import FileRefused

    try:
        out = plot_metrics(args.metrics, args.out)
    except PlottingUnavailable as e:
        print(f"plot: {e}", file=sys.stderr)
        return 1
    except FileRefused as e:   # not a regular file, too large, a line too long
        print(f"plot: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"plot: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
