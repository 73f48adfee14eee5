"""Authentication and message integrity, without sockets."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from byzps.net import auth
from byzps.net.auth import AuthError, MacSession
from byzps.net.wire import FrameError, Gradient, Limits, MsgType, Update, decode_frame, encode

D = 4
LIMITS = Limits(D, frozenset(MsgType), mac=True)
KEY = bytes(range(32))
CN, SN = b"c" * 32, b"s" * 32


def pair(key=KEY, wid=1, cn=CN, sn=SN):
    return (MacSession(key, wid, cn, sn, is_server=True),
            MacSession(key, wid, cn, sn, is_server=False))


def sealed(msg, session) -> bytes:
    bufs = encode(msg, mac=True)
    return b"".join(bytes(b) for b in bufs) + session.seal(bufs)


def test_challenge_response_accepts_the_key_and_refuses_others():
    tag = auth.auth_tag(KEY, 1, CN, SN)
    auth.check_tag(KEY, 1, CN, SN, tag)
    with pytest.raises(AuthError, match="worker 1: wrong key"):
        auth.check_tag(KEY, 1, CN, SN, auth.auth_tag(bytes(32), 1, CN, SN))
    with pytest.raises(AuthError):   # a tag for another id or another challenge is useless
        auth.check_tag(KEY, 1, CN, SN, auth.auth_tag(KEY, 2, CN, SN))
    with pytest.raises(AuthError):
        auth.check_tag(KEY, 1, CN, b"t" * 32, tag)


def test_mac_round_trip_in_both_directions():
    ps, worker = pair()
    g = Gradient(3, 1, torch.arange(D, dtype=torch.float32))
    out = decode_frame(sealed(g, worker), LIMITS, ps)
    assert out.round == 3 and torch.equal(out.tensor, g.tensor)
    u = Update(3, torch.ones(D))
    assert torch.equal(decode_frame(sealed(u, ps), LIMITS, worker).tensor, u.tensor)


def test_replay_reorder_reflection_tamper_and_other_session_are_refused():
    ps, worker = pair()
    first = sealed(Gradient(0, 1, torch.zeros(D)), worker)
    second = sealed(Gradient(1, 1, torch.ones(D)), worker)
    with pytest.raises(AuthError, match="frame #0"):      # reordered: #1 arrives first
        decode_frame(second, LIMITS, ps)
    decode_frame(first, LIMITS, ps)
    with pytest.raises(AuthError):                       # replayed
        decode_frame(first, LIMITS, ps)
    decode_frame(second, LIMITS, ps)
    # reflected: a frame the PS sent, fed back to the PS
    ps2, worker2 = pair()
    with pytest.raises(AuthError):
        decode_frame(sealed(Update(0, torch.zeros(D)), ps2), LIMITS, ps2)
    # tampered: flip one payload bit (round 0 -> gradient value changed)
    ps3, worker3 = pair()
    raw = bytearray(sealed(Gradient(0, 1, torch.zeros(D)), worker3))
    raw[-33] ^= 0x01
    with pytest.raises(AuthError):
        decode_frame(bytes(raw), LIMITS, ps3)
    # captured in one connection, replayed into another (fresh nonces)
    ps4, _ = pair(sn=b"x" * 32)
    with pytest.raises(AuthError):
        decode_frame(first, LIMITS, ps4)


def test_unmacd_frame_refused_when_session_requires_mac():
    bufs = encode(Gradient(0, 1, torch.zeros(D)))
    with pytest.raises(FrameError, match="requires authenticated frames"):
        decode_frame(b"".join(bytes(b) for b in bufs), LIMITS, pair()[0])


def test_key_files_round_trip_with_owner_only_mode(tmp_path):
    keys = auth.generate_keys([0, 3])
    p = tmp_path / "k" / "ps.secrets.yaml"
    auth.write_keys(p, keys)
    assert auth.load_keys(p) == keys
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert len(keys[0]) == 32 and keys[0] != keys[3]


@pytest.mark.parametrize("text, match", [
    ("[1, 2]", "expected a mapping"),
    ("keys: {x: " + "00" * 32 + "}", "worker id 'x'"),
    ("keys: {1: abc}", "64 hex characters"),
    ("keys: {1: " + "zz" * 32 + "}", "not hex"),
    ("keys: [", "cannot read it"),
])
def test_bad_key_files_name_the_problem(tmp_path, text, match):
    p = tmp_path / "k.yaml"
    p.write_text(text)
    with pytest.raises(AuthError, match=match):
        auth.load_keys(p)


def test_env_overrides_the_config_path(monkeypatch):
    monkeypatch.delenv(auth.ENV_SECRETS, raising=False)
    assert auth.secrets_path("a.yaml") == "a.yaml"
    monkeypatch.setenv(auth.ENV_SECRETS, "b.yaml")
    assert auth.secrets_path("a.yaml") == "b.yaml"
