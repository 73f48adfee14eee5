"""Sign flip: send s times the worker's own honest gradient (s = -1 is the plain sign flip).

Source: the sign-flipping attack as evaluated by e.g. Allen-Zhu et al. 2021 and Karimireddy
et al. 2021; the seed config calls s ``attack_scale``.
"""

from __future__ import annotations

import math

import torch

from byzps.attacks.base import Attack, AttackContext


class SignFlip(Attack):
    """Send ``scale * g`` where g is the honest gradient of this worker.

    Args:
        scale: finite factor s (``attack_scale`` in the config); -1.0 flips the sign.

    Raises:
        ValueError: a non-finite scale.
    """

    name = "sign_flip"

    def __init__(self, scale: float = -1.0):
        if not math.isfinite(scale):
            raise ValueError(f"sign_flip scale must be finite, got {scale}")
        self.scale = float(scale)

    def __call__(self, ctx: AttackContext) -> torch.Tensor:
        """``(d,)`` float32: ``scale * ctx.honest_gradient``."""
        return ctx.honest_gradient * self.scale
