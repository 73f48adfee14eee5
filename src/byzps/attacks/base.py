"""The attack interface: what a Byzantine worker may see, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttackContext:
    """What a non-omniscient Byzantine worker knows when it answers a round.

    Attributes:
        round: the round number r.
        honest_gradient: ``(d,)`` float32, the gradient an honest worker would send from this
            worker's own shard.
    """

    round: int
    honest_gradient: torch.Tensor


class Attack:
    """Base class of attacks. Subclasses set ``name`` and implement ``__call__``.

    ``__call__(ctx) -> (d,)`` float32: the vector the Byzantine worker sends in round
    ``ctx.round``.
    """

    name = "attack"

    def __call__(self, ctx: AttackContext) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
