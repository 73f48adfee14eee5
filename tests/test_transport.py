"""FrameStream over real loopback connections: payloads land in the caller's buffer, pipelined
frames, MAC, cut-off and trickled frames, large writes."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from byzps.net.auth import AuthError, MacSession
from byzps.net.transport import FrameStream, PeerClosed, client_ssl_context, server_ssl_context
from byzps.net.wire import FrameError, Gradient, Limits, MsgType, RoundStart, Update, encode

ROOT = Path(__file__).resolve().parent.parent
D = 50_000   # 200 kB payloads: larger than the staging buffer, read straight into the sink
LIMITS = Limits(D, frozenset({MsgType.GRADIENT, MsgType.ROUND, MsgType.UPDATE}))


def raw(msg, session=None) -> bytes:
    bufs = encode(msg, mac=session is not None)
    tail = [session.seal(bufs)] if session is not None else []
    return b"".join(bytes(b) for b in bufs + tail)


async def served(client_bytes: bytes, reader, *, close: bool = True, trickle: float = 0.0):
    """Start a FrameStream server, have a plain socket send ``client_bytes`` (then close),
    and return what ``reader(stream)`` returns."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future = loop.create_future()
    server = await loop.create_server(lambda: FrameStream(accepted.set_result), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)

    async def send():
        if trickle:
            for i in range(len(client_bytes)):
                await loop.sock_sendall(sock, client_bytes[i:i + 1])
                await asyncio.sleep(trickle)
        else:
            await loop.sock_sendall(sock, client_bytes)
        if close:
            sock.close()

    sender = asyncio.ensure_future(send())
    stream = await accepted
    try:
        return await reader(stream)
    finally:
        sender.cancel()
        stream.abort()
        sock.close()
        server.close()


def test_payload_lands_in_the_sink_and_pipelined_frames_are_split_right():
    g1, g2 = torch.randn(D), torch.randn(D)
    data = raw(Gradient(3, 1, g1, 0.5)) + raw(RoundStart(4, "a" * 32)) + raw(Gradient(4, 1, g2))
    rows = torch.zeros(2, D)

    async def reader(stream):
        out = []
        for i in range(3):
            sink = (lambda p, h, i=i: rows[i // 2]) if i != 1 else None
            out.append(await stream.read_message(LIMITS, 5.0, sink=sink))
            out.append(stream.frame_bytes)
        with pytest.raises(PeerClosed):
            await stream.read_message(LIMITS, 5.0)
        return out

    m1, n1, rs, _, m2, n2 = asyncio.run(served(data, reader))
    assert m1.round == 3 and m1.loss == 0.5 and m1.tensor.data_ptr() == rows[0].data_ptr()
    assert torch.equal(rows[0], g1) and torch.equal(m2.tensor, g2)
    assert m2.tensor.data_ptr() == rows[1].data_ptr()
    assert rs == RoundStart(4, "a" * 32)
    assert n1 == len(raw(Gradient(3, 1, g1, 0.5))) and n2 == len(raw(Gradient(4, 1, g2)))


def test_frames_without_sink_get_a_fresh_tensor_and_mac_is_checked():
    key, cn, sn = bytes(range(32)), b"c" * 32, b"s" * 32
    worker = MacSession(key, 1, cn, sn, is_server=False)
    ps = MacSession(key, 1, cn, sn, is_server=True)
    g = torch.randn(D)
    good = raw(Gradient(0, 1, g), worker)
    bad = bytearray(raw(Gradient(1, 1, g), worker))
    bad[-100] ^= 1                                                 # one payload bit flipped
    limits = Limits(D, frozenset({MsgType.GRADIENT}), mac=True)

    async def reader(stream):
        msg = await stream.read_message(limits, 5.0, ps)
        with pytest.raises(AuthError):
            await stream.read_message(limits, 5.0, ps)
        return msg

    msg = asyncio.run(served(good + bytes(bad), reader))
    assert torch.equal(msg.tensor, g)


@pytest.mark.parametrize("cut", [5, 40, 1000, 150_000])
def test_a_frame_cut_short_is_a_frame_error_not_a_hang(cut):
    data = raw(Gradient(0, 0, torch.ones(D)))[:cut]

    async def reader(stream):
        with pytest.raises(FrameError, match="connection closed inside"):
            await stream.read_message(LIMITS, 5.0)

    asyncio.run(served(data, reader))


def test_oversized_or_unexpected_frames_are_refused_from_the_prefix():
    huge = struct.pack("<4sBBHIQ", b"BZPS", 1, 4, 0, 2, 2 ** 40) + b"{}"

    async def reader(stream):
        with pytest.raises(FrameError, match="expected exactly"):
            await stream.read_message(LIMITS, 5.0)

    asyncio.run(served(huge, reader, close=False))


def test_trickled_frame_times_out_and_the_stream_is_then_unusable():
    data = raw(Gradient(0, 0, torch.ones(D)))[:60]

    async def reader(stream):
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await stream.read_message(LIMITS, 0.5)
        with pytest.raises(FrameError, match="out of step"):
            await stream.read_message(LIMITS, 0.5)

    asyncio.run(served(data, reader, close=False, trickle=0.02))


@pytest.mark.parametrize("tls", [False, True])
def test_large_messages_are_written_and_read_between_two_streams(tmp_path, tls):
    big = 3_000_000                       # 12 MB: many write chunks, flow control engaged
    limits = Limits(big, frozenset({MsgType.UPDATE}))
    payload = torch.randn(big)
    server_ctx = client_ctx = None
    if tls:
        if shutil.which("openssl") is None:
            pytest.skip("openssl is needed to make test certificates")
        subprocess.run(["bash", str(ROOT / "scripts" / "make_test_certs.sh"), str(tmp_path)],
                       check=True, capture_output=True)
        server_ctx = server_ssl_context(str(tmp_path / "server.pem"),
                                        str(tmp_path / "server.key"))
        client_ctx = client_ssl_context(str(tmp_path / "ca.pem"))

    async def main():
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future = loop.create_future()
        server = await loop.create_server(lambda: FrameStream(accepted.set_result),
                                          "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        _, client = await loop.create_connection(
            FrameStream, "127.0.0.1", port, ssl=client_ctx,
            server_hostname="127.0.0.1" if tls else None)
        srv = await accepted
        writes = asyncio.gather(*(srv.write_message(Update(r, payload), 10.0)
                                  for r in range(3)))
        got = [await client.read_message(limits, 10.0) for _ in range(3)]
        await writes
        client.close()
        srv.close()
        server.close()
        return got

    got = asyncio.run(main())
    assert [m.round for m in got] == [0, 1, 2]
    assert all(torch.equal(m.tensor, payload) for m in got)
