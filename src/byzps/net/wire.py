"""The wire format: frames, message types, encode/decode, size limits. Pure: no I/O, no pickle.

Frame layout (all little-endian)::

    offset size field
    0      4    magic b"BZPS"
    4      1    protocol version (1)
    5      1    message type (:class:`MsgType`)
    6      2    flags: bit 0 = a 32-byte MAC trailer follows (authenticated sessions,
                see :mod:`byzps.net.auth`); other bits must be 0
    8      4    header length H (bytes, <= MAX_HEADER_BYTES)
    12     8    payload length P (bytes)
    20     H    header: UTF-8 JSON object, strict schema per message type
    20+H   P    payload: raw little-endian tensor bytes (float32), empty for control messages
    20+H+P 32   MAC trailer, only when flag bit 0 is set

A receiver knows the model size d, so it knows the exact payload size of every message type
before reading the body; :func:`parse_prefix` and :func:`parse_header` refuse anything else,
so a peer cannot make the receiver allocate more than ``2 * d * 4`` bytes for one frame.
"""

from __future__ import annotations

import enum
import json
import struct
import sys
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from byzps.core.messages import (
    Auth,
    Challenge,
    Gradient,
    Hello,
    Message,
    Refuse,
    Resync,
    RoundStart,
    State,
    Stop,
    Update,
)

MAGIC = b"BZPS"
VERSION = 1
PREFIX = struct.Struct("<4sBBHIQ")
PREFIX_BYTES = PREFIX.size  # 20
MAX_HEADER_BYTES = 4096
MAX_REASON_CHARS = 1000
FLAG_MAC = 1
MAC_BYTES = 32


class MsgType(enum.IntEnum):
    """Message type codes carried in byte 5 of the frame."""

    HELLO = 1      # worker -> PS: I am worker `worker_id`
    STATE = 2      # PS -> worker: full replica state (1 + k, d): theta and optimizer rows
    ROUND = 3      # PS -> worker: round r starts; digest of the PS replica before round r
    GRADIENT = 4   # worker -> PS: gradient (d,) for round r
    UPDATE = 5     # PS -> worker: aggregate (d,) of round r
    STOP = 6       # PS -> worker: training is over (or aborted), with a reason
    RESYNC = 7     # worker -> PS: my replica's digest differs; send STATE
    REFUSE = 8     # PS -> peer: connection refused, with a reason, then closed
    CHALLENGE = 9  # PS -> worker: prove you hold your key (server nonce)
    AUTH = 10      # worker -> PS: response tag to the challenge


class FrameError(ValueError):
    """A frame that breaks the format or the limits; the message names what and why."""


# ---------------------------------------------------------------------------------------------
# Header schemas (strict: unknown keys, wrong types, bools for ints are all refused)


class _H(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


_HEX32 = r"^[0-9a-f]{64}$"


#: A model signature (:meth:`byzps.replica.Replica.signature`) as a HELLO may carry it.
MODEL_SIGNATURE_PATTERN = r"^[A-Za-z0-9_=. ]{1,120}$"


class _HelloH(_H):
    worker_id: int = Field(ge=0, lt=2**31)
    nonce: Optional[str] = Field(None, pattern=_HEX32)
    model: Optional[str] = Field(None, pattern=MODEL_SIGNATURE_PATTERN)


class _ChallengeH(_H):
    nonce: str = Field(pattern=_HEX32)


class _AuthH(_H):
    tag: str = Field(pattern=_HEX32)


class _TensorH(_H):
    dtype: str
    shape: list[int]


class _StateH(_TensorH):
    round: int = Field(ge=0, lt=2**40)


class _RoundH(_H):
    round: int = Field(ge=0, lt=2**40)
    digest: str = Field(pattern=r"^[0-9a-f]{32}$")


class _GradientH(_TensorH):
    round: int = Field(ge=0, lt=2**40)
    worker_id: int = Field(ge=0, lt=2**31)
    loss: Optional[float] = None


class _UpdateH(_TensorH):
    round: int = Field(ge=0, lt=2**40)


class _StopH(_H):
    reason: str = Field(max_length=MAX_REASON_CHARS)
    ok: bool


class _ResyncH(_H):
    round: int = Field(ge=0, lt=2**40)


class _RefuseH(_H):
    reason: str = Field(max_length=MAX_REASON_CHARS)
    retry: bool


_SCHEMAS: dict[MsgType, type[_H]] = {
    MsgType.HELLO: _HelloH, MsgType.STATE: _StateH, MsgType.ROUND: _RoundH,
    MsgType.GRADIENT: _GradientH, MsgType.UPDATE: _UpdateH, MsgType.STOP: _StopH,
    MsgType.RESYNC: _ResyncH, MsgType.REFUSE: _RefuseH, MsgType.CHALLENGE: _ChallengeH,
    MsgType.AUTH: _AuthH,
}

#: Tensor shape of each tensor-carrying type, as a function of the receiver's limits.
_TENSOR_SHAPES = {
    MsgType.STATE: lambda lim: [lim.state_rows, lim.d],
    MsgType.GRADIENT: lambda lim: [lim.d],
    MsgType.UPDATE: lambda lim: [lim.d],
}


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts.

    Args:
        d: model size; fixes every tensor's shape and so every payload size.
        allowed: message types this receiver accepts in this state; others are refused
            before the body is read.
        mac: whether frames must carry a MAC trailer (authenticated session) or must not.
        state_rows: rows of a STATE tensor, 1 + the optimizer's state rows
            (:attr:`byzps.replica.Replica.state_rows`: 2 for SGD, 3 for Adam/AdamW).
    """

    d: int
    allowed: frozenset[MsgType]
    mac: bool = False
    state_rows: int = 2

    def payload_bytes(self, mtype: MsgType) -> int:
        """Exact payload size in bytes of ``mtype`` (0 for control messages)."""
        shape = _TENSOR_SHAPES.get(mtype)
        return 0 if shape is None else int(np.prod(shape(self))) * 4


@dataclass(frozen=True)
class Prefix:
    """The fixed 20-byte frame prefix, validated; ``mac``: a MAC trailer follows the payload."""
    mtype: MsgType
    header_len: int
    payload_len: int
    mac: bool = False


def parse_prefix(raw: bytes, limits: Limits) -> Prefix:
    """Validate the 20-byte prefix before any further byte is read.

    Raises:
        FrameError: short prefix, bad magic or version, unknown or unexpected type, flags
            other than what the session requires, header over ``MAX_HEADER_BYTES``, or a
            payload length other than the exact size for this type and d.
    """
    if len(raw) != PREFIX_BYTES:
        raise FrameError(f"frame prefix must be {PREFIX_BYTES} bytes, got {len(raw)}")
    magic, version, code, flags, hlen, plen = PREFIX.unpack(raw)
    if magic != MAGIC:
        hint = (" (this looks like a TLS handshake: is server.tls set on one side only?)"
                if magic[:2] == b"\x16\x03" else "")
        raise FrameError(f"bad magic {magic!r}: not a byzps peer (expected {MAGIC!r}){hint}")
    if version != VERSION:
        raise FrameError(f"protocol version {version} unsupported (expected {VERSION})")
    try:
        mtype = MsgType(code)
    except ValueError:
        raise FrameError(f"unknown message type {code}") from None
    if mtype not in limits.allowed:
        allowed = ", ".join(t.name for t in sorted(limits.allowed))
        raise FrameError(f"message type {mtype.name} not accepted here (expected {allowed})")
    # REFUSE is sent before a session exists (or instead of one), so it never carries a MAC
    want_flags = FLAG_MAC if limits.mac and mtype is not MsgType.REFUSE else 0
    if flags != want_flags:
        raise FrameError(f"frame flags {flags:#x}; expected {want_flags:#x} ("
                         + ("this server requires authenticated frames)" if limits.mac else
                            "no MAC expected on this connection)"))
    if not 2 <= hlen <= MAX_HEADER_BYTES:
        raise FrameError(f"header length {hlen} outside 2..{MAX_HEADER_BYTES} bytes")
    want = limits.payload_bytes(mtype)
    if plen != want:
        raise FrameError(f"{mtype.name} payload of {plen} bytes; expected exactly {want} "
                         f"(d = {limits.d})")
    return Prefix(mtype, hlen, plen, bool(flags & FLAG_MAC))


def parse_header(prefix: Prefix, raw: bytes, limits: Limits) -> dict[str, Any]:
    """Decode and validate the JSON header of a frame whose prefix passed :func:`parse_prefix`.

    Returns:
        the header fields as a dict.

    Raises:
        FrameError: not UTF-8 JSON, schema violation, or tensor dtype/shape other than
            float32 and the model's shape.
    """
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FrameError(f"{prefix.mtype.name} header is not UTF-8 JSON: {e}") from None
    try:
        header = _SCHEMAS[prefix.mtype].model_validate(obj).model_dump()
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "header"
        raise FrameError(f"{prefix.mtype.name} header field {loc}: {err['msg']}") from None
    shape_of = _TENSOR_SHAPES.get(prefix.mtype)
    if shape_of is not None:
        if header["dtype"] != "float32":
            raise FrameError(f"{prefix.mtype.name} dtype {header['dtype']!r}; expected 'float32'")
        if header["shape"] != shape_of(limits):
            raise FrameError(f"{prefix.mtype.name} shape {header['shape']}; expected "
                             f"{shape_of(limits)}")
    return header


def _tensor(t: Optional[torch.Tensor]) -> torch.Tensor:
    if t is None:
        raise FrameError("a tensor-carrying frame without its tensor")
    return t


def build_message(prefix: Prefix, header: dict[str, Any],
                  payload: Union[bytes, bytearray, memoryview, torch.Tensor]) -> Message:
    """Assemble the message object from a validated prefix, header and payload.

    The payload is either the raw little-endian bytes (a writable ``bytearray`` or memoryview
    of one is wrapped without a copy; read-only bytes are copied), or a float32 tensor that
    already holds the values (what :class:`byzps.net.transport.FrameStream` received straight into
    the caller's buffer); that tensor becomes the message's tensor, viewed as the header's
    shape, without a copy.

    Raises:
        FrameError: payload length (bytes, or 4 * numel for a tensor) differs from the prefix.
    """
    t = prefix.mtype
    tensor: Optional[torch.Tensor] = None
    if isinstance(payload, torch.Tensor):
        size = payload.numel() * 4 if payload.dtype == torch.float32 else -1
        if size != prefix.payload_len or (size and not payload.is_contiguous()):
            raise FrameError(f"payload tensor of {payload.numel()} {payload.dtype} values for a "
                             f"{prefix.payload_len}-byte payload")
        tensor = payload.view(header["shape"]) if t in _TENSOR_SHAPES else None
    else:
        if len(payload) != prefix.payload_len:
            raise FrameError(f"payload cut short: {len(payload)} of {prefix.payload_len} bytes")
        if t in _TENSOR_SHAPES:
            arr = np.frombuffer(payload, dtype="<f4")
            if not arr.flags.writeable:
                arr = arr.copy()
            tensor = torch.from_numpy(arr.astype(np.float32, copy=False)).view(header["shape"])
    if t is MsgType.HELLO:
        return Hello(header["worker_id"], header["nonce"], header["model"])
    if t is MsgType.CHALLENGE:
        return Challenge(header["nonce"])
    if t is MsgType.AUTH:
        return Auth(header["tag"])
    if t in _TENSOR_SHAPES and tensor is None:   # cannot happen: the branches above set it
        raise FrameError(f"a {t.name} frame without its tensor")
    if t is MsgType.STATE:
        return State(header["round"], _tensor(tensor))
    if t is MsgType.ROUND:
        return RoundStart(header["round"], header["digest"])
    if t is MsgType.GRADIENT:
        return Gradient(header["round"], header["worker_id"], _tensor(tensor), header["loss"])
    if t is MsgType.UPDATE:
        return Update(header["round"], _tensor(tensor))
    if t is MsgType.STOP:
        return Stop(header["reason"], header["ok"])
    if t is MsgType.RESYNC:
        return Resync(header["round"])
    return Refuse(header["reason"], header["retry"])


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view (``4 * numel`` bytes) of a contiguous float32 CPU tensor's storage:
    where a receiver reads a payload straight into the tensor (no copy).

    Raises:
        ValueError: not float32, not contiguous, or not on the CPU.
    """
    if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"a receive buffer must be a contiguous float32 CPU tensor, got "
                         f"{t.dtype} on {t.device}, contiguous={t.is_contiguous()}")
    return t.detach().numpy().data.cast("B")


def decode_frame(data: bytes, limits: Limits, session=None) -> Message:
    """Decode one complete frame from ``data`` (exactly one frame, nothing more).

    Args:
        data: the frame's bytes.
        limits: what is accepted.
        session: a :class:`byzps.net.auth.MacSession` that checks the MAC trailer (when
            ``limits.mac``).

    Raises:
        FrameError: anything wrong, including trailing bytes or a frame cut short.
        byzps.net.auth.AuthError: a MAC that does not verify.
    """
    prefix = parse_prefix(bytes(data[:PREFIX_BYTES]), limits)
    end = PREFIX_BYTES + prefix.header_len
    if len(data) < end:
        raise FrameError(f"header cut short: {len(data) - PREFIX_BYTES} of {prefix.header_len} "
                         f"bytes")
    header = parse_header(prefix, bytes(data[PREFIX_BYTES:end]), limits)
    trailer = MAC_BYTES if prefix.mac else 0
    payload = data[end:len(data) - trailer] if trailer else data[end:]
    if len(payload) > prefix.payload_len:
        raise FrameError(f"{len(payload) - prefix.payload_len} bytes after the frame")
    msg = build_message(prefix, header, payload)
    if prefix.mac:
        if session is None:
            raise FrameError("a MAC'd frame but no session to check it")
        session.verify([data[:end], payload], data[len(data) - trailer:])
    return msg


# ---------------------------------------------------------------------------------------------
# Encoding


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    arr = t.detach().contiguous().cpu().numpy()
    if arr.dtype != np.float32:
        raise ValueError(f"tensors go on the wire as float32, got {arr.dtype}")
    if sys.byteorder != "little":
        arr = arr.astype("<f4")
    return arr.data.cast("B")


def encode(msg: Message, mac: bool = False) -> list[Union[bytes, memoryview]]:
    """Encode a message as a list of buffers to write in order (the tensor is not copied).

    With ``mac`` the MAC flag is set; the sender then appends
    ``session.seal(buffers)`` (32 bytes) after the returned buffers.

    Raises:
        ValueError: a tensor that is not float32, or a reason longer than 1000 characters.
    """
    payload: Union[bytes, memoryview] = b""
    header: dict[str, Any]
    if isinstance(msg, Hello):
        mtype, header = MsgType.HELLO, {"worker_id": msg.worker_id, "nonce": msg.nonce}
        if msg.model is not None:
            header["model"] = msg.model
    elif isinstance(msg, Challenge):
        mtype, header = MsgType.CHALLENGE, {"nonce": msg.nonce}
    elif isinstance(msg, Auth):
        mtype, header = MsgType.AUTH, {"tag": msg.tag}
    elif isinstance(msg, State):
        mtype, header = MsgType.STATE, {"round": msg.round}
    elif isinstance(msg, RoundStart):
        mtype, header = MsgType.ROUND, {"round": msg.round, "digest": msg.digest}
    elif isinstance(msg, Gradient):
        mtype, header = MsgType.GRADIENT, {"round": msg.round, "worker_id": msg.worker_id,
                                           "loss": msg.loss}
    elif isinstance(msg, Update):
        mtype, header = MsgType.UPDATE, {"round": msg.round}
    elif isinstance(msg, Stop):
        mtype, header = MsgType.STOP, {"reason": msg.reason[:MAX_REASON_CHARS], "ok": msg.ok}
    elif isinstance(msg, Resync):
        mtype, header = MsgType.RESYNC, {"round": msg.round}
    elif isinstance(msg, Refuse):
        mtype, header = MsgType.REFUSE, {"reason": msg.reason[:MAX_REASON_CHARS],
                                         "retry": msg.retry}
    else:
        raise TypeError(f"not a byzps message: {type(msg).__name__}")
    tensor = getattr(msg, "tensor", None)
    if tensor is not None:
        header["dtype"] = "float32"
        header["shape"] = list(tensor.shape)
        payload = _tensor_bytes(tensor)
    if isinstance(msg, Gradient) and msg.loss is not None and not np.isfinite(msg.loss):
        header["loss"] = None
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    prefix = PREFIX.pack(MAGIC, VERSION, int(mtype), FLAG_MAC if mac else 0, len(hbytes),
                         len(payload))
    return [prefix + hbytes, payload] if len(payload) else [prefix + hbytes]
