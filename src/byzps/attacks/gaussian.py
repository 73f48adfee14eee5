"""Gaussian: send a random vector with i.i.d. N(mu, sigma^2) coordinates, fresh each round.

Definition: ``g_sent[j] = mu + sigma * xi_j`` with xi ~ N(0, I_d) drawn from a generator seeded
by ``(seed, round)``, where seed is ``collude_seed`` if given, else the worker's own seed. So the
vector is reproducible per (seed, round); workers sharing a ``collude_seed`` send the identical
vector each round (their only form of collusion: no messages are exchanged).
Parameters: ``mu`` (finite float, default 0.0), ``sigma`` (finite float >= 0, default 200.0),
``collude_seed`` (int >= 0 or None).
Needs: ``honest_gradient``, only for d (its values are not used).
Shapes: ``(d,)`` float32 out.
Errors: ValueError for a non-finite mu or sigma, a negative sigma, or a bad collude_seed.
Source: the Gaussian Byzantine worker of Blanchard et al. 2017 ("Machine learning with
adversaries: Byzantine tolerant gradient descent", NeurIPS) and Xie et al. 2018 ("Generalized
Byzantine-tolerant SGD"); sigma = 200 follows Blanchard et al.'s experiments.
"""

from __future__ import annotations

from typing import Optional

import torch

from byzps.attacks.base import Attack, AttackContext, finite_float, optional_seed, round_generator


class Gaussian(Attack):
    """Send ``mu + sigma * N(0, I_d)``, seeded per (seed, round).

    Args:
        mu: mean of every coordinate.
        sigma: standard deviation of every coordinate (>= 0).
        collude_seed: shared seed of colluding workers; None = this worker's own seed.

    Raises:
        ValueError: bad parameters.
    """

    name = "gaussian"
    needs = frozenset({"honest_gradient"})

    def __init__(self, mu: float = 0.0, sigma: float = 200.0,
                 collude_seed: Optional[int] = None):
        self.mu = finite_float("mu", mu)
        self.sigma = finite_float("sigma", sigma)
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.collude_seed = optional_seed("collude_seed", collude_seed)

    def __call__(self, ctx: AttackContext) -> torch.Tensor:
        """``(d,)`` float32 noise for round ``ctx.round``."""
        self.require(ctx)
        seed = ctx.seed if self.collude_seed is None else self.collude_seed
        gen = round_generator(seed, ctx.round, self.name)
        xi = torch.randn(ctx.d, generator=gen, dtype=torch.float32)
        return xi * self.sigma + self.mu
