"""Connecting byzps to Ray (the optional extra ``byzps[ray]``): a local instance on loopback, or
an existing cluster.

Ray (Moritz et al., "Ray: A Distributed Framework for Emerging AI Applications", OSDI 2018)
schedules the work; byzps writes no scheduler of its own. :func:`ray_session` is the one place
that starts or joins Ray, so ``byzps grid --ray`` (and ``byzps run --ray`` once it exists) share
its security choices:

* **Local instance** (no address): Ray 2.60 rewrites a node IP of ``127.0.0.1`` to the machine's
  primary address and then binds its GCS, raylet and workers to every interface (checked with
  ``ss -ltn``). The instance byzps starts therefore runs with Ray's single-machine mode
  (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which keeps the node IP ``127.0.0.1`` and makes
  every Ray server bind ``127.0.0.1`` only; no other node can join), without the dashboard
  (``include_dashboard=False``) and without usage statistics. Ray 2.59+ also protects a local
  instance with a generated token. After start-up the node's address is checked; anything but
  loopback stops the session with :class:`RayLoopbackError`.
* **Existing cluster** (``HOST:PORT`` of its head): byzps joins it as a
  driver and changes nothing; keeping that cluster private (network, ``RAY_AUTH_MODE=token``)
  is the operator's job, see README "Many machines with Ray".
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any, Optional

#: ``--ray`` without an address: start a local instance (Ray's own keyword for the same thing).
LOCAL = "local"

_LOCAL_ENV = {
    # single-machine mode: the node IP stays 127.0.0.1 and Ray's servers bind it only
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # no usage report to the Ray project from a run that byzps started
    "RAY_USAGE_STATS_ENABLED": "0",
}


class RayUnavailable(RuntimeError):
    """Ray is not installed (``pip install -e ".[ray]"``; ``scripts/setup_env.sh`` does it)."""


class RayLoopbackError(RuntimeError):
    """A local Ray instance that byzps started came up on a non-loopback node address."""


def import_ray() -> Any:
    """Import and return the ``ray`` module.

    Raises:
        RayUnavailable: Ray is not installed; the message says how to install it.
    """
    try:
        import ray
    except ImportError as e:
        raise RayUnavailable(f"--ray needs Ray ({e}); install the extra: "
                             f"pip install -e \".[ray]\" (scripts/setup_env.sh does)") from None
    return ray


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@contextlib.contextmanager
def ray_session(address: Optional[str] = LOCAL, num_cpus: Optional[int] = None,
                num_gpus: Optional[int] = None) -> Iterator[Any]:
    """Start a local Ray instance on loopback, or join a cluster; yield the ``ray`` module.

    Args:
        address: ``"local"`` (or None) for a new single-machine instance bound to 127.0.0.1;
            otherwise anything ``ray.init(address=...)`` accepts: ``HOST:PORT`` of a cluster's
            head (this machine must be one of its nodes; the form the tests use), or another
            form Ray accepts (``"auto"``, ``ray://HOST:PORT`` for Ray Client, which needs Ray's
            client extra on the head), passed on untried.
        num_cpus, num_gpus: the local instance's logical CPUs/GPUs (default: what Ray detects);
            ignored when joining a cluster, whose nodes declared their own.

    On exit the driver disconnects (``ray.shutdown()``); a local instance stops with it.

    Raises:
        RayUnavailable: Ray is not installed.
        RayLoopbackError: the local instance's node address is not loopback (the instance is
            shut down first).
        ConnectionError: nothing accepts a TCP connection at a ``HOST:PORT`` address within
            :data:`PROBE_TIMEOUT` seconds (Ray itself would retry for minutes), or Ray's own
            error for other addresses.
    """
    local = address in (None, "", LOCAL)
    saved = {k: os.environ.get(k) for k in _LOCAL_ENV}
    if local:
        os.environ.update(_LOCAL_ENV)   # read by Ray at import, inherited by its processes
    try:
        ray = import_ray()
        with _connected(ray, address if not local else None, num_cpus, num_gpus):
            yield ray
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _connected(ray: Any, address: Optional[str], num_cpus: Optional[int],
               num_gpus: Optional[int]) -> Iterator[None]:
    local = address is None
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; byzps starts or joins "
                           "Ray itself")
    if address is not None:
        probe_head(address)
    kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if local:
        kwargs.update(address=LOCAL, include_dashboard=False, _node_ip_address="127.0.0.1",
                      num_cpus=num_cpus, num_gpus=num_gpus)
    else:
        kwargs.update(address=address)
    ray.init(**kwargs)
    try:
        if local:
            hosts = {n.get("NodeManagerAddress", "") for n in ray.nodes() if n.get("Alive")}
            bad = sorted(h for h in hosts if not _is_loopback(h))
            if bad:   # e.g. ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER was set
                raise RayLoopbackError(f"the local Ray instance came up on {bad}, not on "
                                       f"loopback; refusing to run on it")
        yield
    finally:
        ray.shutdown()


#: seconds to wait for a cluster's head to accept a TCP connection
PROBE_TIMEOUT = 5.0


def probe_head(address: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Check that something accepts TCP at a ``HOST:PORT`` Ray address (others pass).

    Raises:
        ConnectionError: naming the address and the socket error.
    """
    if "://" in address or address == "auto":
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConnectionError(f"Ray address {address!r}: expected HOST:PORT (the head's GCS "
                              f"port, 6379 by default), auto or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at {address}: "
                              f"{e.strerror or e.__class__.__name__}; is `ray start --head` "
                              f"running there?") from None


def cluster_summary(ray: Any) -> str:
    """``2 node(s), 4 CPU(s), 0 GPU(s)``: the connected cluster's alive nodes and logical
    resources (Ray's counts, as declared by ``ray start``/``ray.init``)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    return (f"{len(nodes)} node(s), {res.get('CPU', 0):g} CPU(s), {res.get('GPU', 0):g} GPU(s)")
