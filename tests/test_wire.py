"""Wire format: round trips, exact byte layout, and refusal of every kind of bad frame."""

from __future__ import annotations

import json
import pickle
import re
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from byzps.net import wire
from byzps.net.wire import (
    FrameError,
    Gradient,
    Hello,
    Limits,
    MsgType,
    Refuse,
    Resync,
    RoundStart,
    State,
    Stop,
    Update,
    decode_frame,
    encode,
)

D = 5
ALL = Limits(D, frozenset(MsgType))


def frame(msg) -> bytes:
    return b"".join(bytes(b) for b in encode(msg))


def raw_frame(mtype: int, header: dict | bytes, payload: bytes = b"", magic=b"BZPS",
              version=1, reserved=0, plen=None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<4sBBHIQ", magic, version, mtype, reserved, len(h),
                       len(payload) if plen is None else plen) + h + payload


def test_prefix_layout_is_little_endian_and_exact():
    g = torch.arange(D, dtype=torch.float32)
    data = frame(Gradient(7, 2, g, 0.5))
    magic, ver, mtype, res, hlen, plen = struct.unpack("<4sBBHIQ", data[:20])
    assert (magic, ver, mtype, res, plen) == (b"BZPS", 1, 4, 0, 20)
    assert json.loads(data[20:20 + hlen]) == {"round": 7, "worker_id": 2, "loss": 0.5,
                                              "dtype": "float32", "shape": [5]}
    assert data[20 + hlen:] == struct.pack("<5f", 0, 1, 2, 3, 4)


@pytest.mark.parametrize("msg", [
    Hello(3), RoundStart(4, "0" * 32), Stop("done", True), Stop("abort", False), Resync(9),
    Refuse("unknown worker id 9"),
])
def test_control_round_trip(msg):
    assert decode_frame(frame(msg), ALL) == msg


def test_tensor_round_trips():
    g = torch.tensor([1.5, -2.0, 0.0, 3.25, 1e30])
    out = decode_frame(frame(Gradient(1, 0, g, None)), ALL)
    assert out.round == 1 and out.worker_id == 0 and out.loss is None
    assert torch.equal(out.tensor, g)
    s = torch.arange(2 * D, dtype=torch.float32).view(2, D)
    st_ = decode_frame(frame(State(3, s)), ALL)
    assert st_.round == 3 and torch.equal(st_.tensor, s)
    up = decode_frame(frame(Update(2, g)), ALL)
    assert torch.equal(up.tensor, g)


def test_non_finite_loss_is_sent_as_null():
    out = decode_frame(frame(Gradient(1, 0, torch.zeros(D), float("nan"))), ALL)
    assert out.loss is None


def test_nan_gradient_passes_the_wire_for_the_round_logic_to_exclude():
    g = torch.tensor([float("nan"), 0, 0, float("inf"), 0])
    out = decode_frame(frame(Gradient(1, 0, g)), ALL)
    assert torch.isnan(out.tensor[0]) and torch.isinf(out.tensor[3])


GOOD_GRAD = {"round": 1, "worker_id": 0, "loss": None, "dtype": "float32", "shape": [D]}


@pytest.mark.parametrize("data, match", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad magic"),
    (raw_frame(4, GOOD_GRAD, bytes(20), magic=b"XXXX"), "bad magic"),
    (raw_frame(4, GOOD_GRAD, bytes(20), version=2), "protocol version 2"),
    (raw_frame(99, GOOD_GRAD, bytes(20)), "unknown message type 99"),
    (raw_frame(4, GOOD_GRAD, bytes(20), reserved=1), "frame flags 0x1; expected 0x0"),
    (raw_frame(4, GOOD_GRAD, bytes(20), plen=2 ** 40), "expected exactly 20"),
    (raw_frame(4, GOOD_GRAD, bytes(16)), "expected exactly 20"),
    (raw_frame(4, GOOD_GRAD, bytes(20))[:-3], "cut short"),
    (raw_frame(4, GOOD_GRAD, bytes(20)) + b"x", "bytes after the frame"),
    (raw_frame(4, b"\xff\xfe", bytes(20)), "not UTF-8 JSON"),
    (raw_frame(4, b"[1, 2]", bytes(20)), "header field header"),
    (raw_frame(4, {**GOOD_GRAD, "dtype": "float64"}, bytes(20)), "dtype 'float64'"),
    (raw_frame(4, {**GOOD_GRAD, "shape": [4]}, bytes(20)), "shape [4]"),
    (raw_frame(4, {**GOOD_GRAD, "shape": [1, 5]}, bytes(20)), "shape [1, 5]"),
    (raw_frame(4, {**GOOD_GRAD, "round": -1}, bytes(20)), "field round"),
    (raw_frame(4, {**GOOD_GRAD, "round": True}, bytes(20)), "field round"),
    (raw_frame(4, {**GOOD_GRAD, "round": "1"}, bytes(20)), "field round"),
    (raw_frame(4, {**GOOD_GRAD, "extra": 1}, bytes(20)), "field extra"),
    (raw_frame(4, {k: v for k, v in GOOD_GRAD.items() if k != "worker_id"}, bytes(20)),
     "field worker_id"),
    (raw_frame(1, {"worker_id": 1}, b"", plen=0)[:12], "prefix must be 20 bytes"),
    (raw_frame(3, {"round": 1, "digest": "zz"}), "field digest"),
    (raw_frame(1, b" " * 5000), "header length 5000"),
    (raw_frame(6, {"reason": "x" * 1001, "ok": True}), "field reason"),
])
def test_bad_frames_are_refused(data, match):
    with pytest.raises(FrameError, match=re.escape(match)):
        decode_frame(data, ALL)


def test_pickle_payload_is_refused():
    evil = pickle.dumps({"worker_id": 1})
    with pytest.raises(FrameError):
        decode_frame(evil, ALL)
    with pytest.raises(FrameError):
        decode_frame(raw_frame(1, evil), ALL)


def test_type_not_allowed_in_this_state_is_refused_before_the_body():
    only_hello = Limits(D, frozenset({MsgType.HELLO}))
    with pytest.raises(FrameError, match="GRADIENT not accepted here"):
        wire.parse_prefix(frame(Gradient(1, 0, torch.zeros(D)))[:20], only_hello)


def test_encode_refuses_non_float32():
    with pytest.raises(ValueError, match="float32"):
        encode(Update(1, torch.zeros(D, dtype=torch.float64)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_only_raise_frame_error(data):
    try:
        decode_frame(data, ALL)
    except FrameError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 200), st.binary(min_size=1, max_size=8), st.data())
def test_fuzz_mutated_valid_frames_only_raise_frame_error(pos, junk, data):
    msg = data.draw(st.sampled_from([Hello(1), RoundStart(2, "a" * 32),
                                     Gradient(1, 0, torch.ones(D), 0.1)]))
    raw = bytearray(frame(msg))
    pos = pos % len(raw)
    raw[pos:pos + len(junk)] = junk
    try:
        decode_frame(bytes(raw), ALL)
    except FrameError:
        pass


def test_build_message_takes_a_received_tensor_without_copying_it():
    data = frame(Gradient(2, 1, torch.arange(D, dtype=torch.float32), None))
    prefix = wire.parse_prefix(data[:20], ALL)
    header = wire.parse_header(prefix, data[20:20 + prefix.header_len], ALL)
    dest = torch.zeros(D)
    wire.tensor_bytes(dest)[:] = data[20 + prefix.header_len:]
    msg = wire.build_message(prefix, header, dest)
    assert msg.tensor.data_ptr() == dest.data_ptr()
    assert torch.equal(msg.tensor, torch.arange(D, dtype=torch.float32))
    with pytest.raises(FrameError, match="payload tensor"):
        wire.build_message(prefix, header, torch.zeros(D + 1))
    with pytest.raises(ValueError, match="float32"):
        wire.tensor_bytes(torch.zeros(D, dtype=torch.float64))
