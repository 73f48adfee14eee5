"""Large: send a huge but finite vector, so the PS's NaN/Inf check lets it through.

Definition (d = the model size, g = ``ctx.honest_gradient``):
- default: ``g_sent = full((d,), value)``, the same huge value in every coordinate;
- ``along_gradient: true``: ``g_sent = value * g / max_j |g_j|``, the worker's own gradient
  direction stretched until its largest coordinate has magnitude |value| (a negative value
  points against the gradient); a zero gradient has no direction, and the constant vector is
  sent instead.
Colluding workers with the same parameters send the identical vector in the default form: m
identical far rows, the input that broke distance-based rules whose arithmetic lost the small
distances next to the huge ones (issue 10). A robust rule must keep its output within its
breakdown bound of the honest vectors whatever ``value`` is; the mean is moved by value / n.
Parameters: ``value`` (finite float with |value| <= 3.4028e38, the float32 maximum, so every
coordinate stays finite; default 1e30), ``along_gradient`` (bool, default false).
Needs: ``honest_gradient`` (for d, and for the direction with ``along_gradient``).
Shapes: ``(d,)`` float32 out.
Errors: ValueError for a non-finite or too large value, or a non-bool along_gradient.
Source: the arbitrary-vector Byzantine worker of Blanchard et al. 2017 ("Machine learning
with adversaries: Byzantine tolerant gradient descent", NeurIPS: a single such worker moves
the mean anywhere); the huge constant is the classical way to realise it without NaN/Inf.
"""

from __future__ import annotations

import torch

from byzps.attacks.base import Attack, AttackContext, finite_float, flag

#: the largest finite float32 value: a larger |value| would send +-Inf
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class Large(Attack):
    """Send a constant vector of ``value``, or the own gradient scaled to max |entry| = |value|.

    Args:
        value: the magnitude of the largest coordinate (sign included), finite and at most
            the float32 maximum 3.4028e38 in absolute value.
        along_gradient: point along the worker's own honest vector instead of (1, ..., 1).

    Raises:
        ValueError: a non-finite or too large value, or a non-bool along_gradient.
    """

    name = "large"
    needs = frozenset({"honest_gradient"})

    def __init__(self, value: float = 1e30, along_gradient: bool = False):
        self.value = finite_float("value", value)
        if abs(self.value) > FLOAT32_MAX:
            raise ValueError(f"value must be at most {FLOAT32_MAX:.6g} in absolute value (the "
                             f"float32 maximum; larger would be sent as Inf), got {value!r}")
        self.along_gradient = flag("along_gradient", along_gradient)

    def __call__(self, ctx: AttackContext) -> torch.Tensor:
        """``(d,)`` float32: the constant vector, or the stretched own gradient."""
        self.require(ctx)
        if self.along_gradient:
            g = ctx.honest_gradient.to(torch.float64)
            top = float(g.abs().max()) if g.numel() else 0.0
            if top > 0.0:
                # float64: g / top is in [-1, 1], so the product cannot overflow before the
                # (exact or correctly rounded) conversion to float32
                return (g * (self.value / top)).to(torch.float32)
        return torch.full((ctx.d,), self.value, dtype=torch.float32)
