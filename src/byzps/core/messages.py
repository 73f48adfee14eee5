"""The messages of the protocol as plain values: who sends what, in which round, with which
tensor. The byte codec (frames, header schemas, limits) is :mod:`byzps.net.wire`; the round
state machines (:mod:`byzps.core.rounds`) and the in-process simulator use these classes
without ever encoding them.

Tensors: ``d`` is the model's parameter count; every tensor is float32 and contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass(frozen=True)
class Hello:
    """Worker -> PS, first frame of a connection; ``nonce`` (64 hex chars) when authenticating;
    ``model``: the worker replica's :meth:`byzps.replica.Replica.signature`, which the PS
    compares with its own."""
    worker_id: int
    nonce: Optional[str] = None
    model: Optional[str] = None


@dataclass(frozen=True)
class Challenge:
    """PS -> worker: the server nonce (64 hex chars) to answer with :class:`Auth`."""
    nonce: str


@dataclass(frozen=True)
class Auth:
    """Worker -> PS: the response tag (64 hex chars), see :func:`byzps.net.auth.auth_tag`."""
    tag: str


@dataclass(frozen=True)
class State:
    """PS -> worker: ``tensor`` is ``(1 + k, d)`` float32 = [theta, the optimizer's k state rows]
    before ``round`` (SGD: k = 1, the momentum buffer; Adam: k = 2, the moments); the
    optimizer's step count is ``round``."""
    round: int
    tensor: torch.Tensor


@dataclass(frozen=True)
class RoundStart:
    """PS -> worker: compute a gradient for ``round``; ``digest`` is the PS replica's digest."""
    round: int
    digest: str


@dataclass(frozen=True)
class Gradient:
    """Worker -> PS: ``tensor`` ``(d,)`` float32 for ``round``; ``loss`` as reported (untrusted)."""
    round: int
    worker_id: int
    tensor: torch.Tensor
    loss: Optional[float] = None


@dataclass(frozen=True)
class Update:
    """PS -> worker: the aggregate ``(d,)`` float32 of ``round``; every replica applies it."""
    round: int
    tensor: torch.Tensor


@dataclass(frozen=True)
class Stop:
    """PS -> worker: training ended; ``ok`` False means the PS aborted."""
    reason: str
    ok: bool = True


@dataclass(frozen=True)
class Resync:
    """Worker -> PS: my digest differs in ``round``; please send STATE."""
    round: int


@dataclass(frozen=True)
class Refuse:
    """PS -> peer: the connection is refused for ``reason`` and will be closed; ``retry``: the
    cause may pass (e.g. the PS still holds this id's previous connection)."""
    reason: str
    retry: bool = False


Message = Union[Hello, Challenge, Auth, State, RoundStart, Gradient, Update, Stop, Resync,
                Refuse]
