"""A Byzantine worker for tests and benchmarks: it holds its own valid key, speaks the real wire
protocol over a plain TCP socket (HELLO, challenge-response, MAC'd frames) and misbehaves in
one of the ways an authenticated worker can:

- ``late``: answers each ROUND ``delay`` seconds after it arrived, with an all-NaN gradient
  (which the PS rejects) or a finite one;
- ``resync``: sends RESYNC frames (``resyncs`` in all, over every connection; one each
  ``interval`` seconds, or all at once) and keeps reading what the PS sends;
- ``claim_ids``: answers each ROUND promptly with a gradient whose header claims a new worker
  id every round.

It reconnects when the PS drops it, until the PS says STOP or ``stop()`` is called, and counts
the bytes of every frame type it receives (``bytes_by_type``), e.g. the STATE bytes a RESYNC
flood pulled. Used by ``tests/test_hostile_worker.py`` and ``benchmarks/hostile_worker.py``.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from typing import Optional

import torch

from byzps.net import auth
from byzps.net.transport import frame_buffers
from byzps.net.wire import (
    MAC_BYTES,
    PREFIX_BYTES,
    Auth,
    Challenge,
    Gradient,
    Hello,
    Limits,
    MsgType,
    Refuse,
    Resync,
    RoundStart,
    State,
    Stop,
    decode_frame,
    encode,
)

_RUNNING = frozenset({MsgType.STATE, MsgType.ROUND, MsgType.UPDATE, MsgType.STOP,
                      MsgType.REFUSE})


class HostileWorker(threading.Thread):
    """An authenticated Byzantine worker running in a background thread.

    Args:
        port: the PS's port on ``host``.
        worker_id: its configured id.
        key: its 32-byte key (from ``byzps keygen`` / :func:`byzps.net.auth.generate_keys`).
        d: model size.
        mode: ``late``, ``resync`` or ``claim_ids`` (see the module docstring).
        delay: ``late``: seconds between a ROUND's arrival and the answer.
        nan: ``late``: send NaN (rejected) rather than zeros (usable).
        resyncs: ``resync``: RESYNC frames to send in all.
        interval: ``resync``: seconds between two RESYNC frames (0: a burst).
        model: the model signature its HELLO carries (``conftest.model_signature``; the PS
            refuses a worker whose model differs).
        host: the PS's address.

    Attributes:
        bytes_by_type: message type name -> frame bytes received.
        frames_by_type: message type name -> frames received.
        connects: successful handshakes.
        resyncs_sent: RESYNC frames sent so far.
        stopped: the PS's STOP, once received.
    """

    def __init__(self, port: int, worker_id: int, key: bytes, d: int, mode: str,
                 delay: float = 0.0, nan: bool = True, resyncs: int = 0,
                 interval: float = 0.0, host: str = "127.0.0.1", model: str | None = None):
        super().__init__(daemon=True, name=f"hostile-{worker_id}")
        if mode not in ("late", "resync", "claim_ids"):
            raise ValueError(f"unknown mode {mode!r}")
        self.host, self.port, self.worker_id, self.key, self.d = host, port, worker_id, key, d
        self.mode, self.delay, self.nan, self.resyncs = mode, delay, nan, resyncs
        self.interval = interval
        self.model = model
        self.resyncs_sent = 0
        self.bytes_by_type: Counter = Counter()
        self.frames_by_type: Counter = Counter()
        self.connects = 0
        self.stopped: Optional[Stop] = None
        self._halt = threading.Event()
        self._claims = 0

    # -- framing ----------------------------------------------------------------------------

    def _recv_exact(self, sock: socket.socket, k: int) -> bytes:
        parts, got = [], 0
        while got < k:
            chunk = sock.recv(min(k - got, 1 << 20))
            if not chunk:
                raise ConnectionError("closed by the PS")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def _read(self, sock: socket.socket, limits: Limits, session=None):
        head = self._recv_exact(sock, PREFIX_BYTES)
        flags, hlen, plen = struct.unpack("<HIQ", head[6:20])
        body = self._recv_exact(sock, hlen + plen + (MAC_BYTES if flags & 1 else 0))
        msg = decode_frame(head + body, limits, session)
        name = type(msg).__name__
        self.bytes_by_type[name] += len(head) + len(body)
        self.frames_by_type[name] += 1
        return msg

    @staticmethod
    def _send(sock: socket.socket, msg, session=None) -> None:
        bufs = frame_buffers(msg, session) if session is not None else encode(msg)
        sock.sendall(b"".join(bytes(b) for b in bufs))

    def _handshake(self) -> tuple[socket.socket, auth.MacSession]:
        sock = socket.create_connection((self.host, self.port), timeout=30)
        nonce = auth.new_nonce()
        self._send(sock, Hello(self.worker_id, nonce.hex(), self.model))
        first = self._read(sock, Limits(self.d, frozenset({MsgType.CHALLENGE, MsgType.REFUSE})))
        if isinstance(first, Refuse):
            sock.close()
            raise ConnectionError(f"refused: {first.reason}")
        assert isinstance(first, Challenge)
        server_nonce = bytes.fromhex(first.nonce)
        tag = auth.auth_tag(self.key, self.worker_id, nonce, server_nonce)
        self._send(sock, Auth(tag.hex()))
        sock.settimeout(None)
        return sock, auth.MacSession(self.key, self.worker_id, nonce, server_nonce,
                                     is_server=False)

    # -- behaviour --------------------------------------------------------------------------

    def _answer(self, sock, session, lock, round_: int) -> None:
        if self.mode == "claim_ids":
            claimed = 1_000_000 + self._claims     # a new id every round
            self._claims += 1
            msg = Gradient(round_, claimed, torch.zeros(self.d), 0.1)
        else:
            fill = float("nan") if self.nan else 0.0
            msg = Gradient(round_, self.worker_id, torch.full((self.d,), fill), 0.1)
        with lock:
            self._send(sock, msg, session)

    def _session(self) -> None:
        sock, session = self._handshake()
        self.connects += 1
        lock = threading.Lock()
        timers: list[threading.Timer] = []
        try:
            if self.mode == "resync":
                flood = threading.Thread(target=self._flood, args=(sock, session, lock),
                                         daemon=True)
                flood.start()
            while not self._halt.is_set():
                msg = self._read(sock, Limits(self.d, _RUNNING, mac=True), session)
                if isinstance(msg, Stop):
                    self.stopped = msg
                    return
                if isinstance(msg, Refuse):
                    raise ConnectionError(f"refused: {msg.reason}")
                if isinstance(msg, RoundStart) and self.mode in ("late", "claim_ids"):
                    if self.mode == "late" and self.delay > 0:
                        t = threading.Timer(self.delay, self._safe_answer,
                                            (sock, session, lock, msg.round))
                        t.daemon = True
                        t.start()
                        timers.append(t)
                    else:
                        self._answer(sock, session, lock, msg.round)
                elif isinstance(msg, State):
                    pass
        finally:
            for t in timers:
                t.cancel()
            sock.close()

    def _flood(self, sock, session, lock) -> None:
        try:
            while self.resyncs_sent < self.resyncs and not self._halt.is_set():
                with lock:
                    self._send(sock, Resync(0), session)
                self.resyncs_sent += 1
                if self.interval > 0:
                    time.sleep(self.interval)
        except OSError:
            pass

    def _safe_answer(self, sock, session, lock, round_: int) -> None:
        try:
            self._answer(sock, session, lock, round_)
        except OSError:
            pass

    def run(self) -> None:
        """Connect, misbehave, reconnect when dropped; until STOP or :meth:`stop`."""
        while not self._halt.is_set() and self.stopped is None:
            try:
                self._session()
            except (OSError, ConnectionError, ValueError):
                if self._halt.is_set():
                    return
                time.sleep(0.2)

    def stop(self) -> None:
        """Ask the thread to end (it ends at its next frame or reconnect)."""
        self._halt.set()
