"""``zero``: send 0.0 in every coordinate.

Definition: ``g_sent = full((d,), 0.0)``; models a free rider: a valid but useless gradient
(against the mean it only shrinks the step).
Parameters: none.
Needs: ``honest_gradient``, only for d.
Shapes: ``(d,)`` float32 out.
Errors: ValueError when ``honest_gradient`` is missing from the context.
Source: a standard fault-injection baseline (crash/arbitrary faults as in Xie et al. 2018,
"Generalized Byzantine-tolerant SGD").
"""

from __future__ import annotations

from byzps.attacks._constant import ConstantAttack


class Zero(ConstantAttack):
    """Send a ``(d,)`` float32 vector of 0.0. No parameters."""

    name = "zero"
    value = 0.0
