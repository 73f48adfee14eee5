"""Admission of new connections to the PS: caps, file-descriptor reserve, quiet refusals.

A stranger without a key can open connections faster than a handshake times out. Each one
costs the PS a file descriptor, and a process that runs out of descriptors cannot write its
checkpoint, metrics or log. So the PS admits a new connection only while

* fewer than ``server.max_pending_connections`` connections are *pending* (accepted, not yet
  registered as a worker: TLS handshake, HELLO, authentication) in total,
* fewer than ``server.max_pending_per_address`` of them come from the same source address,
* and all its open connections (pending + registered) stay within the descriptor budget:
  the open-file soft limit minus the descriptors already open at start minus
  ``server.fd_reserve`` (kept for checkpoints, the metrics file, logs, data files).

A pending connection must register within ``server.hello_timeout`` (the server enforces one
deadline for the whole handshake), so a flood holds at most the pending cap for that long.
Registered connections are bounded by n (one per worker id). A refused connection is closed at
once, without reading from it. The server logs refusals and accept errors through
:class:`byzps.logutil.RateLimitedLog` (a few lines per reason and interval, then a count of
those left out), so a flood cannot fill the log.

The caps follow the usual defence against connection-exhaustion attacks on servers (limit
half-open and per-client connections; e.g. Apache's ``mod_reqtimeout`` and nginx's
``limit_conn``); nothing here is specific to a training job.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from typing import Optional

log = logging.getLogger(__name__)

#: the open-file soft limit is raised toward the hard limit, but not beyond this
NOFILE_TARGET = 1 << 16


def raise_nofile_limit(target: int = NOFILE_TARGET) -> tuple[int, int]:
    """Raise this process's open-file soft limit (RLIMIT_NOFILE) toward its hard limit, up
    to ``target``; never lowers it. Where ``resource`` does not exist (Windows) or the
    change is refused, leaves it as it is.

    Returns:
        ``(soft, hard)`` after the change; ``(-1, -1)`` when unknown.
    """
    try:
        import resource
    except ImportError:
        return -1, -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < cap:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (cap, hard))
            log.info("open-file limit raised from %d to %d (hard limit %s)", soft, cap,
                     "unlimited" if hard == resource.RLIM_INFINITY else hard)
            soft = cap
        except (ValueError, OSError) as e:
            log.info("open-file limit stays at %d: %s", soft, e)
    return soft, hard


def open_fds() -> Optional[int]:
    """How many file descriptors this process has open (from ``/proc/self/fd`` or
    ``/dev/fd``), or None where neither exists."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder)) - 1   # listdir's own descriptor
        except OSError:
            continue
    return None


def reset_socket(sock: socket.socket) -> None:
    """Close an accepted socket at once with a TCP reset: no lingering, no TIME_WAIT on this
    side, nothing read from it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def descriptor_budget(reserve: int) -> Optional[int]:
    """Connections this process may still open: its open-file soft limit minus the
    descriptors open now minus ``reserve``; None where the limit is unlimited or unknown
    (no ``resource`` module, no ``/proc/self/fd``). May be zero or negative."""
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    used = open_fds()
    if soft == resource.RLIM_INFINITY or used is None:
        return None
    return soft - used - reserve


class Ticket:
    """One admitted connection's place in :class:`Admission` (promote once, release once)."""

    def __init__(self, admission: Admission, host: str):
        self._admission, self.host = admission, host
        self.registered = False
        self.released = False

    def promote(self) -> None:
        """The connection registered as a worker: it no longer counts as pending."""
        if not self.registered and not self.released:
            self.registered = True
            self._admission._promote(self)

    def release(self) -> None:
        """The connection closed (idempotent)."""
        if not self.released:
            self.released = True
            self._admission._release(self)


class Admission:
    """Counts open connections and decides whether to admit a new one (see module docstring).

    Args:
        max_pending: most pending (unregistered) connections in total.
        max_pending_per_address: most pending connections from one source address.
        max_open: most open connections in total (pending + registered): the descriptor
            budget.

    Raises:
        ValueError: a cap below 1.
    """

    def __init__(self, max_pending: int, max_pending_per_address: int, max_open: int):
        if min(max_pending, max_pending_per_address, max_open) < 1:
            raise ValueError(f"connection caps must be >= 1, got max_pending={max_pending}, "
                             f"max_pending_per_address={max_pending_per_address}, "
                             f"max_open={max_open}")
        self.max_pending = max_pending
        self.max_pending_per_address = max_pending_per_address
        self.max_open = max_open
        self.pending = 0
        self.open = 0
        self._per_address: dict[str, int] = {}

    def admit(self, host: str) -> tuple[Optional[Ticket], str]:
        """Admit a connection from ``host`` or say why not.

        Returns:
            ``(ticket, "")`` when admitted, else ``(None, reason)`` with reason one of
            ``"descriptor budget"``, ``"pending cap"``, ``"per-address cap"``.
        """
        if self.open >= self.max_open:
            return None, "descriptor budget"
        if self.pending >= self.max_pending:
            return None, "pending cap"
        if self._per_address.get(host, 0) >= self.max_pending_per_address:
            return None, "per-address cap"
        self.pending += 1
        self.open += 1
        self._per_address[host] = self._per_address.get(host, 0) + 1
        return Ticket(self, host), ""

    def _drop_pending(self, host: str) -> None:
        self.pending -= 1
        left = self._per_address[host] - 1
        if left:
            self._per_address[host] = left
        else:
            del self._per_address[host]

    def _promote(self, ticket: Ticket) -> None:
        self._drop_pending(ticket.host)

    def _release(self, ticket: Ticket) -> None:
        if not ticket.registered:
            self._drop_pending(ticket.host)
        self.open -= 1
