"""Moving frames over asyncio streams: read one validated message, write one message.

All validation lives in :mod:`byzps.wire`; this module only reads the bytes it is told to
read, with a time limit per frame, so a peer that trickles a frame or stops mid-frame is cut
off after ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Optional

from byzps.auth import MacSession
from byzps.wire import MAC_BYTES, PREFIX_BYTES, FrameError, Limits, Message, build_message, \
    encode, parse_header, parse_prefix


class PeerClosed(ConnectionError):
    """The peer closed the connection (cleanly, between frames)."""


async def _read_frame(reader: asyncio.StreamReader, limits: Limits,
                      session: Optional[MacSession]) -> Message:
    try:
        raw = await reader.readexactly(PREFIX_BYTES)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise PeerClosed("connection closed") from None
        raise FrameError(f"connection closed inside a frame prefix ({len(e.partial)} bytes)") \
            from None
    prefix = parse_prefix(raw, limits)
    try:
        hbytes = await reader.readexactly(prefix.header_len)
        header = parse_header(prefix, hbytes, limits)
        payload = bytearray(prefix.payload_len)
        view = memoryview(payload)
        got = 0
        while got < prefix.payload_len:
            chunk = await reader.read(min(prefix.payload_len - got, 1 << 20))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", prefix.payload_len - got)
            view[got:got + len(chunk)] = chunk
            got += len(chunk)
        trailer = await reader.readexactly(MAC_BYTES) if prefix.mac else b""
    except asyncio.IncompleteReadError:
        raise FrameError(f"connection closed inside a {prefix.mtype.name} frame") from None
    if prefix.mac:
        if session is None:
            raise FrameError("a MAC'd frame but no authenticated session")
        session.verify([raw + hbytes, payload], trailer)
    return build_message(prefix, header, payload)


async def read_message(reader: asyncio.StreamReader, limits: Limits,
                       timeout: Optional[float], session: Optional[MacSession] = None
                       ) -> Message:
    """Read and validate one message.

    Args:
        reader: the stream.
        limits: model size, the message types accepted now, whether a MAC is required.
        timeout: seconds allowed for the whole frame once its first byte is awaited; None waits
            forever.
        session: checks the MAC trailer of authenticated frames.

    Raises:
        PeerClosed: clean end of stream before a frame.
        FrameError: a malformed or oversized frame, or a stream cut inside one.
        byzps.auth.AuthError: the MAC does not verify.
        TimeoutError: the frame did not arrive in time.
    """
    if timeout is None:
        return await _read_frame(reader, limits, session)
    return await asyncio.wait_for(_read_frame(reader, limits, session), timeout)


def frame_buffers(msg: Message | list, session: Optional[MacSession]) -> list:
    """The buffers to write for ``msg`` (or for pre-encoded, MAC-flagged buffers when
    ``msg`` is a list), with the MAC trailer appended when ``session`` is given."""
    buffers = msg if isinstance(msg, list) else encode(msg, mac=session is not None)
    if session is not None:
        buffers = buffers + [session.seal(buffers)]
    return buffers


async def write_message(writer: asyncio.StreamWriter, msg: Message | list,
                        timeout: Optional[float], session: Optional[MacSession] = None) -> None:
    """Write one message (or buffers from :func:`byzps.wire.encode`) and drain.

    Raises:
        TimeoutError: the peer did not take the bytes within ``timeout`` seconds.
        ConnectionError: the connection is gone.
    """
    writer.writelines(frame_buffers(msg, session))
    if timeout is None:
        await writer.drain()
    else:
        await asyncio.wait_for(writer.drain(), timeout)


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

    Raises:
        TlsError: cert or key missing or unreadable.
    """
    import ssl

    if not cert or not key:
        raise TlsError("server.tls needs both cert and key on the PS")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"server.tls: cannot load cert {cert} / key {key}: {e}") from None
    return ctx


def client_ssl_context(ca: str | None):
    """An ``ssl.SSLContext`` for a worker that verifies the PS against the CA bundle ``ca``.

    Raises:
        TlsError: ca missing or unreadable.
    """
    import ssl

    if not ca:
        raise TlsError("server.tls needs ca on the workers (the CA that signed the PS's cert)")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"server.tls: cannot load CA bundle {ca}: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
