"""The status endpoint under hoarding (issue 11, item 6): idle connections and huge headers
cost no threads and are closed in bounded time; a scraper still gets its answer."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pytest

pytest.importorskip("prometheus_client")
from byzps.status import MAX_REQUEST_BYTES, StatusEndpoint  # noqa: E402


def _closed(s: socket.socket, wait: float) -> bool:
    """Whether the server closed ``s`` (EOF or reset) within ``wait`` seconds; bytes it sent
    first (an error answer) are read and skipped."""
    s.settimeout(wait)
    try:
        while s.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_idle_and_huge_header_connections_cost_no_threads_and_are_closed():
    ep = StatusEndpoint("127.0.0.1", 0, worker_ids=[0, 1], rounds=5, max_connections=8,
                        timeout=1.0)
    port = ep.start()
    threads_before = threading.active_count()
    idle, huge = [], []
    try:
        for _ in range(60):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port))
            s.setblocking(False)
            try:
                s.send(b"GET /status HTTP/1.1\r\nX-Pad: " + b"a" * 200_000)
            except OSError:
                pass
            huge.append(s)
        time.sleep(0.3)
        assert threading.active_count() == threads_before
        assert ep._httpd.open_connections <= 8
        # a scraper evicts the oldest hoarder and gets its answer at once
        start = time.perf_counter()
        with urllib.request.urlopen(f"{ep.url}/status", timeout=5) as resp:
            assert json.loads(resp.read())["rounds"] == 5
        assert time.perf_counter() - start < 1.0
        # every hoarder is closed within the 1 s connection timeout (+ slack)
        deadline = time.monotonic() + 3.0
        still = [s for s in idle + huge if not _closed(s, max(0.01, deadline - time.monotonic()))]
        assert not still, f"{len(still)} connections still open"
        # the cap, not the timeout, closed most of them: at most 8 are ever held, so most of the
        # 80 were refused at accept or evicted. The exact count depends on scheduling (one that
        # hits its 1 s timeout, or is answered 431, is closed without being counted), so the
        # floor is half of the 72 beyond the cap: a loaded CI machine once counted 59.
        assert ep._httpd.refused + ep._httpd.evicted >= 36
    finally:
        for s in idle + huge:
            s.close()
        ep.stop()


def test_a_request_head_over_the_limit_gets_431_and_only_get_is_served():
    ep = StatusEndpoint("127.0.0.1", 0, worker_ids=[0], rounds=1, timeout=2.0)
    port = ep.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.sendall(b"GET / HTTP/1.1\r\nX: " + b"b" * (MAX_REQUEST_BYTES + 10) + b"\r\n\r\n")
            head = s.recv(200)
        assert head.startswith(b"HTTP/1.1 431 ")
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.sendall(b"POST /status HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            assert s.recv(200).startswith(b"HTTP/1.1 405 ")
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.sendall(b"\r\n\r\n")
            assert s.recv(200).startswith(b"HTTP/1.1 400 ")
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.sendall(b"GET /nope?x=1 HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 404 ") and reply.endswith(
            b"not found: /nope; try /metrics or /status\n")
    finally:
        ep.stop()
