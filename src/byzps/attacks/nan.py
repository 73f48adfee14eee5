"""``nan``: send NaN in every coordinate.

Definition: ``g_sent = full((d,), NaN)``; models a crashed or buggy worker (e.g. a diverged model
or a 0/0); the PS must exclude it as non-finite.
Parameters: none.
Needs: ``honest_gradient``, only for d.
Shapes: ``(d,)`` float32 out.
Errors: ValueError when ``honest_gradient`` is missing from the context.
Source: a standard fault-injection baseline (crash/arbitrary faults as in Xie et al. 2018,
"Generalized Byzantine-tolerant SGD").
"""

from __future__ import annotations

from byzps.attacks._constant import ConstantAttack


class Nan(ConstantAttack):
    """Send a ``(d,)`` float32 vector of NaN. No parameters."""

    name = "nan"
    value = float("nan")
