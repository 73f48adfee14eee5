"""Moving frames over asyncio streams: read one validated message, write one message.

All validation lives in :mod:`byzps.wire`; this module only reads the bytes it is told to
read, with a time limit per frame, so a peer that trickles a frame or stops mid-frame is cut
off after ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from byzps.wire import PREFIX_BYTES, FrameError, Limits, Message, build_message, encode, \
    parse_header, parse_prefix


class PeerClosed(ConnectionError):
    """The peer closed the connection (cleanly, between frames)."""


async def _read_frame(reader: asyncio.StreamReader, limits: Limits) -> Message:
    try:
        raw = await reader.readexactly(PREFIX_BYTES)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise PeerClosed("connection closed") from None
        raise FrameError(f"connection closed inside a frame prefix ({len(e.partial)} bytes)") \
            from None
    prefix = parse_prefix(raw, limits)
    try:
        header = parse_header(prefix, await reader.readexactly(prefix.header_len), limits)
        payload = bytearray(prefix.payload_len)
        view = memoryview(payload)
        got = 0
        while got < prefix.payload_len:
            chunk = await reader.read(min(prefix.payload_len - got, 1 << 20))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", prefix.payload_len - got)
            view[got:got + len(chunk)] = chunk
            got += len(chunk)
    except asyncio.IncompleteReadError:
        raise FrameError(f"connection closed inside a {prefix.mtype.name} frame") from None
    return build_message(prefix, header, payload)


async def read_message(reader: asyncio.StreamReader, limits: Limits,
                       timeout: Optional[float]) -> Message:
    """Read and validate one message.

    Args:
        reader: the stream.
        limits: model size and the message types accepted now.
        timeout: seconds allowed for the whole frame once its first byte is awaited; None waits
            forever.

    Raises:
        PeerClosed: clean end of stream before a frame.
        FrameError: a malformed or oversized frame, or a stream cut inside one.
        TimeoutError: the frame did not arrive in time.
    """
    if timeout is None:
        return await _read_frame(reader, limits)
    return await asyncio.wait_for(_read_frame(reader, limits), timeout)


async def write_message(writer: asyncio.StreamWriter, msg: Message | list,
                        timeout: Optional[float]) -> None:
    """Write one message (or pre-encoded buffers from :func:`byzps.wire.encode`) and drain.

    Raises:
        TimeoutError: the peer did not take the bytes within ``timeout`` seconds.
        ConnectionError: the connection is gone.
    """
    buffers = msg if isinstance(msg, list) else encode(msg)
    writer.writelines(buffers)
    if timeout is None:
        await writer.drain()
    else:
        await asyncio.wait_for(writer.drain(), timeout)
