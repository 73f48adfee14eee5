"""Command line: the seed's ``ps_node.py`` flags (also installed as the ``byzps-node`` command).

Exit codes: 0 success; 1 the run failed (no quorum, PS unreachable, refused, aborted); 2 bad
usage or config (one line per problem, no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Optional

from byzps.auth import AuthError
from byzps.checkpoint import CheckpointError
from byzps.config import ConfigError, load_config
from byzps.data import DatasetNotFound, IdxFormatError


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
    p.add_argument("--data-root", default="./data", help="MNIST folder (default ./data)")
    p.add_argument("--resume", action="store_true",
                   help="server: continue from training.checkpoint_dir's latest checkpoint")
    return p


def _setup_logging(role: str, worker_id: Optional[int]) -> None:
    name = "ps" if role == "server" else f"worker-{worker_id}"
    logging.basicConfig(level=os.environ.get("BYZPS_LOG_LEVEL", "INFO").upper(),
                        format=f"%(asctime)s {name} %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``ps_node.py``; returns the process exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
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
    if args.resume and args.role != "server":
        parser.error("--resume is for --role server")
    if args.role == "server" and (args.worker_id is not None or args.worker_type is not None):
        parser.error("--worker-id and --worker-type are for --role worker")
    _setup_logging(args.role, args.worker_id)
    try:
        if args.role == "server":
            return _run_server(cfg, args)
        return _run_worker(cfg, args)
    except (DatasetNotFound, IdxFormatError) as e:
        print(f"data error: {e}", file=sys.stderr)
        return 1
    except AuthError as e:
        print(f"authentication error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run_server(cfg, args) -> int:
    from byzps.server import ParameterServer, TrainingFailed

    ps = ParameterServer(cfg, args.data_root, args.rounds, resume=args.resume)
    try:
        result = asyncio.run(ps.run())
    except TrainingFailed as e:
        print(f"training failed: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"server error: cannot listen on {cfg.server.listen_host}:{cfg.server.port}: "
              f"{e.strerror or e} (is the port in use? change server.port)", file=sys.stderr)
        return 1
    print(f"final test accuracy: {result.test_accuracy:.4f} (loss {result.test_loss:.4f}) after "
          f"{result.rounds} rounds in {result.seconds:.1f} s "
          f"({result.seconds / result.rounds:.3f} s/round)", flush=True)
    return 0


def _run_worker(cfg, args) -> int:
    from byzps.worker import Worker, WorkerFailed

    worker = Worker(cfg, args.worker_id, args.worker_type, args.data_root)
    try:
        asyncio.run(worker.run())
    except WorkerFailed as e:
        print(f"worker error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
