"""Shared base of the constant-vector faults (:mod:`nan`, :mod:`inf`, :mod:`zero`)."""

from __future__ import annotations

import torch

from byzps.attacks.base import Attack, AttackContext


class ConstantAttack(Attack):
    """Send a ``(d,)`` float32 vector with ``value`` in every coordinate. No parameters.

    Needs ``honest_gradient`` only for d. Raises ValueError when it is missing.
    """

    value = 0.0
    needs = frozenset({"honest_gradient"})

    def __init__(self) -> None:
        """No parameters."""

    def __call__(self, ctx: AttackContext) -> torch.Tensor:
        """``(d,)`` float32 filled with ``value``."""
        self.require(ctx)
        return torch.full((ctx.d,), self.value, dtype=torch.float32)
