"""Moving frames over asyncio: read one validated message, write one message.

All validation lives in :mod:`byzps.net.wire`; this module only reads the bytes it is told to
read, with a time limit per frame, so a peer that trickles a frame or stops mid-frame is cut
off after ``timeout`` seconds.

:class:`FrameStream` is the connection the PS and the workers use: an
``asyncio.BufferedProtocol`` that has the kernel (or the TLS layer) write a frame's payload
straight into its destination, e.g. the gradient's row of the PS's preallocated ``(n, d)``
buffer, with no intermediate bytes objects; it sends tensors from their own memory
(memoryviews, written in bounded chunks, so the transport never joins or buffers a whole
payload).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Optional, Union, cast

import torch

from byzps.net.auth import MacSession
from byzps.net.wire import (
    MAC_BYTES,
    PREFIX_BYTES,
    FrameError,
    Limits,
    Message,
    Prefix,
    build_message,
    encode,
    parse_header,
    parse_prefix,
    tensor_bytes,
)
from byzps.safeio import MAX_TLS_BYTES, FileRefused, check_file, first_line, read_text

#: bytes read ahead into a connection's staging buffer (prefixes, headers, trailers)
STAGE_BYTES = 1 << 16
#: reads at least this large go straight into the destination, bypassing the staging buffer
DIRECT_BYTES = 1 << 14
#: largest slice of a payload handed to the transport at once (bounds its internal copy)
WRITE_CHUNK = 1 << 20
#: frames up to this size are joined and written in one call (one segment on the wire)
JOIN_BYTES = 1 << 16

#: ``sink(prefix, header)`` -> a contiguous float32 CPU tensor of ``prefix.payload_len / 4``
#: values to receive a tensor payload into, or None for a fresh one
Sink = Callable[[Prefix, dict], Optional[torch.Tensor]]


class PeerClosed(ConnectionError):
    """The peer closed the connection (cleanly, between frames)."""


def frame_buffers(msg: Message | list, session: Optional[MacSession]) -> list:
    """The buffers to write for ``msg`` (or for pre-encoded, MAC-flagged buffers when
    ``msg`` is a list), with the MAC trailer appended when ``session`` is given."""
    buffers = msg if isinstance(msg, list) else encode(msg, mac=session is not None)
    if session is not None:
        buffers = buffers + [session.seal(buffers)]
    return buffers


class FrameStream(asyncio.BufferedProtocol):
    """One framed connection (plain TCP or TLS) as an asyncio buffered protocol.

    Use it as the protocol of ``loop.create_server`` / ``loop.create_connection``; then
    :meth:`read_message` and :meth:`write_message` (one reader at a time; concurrent writers
    are served one whole frame after another). Small reads (prefix, header, MAC trailer) go
    through a 64 KiB staging buffer; a tensor payload is received straight into the tensor
    that ``sink`` names (or a fresh one), so its bytes are copied once, by the kernel or the
    TLS layer. When the staging buffer is
    full and nobody reads, the transport stops reading (TCP backpressure).

    Args:
        on_connect: called with this stream once the connection (and any TLS handshake) is
            made; the PS starts its per-connection task there.

    Attributes:
        transport: the asyncio transport (None before the connection is made).
        frame_bytes: bytes of the last frame read (prefix + header + payload + MAC).
        frame_arrived: ``time.perf_counter()`` when its last byte arrived.
    """

    def __init__(self, on_connect: Optional[Callable[[FrameStream], None]] = None):
        self._on_connect = on_connect
        self.transport: Optional[asyncio.Transport] = None
        self._stage = bytearray(STAGE_BYTES)
        self._view = memoryview(self._stage)
        self._start = 0                   # unread staging bytes are _stage[_start:_end]
        self._end = 0
        self._target: Optional[memoryview] = None   # rest of a payload being read directly
        self._waiter: Optional[asyncio.Future] = None
        self._eof = False
        self._lost = False
        self._exc: Optional[BaseException] = None
        self._broken = False              # a frame was cut by a timeout/cancel: desynced
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiters: deque = deque()
        self._write_lock = asyncio.Lock()
        self.frame_bytes = 0
        self.frame_arrived = 0.0

    # -- protocol callbacks (called by the event loop) -----------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Store the transport and hand the stream to ``on_connect``."""
        # a stream connection's transport (plain or TLS) is always a full asyncio.Transport
        self.transport = tr = cast(asyncio.Transport, transport)
        if tr.get_extra_info("sslcontext") is None:
            # write the next chunk only once the transport holds nothing: a chunk then mostly
            # goes straight into the kernel instead of being copied into the transport's
            # buffer (measured: a 16 x 44 MB broadcast in about half the wall time). Not over
            # TLS, whose layer may keep a few bytes pending and never report an empty buffer.
            tr.set_write_buffer_limits(high=0)
        if self._on_connect is not None:
            self._on_connect(self)

    def _connected(self) -> asyncio.Transport:
        """The transport. Raises ConnectionResetError before the connection is made."""
        if self.transport is None:
            raise ConnectionResetError("not connected")
        return self.transport

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the transport writes the next bytes: the rest of the payload being received,
        else the free part of the staging buffer (never empty: reading pauses when full)."""
        if self._target is not None:
            return self._target
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == STAGE_BYTES:
            kept = self._end - self._start
            self._view[:kept] = self._view[self._start:self._end]
            self._start, self._end = 0, kept
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last buffer :meth:`get_buffer` returned."""
        if self._target is not None:
            self._target = self._target[nbytes:]
            if len(self._target):
                return
            self._target = None
        else:
            self._end += nbytes
            if self._end - self._start >= STAGE_BYTES and not self._reading_paused:
                self._reading_paused = True
                self._connected().pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        """The peer shut down its sending side; readers get the end of stream. Keeps a plain
        TCP connection open for our writes (like asyncio streams); TLS closes it."""
        self._eof = True
        self._wake()
        return self.transport is not None and \
            self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        """Wake the reader and every writer waiting to drain."""
        self._lost, self._exc = True, exc
        self._wake()
        while self._drain_waiters:
            fut = self._drain_waiters.popleft()
            if not fut.done():
                fut.set_exception(ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        """The transport's write buffer is over its high-water mark."""
        self._writing_paused = True

    def resume_writing(self) -> None:
        """The transport's write buffer drained below its low-water mark."""
        self._writing_paused = False
        while self._drain_waiters:
            fut = self._drain_waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    # -- reading ------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _resume_reading(self) -> None:
        if self._reading_paused and not self._lost:
            self._reading_paused = False
            self._connected().resume_reading()

    def _ended(self) -> bool:
        return self._eof or self._lost

    def _raise_lost(self) -> None:
        """The connection broke with an error (not a clean end of stream): say so."""
        if self._exc is not None:
            raise ConnectionResetError(f"connection lost: {self._exc}")

    async def _fill(self, view: memoryview) -> None:
        """Fill ``view`` completely with the next bytes of the stream.

        Raises:
            asyncio.IncompleteReadError: the stream ended first (``partial`` is empty only when
                it ended before the first byte).
        """
        size, got = len(view), 0
        try:
            while got < size:
                avail = self._end - self._start
                if avail:
                    take = min(avail, size - got)
                    view[got:got + take] = self._view[self._start:self._start + take]
                    self._start += take
                    got += take
                    self._resume_reading()
                    continue
                if self._ended():
                    self._raise_lost()
                    raise asyncio.IncompleteReadError(bytes(view[:got]), size)
                self._resume_reading()
                if size - got >= DIRECT_BYTES:
                    self._target = view[got:]
                    while self._target is not None and not self._ended():
                        await self._wait()
                    if self._target is not None:
                        got = size - len(self._target)
                        self._target = None
                        self._raise_lost()
                        raise asyncio.IncompleteReadError(bytes(view[:got]), size)
                    got = size
                else:
                    await self._wait()
        except BaseException as e:
            if self._target is not None:   # cancelled mid-payload: stop writing into `view`
                self._target = None
                self.abort()
            if got and not isinstance(e, asyncio.IncompleteReadError):
                self._broken = True
            raise

    async def _read_frame(self, limits: Limits, session: Optional[MacSession],
                          sink: Optional[Sink]) -> Message:
        if self._broken:
            raise FrameError("connection is out of step after an interrupted frame")
        raw = bytearray(PREFIX_BYTES)
        try:
            await self._fill(memoryview(raw))
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                raise PeerClosed("connection closed") from None
            raise FrameError(f"connection closed inside a frame prefix ({len(e.partial)} "
                             f"bytes)") from None
        prefix = parse_prefix(bytes(raw), limits)
        try:
            hbytes = bytearray(prefix.header_len)
            await self._fill(memoryview(hbytes))
            header = parse_header(prefix, bytes(hbytes), limits)
            payload: Union[bytes, torch.Tensor] = b""
            pview = memoryview(b"")
            if prefix.payload_len:
                dest = sink(prefix, header) if sink is not None else None
                if dest is None:
                    dest = torch.empty(prefix.payload_len // 4, dtype=torch.float32)
                pview = tensor_bytes(dest)
                if len(pview) != prefix.payload_len:
                    raise ValueError(f"sink gave {len(pview)} bytes for a "
                                     f"{prefix.payload_len}-byte payload")
                await self._fill(pview)
                payload = dest
            trailer = bytearray(MAC_BYTES if prefix.mac else 0)
            if prefix.mac:
                await self._fill(memoryview(trailer))
        except asyncio.IncompleteReadError:
            raise FrameError(f"connection closed inside a {prefix.mtype.name} frame") from None
        self.frame_arrived = time.perf_counter()
        self.frame_bytes = PREFIX_BYTES + prefix.header_len + prefix.payload_len + len(trailer)
        if prefix.mac:
            if session is None:
                raise FrameError("a MAC'd frame but no authenticated session")
            session.verify([bytes(raw) + bytes(hbytes), pview], trailer)
        if isinstance(payload, torch.Tensor) and sys.byteorder != "little":
            payload.numpy().byteswap(inplace=True)   # the wire is little-endian
        return build_message(prefix, header, payload)

    async def read_message(self, limits: Limits, timeout: Optional[float] = None,
                           session: Optional[MacSession] = None,
                           sink: Optional[Sink] = None) -> Message:
        """Read and validate one message.

        Args:
            limits: model size, the message types accepted now, whether a MAC is required.
            timeout: seconds allowed for the whole frame once its first byte is awaited; None
                waits forever.
            session: checks the MAC trailer of authenticated frames.
            sink: called once the prefix and header are validated, for a frame with a tensor
                payload: returns the contiguous float32 tensor (``payload_len / 4`` values) to
                receive it into, or None for a fresh tensor. The message's tensor is then that
                tensor (viewed as the header's shape).

        Raises:
            PeerClosed: clean end of stream before a frame.
            ConnectionError: the connection broke with an error (e.g. reset by the peer).
            FrameError: a malformed or oversized frame, a stream cut inside one, or a stream
                left out of step by an earlier interrupted read.
            byzps.net.auth.AuthError: the MAC does not verify.
            TimeoutError: the frame did not arrive in time (the stream is then out of step).
        """
        if timeout is None:
            return await self._read_frame(limits, session, sink)
        return await asyncio.wait_for(self._read_frame(limits, session, sink), timeout)

    # -- writing ------------------------------------------------------------------------------

    async def _drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("connection lost")
        if self._writing_paused:
            fut = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            await fut

    async def _write(self, buffers: list) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        if sum(len(v) for v in views) <= JOIN_BYTES:
            views = [memoryview(b"".join(views))]
        transport = self._connected()
        for v in views:
            for off in range(0, len(v), WRITE_CHUNK):
                if self._lost or transport.is_closing():
                    raise ConnectionResetError("connection lost")
                transport.write(v[off:off + WRITE_CHUNK])
                await self._drain()

    async def _send(self, msg: Message | list, session: Optional[MacSession]) -> None:
        async with self._write_lock:   # whole frames, MAC sequence numbers in wire order
            await self._write(frame_buffers(msg, session))

    async def write_message(self, msg: Message | list, timeout: Optional[float],
                            session: Optional[MacSession] = None) -> None:
        """Write one message (or pre-built buffers, see :func:`frame_buffers`) and wait until
        the transport has taken it (its buffer is below the high-water mark). Tensors are sent
        from their own memory, which must not change until this returns.

        Raises:
            TimeoutError: the peer did not take the bytes within ``timeout`` seconds.
            ConnectionError: the connection is gone.
        """
        if timeout is None:
            await self._send(msg, session)
        else:
            await asyncio.wait_for(self._send(msg, session), timeout)

    # -- the connection -----------------------------------------------------------------------

    def get_extra_info(self, name: str, default=None):
        """The transport's ``get_extra_info`` (``peername``, ``socket``, ...)."""
        if self.transport is None:
            return default
        return self.transport.get_extra_info(name, default)

    def close(self) -> None:
        """Close after the buffered writes are sent."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping unsent data (a slow or misbehaving peer)."""
        if self.transport is not None:
            self.transport.abort()


def set_keepalive(sock: Optional[socket.socket], idle: int = 10, interval: int = 5,
                  count: int = 3) -> None:
    """Enable TCP keepalive so a dead peer is noticed within about idle + interval * count
    seconds (Linux knobs where available)."""
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval),
                        ("TCP_KEEPCNT", count)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class TlsError(ValueError):
    """TLS is configured but cannot be set up; the message names the file and the problem."""


def server_ssl_context(cert: str | None, key: str | None):
    """An ``ssl.SSLContext`` for the PS (TLS >= 1.2) from PEM files.

    Both files must be regular files of at most :data:`byzps.safeio.MAX_TLS_BYTES` bytes
    (checked before ``ssl`` reads them).

    Raises:
        TlsError: cert or key missing, unreadable, not a regular file or too large.
    """
    import ssl

    if not cert or not key:
        raise TlsError("server.tls needs both cert and key on the PS")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        check_file(cert, MAX_TLS_BYTES, "server.tls.cert")
        check_file(key, MAX_TLS_BYTES, "server.tls.key")
    except FileRefused as e:
        raise TlsError(str(e)) from None
    except OSError as e:
        raise TlsError(f"server.tls: cannot read {e.filename}: {e.strerror or e}") from None
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"server.tls: cannot load cert {cert} / key {key}: {e}") from None
    return ctx


def client_ssl_context(ca: str | None):
    """An ``ssl.SSLContext`` for a worker that verifies the PS against the CA bundle ``ca``
    (a regular file of at most :data:`byzps.safeio.MAX_TLS_BYTES` bytes, read once).

    Raises:
        TlsError: ca missing, unreadable, not a regular file, too large or not PEM.
    """
    import ssl

    if not ca:
        raise TlsError("server.tls needs ca on the workers (the CA that signed the PS's cert)")
    try:
        pem = read_text(ca, MAX_TLS_BYTES, "server.tls.ca")
    except FileRefused as e:
        raise TlsError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise TlsError(f"server.tls: cannot load CA bundle {ca}: {first_line(e)}") from None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=pem)
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"server.tls: cannot load CA bundle {ca}: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
