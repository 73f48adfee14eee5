"""The constant-vector faults: ``nan``, ``inf`` and ``zero``.

Definitions (d = the model size, taken from ``honest_gradient``):
- ``nan``: ``g_sent = full((d,), NaN)``, a crashed or buggy worker (a diverged model, a 0/0);
- ``inf``: ``g_sent = full((d,), +Inf)``, an overflowed worker;
- ``zero``: ``g_sent = full((d,), 0.0)``, a free rider: a valid but useless gradient (against
  the mean it only shrinks the step).
The PS must exclude the first two as non-finite; the third reaches the aggregator.
Parameters: none. Needs: ``honest_gradient``, only for d. Shapes: ``(d,)`` float32 out.
Errors: ValueError when ``honest_gradient`` is missing from the context.
Source: standard fault-injection baselines (crash/arbitrary faults as in Xie et al. 2018,
"Generalized Byzantine-tolerant SGD").
"""

from __future__ import annotations

import torch

from byzps.attacks.base import Attack, AttackContext


class ConstantAttack(Attack):
    """Send a ``(d,)`` float32 vector with ``value`` in every coordinate. No parameters.

    Raises ValueError (from ``__call__``) when ``honest_gradient`` is missing.
    """

    value = 0.0
    needs = frozenset({"honest_gradient"})

    def __init__(self) -> None:
        """No parameters."""

    def __call__(self, ctx: AttackContext) -> torch.Tensor:
        """``(d,)`` float32 filled with ``value``."""
        self.require(ctx)
        return torch.full((ctx.d,), self.value, dtype=torch.float32)


class Nan(ConstantAttack):
    """Send a ``(d,)`` float32 vector of NaN. No parameters."""

    name = "nan"
    value = float("nan")


class Inf(ConstantAttack):
    """Send a ``(d,)`` float32 vector of +Inf. No parameters."""

    name = "inf"
    value = float("inf")


class Zero(ConstantAttack):
    """Send a ``(d,)`` float32 vector of 0.0. No parameters."""

    name = "zero"
    value = 0.0
