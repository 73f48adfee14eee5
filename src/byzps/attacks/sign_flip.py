"""Sign flip: send s times the worker's own honest vector (s = -1 is the plain sign flip).

Definition: ``g_sent = scale * ctx.honest_gradient``.
Parameters: ``scale`` (finite float, default -1.0; ``attack_scale`` in the config).
Needs: ``honest_gradient`` (with worker momentum: the worker's own momentum vector).
Shapes: ``(d,)`` float32 in, ``(d,)`` float32 out.
Errors: ValueError for a non-finite or non-numeric scale.
Source: the sign-flipping attack as evaluated by e.g. Allen-Zhu et al. 2021 ("Byzantine-resilient
non-convex stochastic gradient descent") and Karimireddy et al. 2021 ("Learning from history for
Byzantine robust optimization"); the seed config calls s ``attack_scale``.
"""

from __future__ import annotations

import torch

from byzps.attacks.base import Attack, AttackContext, finite_float


class SignFlip(Attack):
    """Send ``scale * g`` where g is the honest vector of this worker.

    Args:
        scale: finite factor s; -1.0 flips the sign.

    Raises:
        ValueError: a non-finite or non-numeric scale.
    """

    name = "sign_flip"
    needs = frozenset({"honest_gradient"})

    def __init__(self, scale: float = -1.0):
        self.scale = finite_float("scale", scale)

    def __call__(self, ctx: AttackContext) -> torch.Tensor:
        """``(d,)`` float32: ``scale * ctx.honest_gradient``."""
        self.require(ctx)
        return ctx.honest_gradient * self.scale
