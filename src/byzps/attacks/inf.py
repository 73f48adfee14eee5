"""``inf``: send +Inf in every coordinate.

Definition: ``g_sent = full((d,), +Inf)``; models an overflowed worker; the PS must exclude it as
non-finite.
Parameters: none.
Needs: ``honest_gradient``, only for d.
Shapes: ``(d,)`` float32 out.
Errors: ValueError when ``honest_gradient`` is missing from the context.
Source: a standard fault-injection baseline (crash/arbitrary faults as in Xie et al. 2018,
"Generalized Byzantine-tolerant SGD").
"""

from __future__ import annotations

from byzps.attacks._constant import ConstantAttack


class Inf(ConstantAttack):
    """Send a ``(d,)`` float32 vector of +Inf. No parameters."""

    name = "inf"
    value = float("inf")
