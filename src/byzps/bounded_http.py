"""A small HTTP/1.1 server for read-only GET endpoints whose cost to the host is bounded.

The PS's status endpoint (:mod:`byzps.status`) has no authentication, so anyone who reaches
it must not be able to grow the PS: thread-per-connection servers (``socketserver`` with
``ThreadingMixIn``) give every idle connection a thread forever, and ``http.server`` reads up
to 100 header lines of 64 KiB each. :class:`BoundedHttpServer` instead:

* runs **one** thread, which multiplexes every connection with ``selectors`` (non-blocking
  sockets), so idle connections cost no thread;
* holds at most ``max_connections`` connections; a new connection over the cap evicts the
  oldest one still sending its request (so idle hoarders cannot lock out a scraper, whose
  request takes milliseconds), or is reset at once when no held one can be evicted (all are
  being answered, or arrived in the same burst of accepts);
* reads at most ``max_request_bytes`` of request line plus headers (more: ``431`` and close)
  and no body;
* gives each connection ``timeout`` seconds from accept to the end of its response (an idle,
  trickling or slowly reading client is closed then);
* answers one request per connection (``Connection: close``), computed by ``app(path)``.

Only ``GET`` (and ``HEAD``) are served; anything else gets ``405``.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from byzps.net.admission import reset_socket

log = logging.getLogger(__name__)

#: ``app(path) -> (status line such as "200 OK", content type, body)``
App = Callable[[str], tuple[str, str, bytes]]


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    out: Optional[memoryview] = None


class BoundedHttpServer:
    """Serve ``app`` over HTTP from one background thread, with bounded resources.

    Args:
        host: address to bind (IPv6 if it contains ``:``).
        port: TCP port; 0 picks a free one.
        app: called as ``app(path)`` (path without the query string) for each GET; returns
            ``(status, content_type, body)``. Runs on the server thread: keep it fast.
        max_connections: most connections held at once (>= 1).
        max_request_bytes: largest request line + headers accepted, bytes.
        timeout: seconds a connection may live, from accept to the last byte of the answer.

    Raises:
        OSError: the address cannot be bound (from the constructor).
        ValueError: a limit below 1.
    """

    def __init__(self, host: str, port: int, app: App, *, max_connections: int = 16,
                 max_request_bytes: int = 8192, timeout: float = 5.0):
        if max_connections < 1 or max_request_bytes < 1 or not timeout > 0:
            raise ValueError(f"limits must be positive: max_connections={max_connections}, "
                             f"max_request_bytes={max_request_bytes}, timeout={timeout}")
        self.app = app
        self.max_connections = max_connections
        self.max_request_bytes = max_request_bytes
        self.timeout = timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(64)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self.server_address = self._listener.getsockname()
        self._sel = selectors.DefaultSelector()
        self._conns: dict[socket.socket, _Conn] = {}
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        #: clear while serve_forever runs; server_close waits for it before closing sockets
        #: that the loop may still be reading
        self._idle = threading.Event()
        self._idle.set()
        #: connections reset at accept because the cap was reached, over the server's life
        self.refused = 0
        #: held connections closed to make room for a newer one
        self.evicted = 0

    # -- the loop -----------------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until :meth:`shutdown` (call from one thread)."""
        self._idle.clear()
        self._sel.register(self._listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop.is_set():
                # requests already held first, new connections last: a burst of new ones
                # then evicts only connections that still have not sent a whole request
                ready = sorted(self._sel.select(poll_interval),
                               key=lambda event: event[0].data == "accept")
                for key, events in ready:
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._wake_r.recv(64)
                    elif events & selectors.EVENT_READ:
                        self._read(key.data)
                    elif events & selectors.EVENT_WRITE:
                        self._write(key.data)
                self._expire()
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            self._sel.close()
            self._idle.set()

    def _accept(self) -> None:
        # a connection accepted in this burst is never evicted by a later one of the same
        # burst: it first gets one turn to have its request read
        born_before = time.monotonic() + self.timeout
        for _ in range(64):   # a burst at a time; the rest on the next select
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:   # EMFILE and the like: try again on the next select
                log.debug("status endpoint: accept failed: %s", e)
                return
            if len(self._conns) >= self.max_connections:
                reading = [c for c in self._conns.values()
                           if c.out is None and c.deadline < born_before]
                if not reading:
                    self.refused += 1
                    reset_socket(sock)
                    continue
                self.evicted += 1
                self._close(min(reading, key=lambda c: c.deadline), reset=True)
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + self.timeout)
            self._conns[sock] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not chunk:
            self._close(conn)
            return
        conn.inbuf += chunk
        end = conn.inbuf.find(b"\r\n\r\n")
        if (end < 0 and len(conn.inbuf) > self.max_request_bytes) or \
                end > self.max_request_bytes:
            self._answer(conn, "431 Request Header Fields Too Large", "text/plain; charset=utf-8",
                         f"request head over {self.max_request_bytes} bytes\n".encode())
        elif end >= 0:
            self._dispatch(conn, bytes(conn.inbuf[:end]))

    def _dispatch(self, conn: _Conn, head: bytes) -> None:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._answer(conn, "400 Bad Request", "text/plain; charset=utf-8",
                         b"malformed request line\n")
            return
        method, target = parts[0], parts[1].decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            self._answer(conn, "405 Method Not Allowed", "text/plain; charset=utf-8",
                         b"only GET\n")
            return
        path = target.split("?", 1)[0]
        try:
            status, ctype, body = self.app(path)
        except Exception:   # noqa: BLE001 - one request must not stop the endpoint
            log.exception("status endpoint: error serving %s", path[:100])
            status, ctype, body = "500 Internal Server Error", "text/plain", b"error\n"
        self._answer(conn, status, ctype, b"" if method == b"HEAD" else body,
                     length=len(body))

    def _answer(self, conn: _Conn, status: str, ctype: str, body: bytes,
                length: Optional[int] = None) -> None:
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body) if length is None else length}\r\n"
                f"Connection: close\r\n\r\n").encode("latin-1")
        conn.inbuf = bytearray()
        conn.out = memoryview(head + body)
        self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        if conn.out is None:   # nothing to answer yet
            return
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if not len(conn.out):
            self._close(conn)

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self._close(conn)

    def _close(self, conn: _Conn, reset: bool = False) -> None:
        if self._conns.pop(conn.sock, None) is None:
            return
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        if reset:
            reset_socket(conn.sock)
        else:
            conn.sock.close()

    # -- control ------------------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        """Connections held now."""
        return len(self._conns)

    def shutdown(self) -> None:
        """Make :meth:`serve_forever` return (soon) from another thread."""
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def server_close(self) -> None:
        """Close the listening socket and the wake-up pair (after :meth:`shutdown`); waits up to
        5 s for a running :meth:`serve_forever` to return first (closing the wake-up socket
        under its feet raised EBADF in the serving thread)."""
        self._idle.wait(5.0)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

