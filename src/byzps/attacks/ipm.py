"""IPM, inner product manipulation: send -epsilon times the mean of the honest gradients.

Definition (Xie, Koyejo and Gupta 2020, "Fall of empires: breaking Byzantine-tolerant SGD by
inner product manipulation", UAI): every Byzantine worker sends ``-epsilon * mu`` where mu is
the mean of the honest gradients, so that the aggregate's inner product with the true
gradient becomes negative (small epsilon, e.g. 0.1, against median/Krum; large, e.g. 100,
against the mean).

Non-omniscient variant (this implementation): mu is estimated from ``estimate_batches``
minibatches of the worker's own shard (with worker momentum: the worker's own momentum), see
:mod:`byzps.attacks._estimate`. With ``estimate_batches = 1`` it sends ``-epsilon`` times its own
honest vector. Collusion: a shared ``collude_seed`` makes colluders sample the same positions
within their (different) shards; the same epsilon is shared through the config.

Omniscient variant (``omniscient: true``, simulation only, as in the paper and ByzFL): mu is
the mean of the vectors the honest workers actually send this round.

Parameters: ``epsilon`` (finite float > 0, default 0.1), ``estimate_batches`` (int 1..64,
default 5), ``collude_seed`` (int >= 0 or None), ``omniscient`` (bool, default false).
Needs: ``honest_gradient``, ``batch``, ``gradient``, and ``sample_batch`` unless
``estimate_batches = 1`` (omniscient: ``honest_gradients`` only).
Shapes: ``(d,)`` float32 out.
Errors: ValueError for bad parameters.
"""

from __future__ import annotations

from typing import Optional

import torch

from byzps.attacks import _estimate
from byzps.attacks.base import (
    Attack,
    AttackContext,
    estimate_batches_param,
    finite_float,
    flag,
    optional_seed,
)


class Ipm(Attack):
    """Send ``-epsilon * mu_hat`` (estimated from the worker's own shard).

    Args:
        epsilon: positive factor.
        estimate_batches: minibatches k used for mu_hat (1..64).
        collude_seed: shared sampling seed of colluding workers; None = own seed.
        omniscient: use the honest workers' true vectors of the round (simulation only).

    Raises:
        ValueError: bad parameters.
    """

    name = "ipm"
    needs = frozenset({"honest_gradient", "batch", "gradient", "sample_batch"})

    def __init__(self, epsilon: float = 0.1, estimate_batches: int = 5,
                 collude_seed: Optional[int] = None, omniscient: bool = False):
        self.epsilon = finite_float("epsilon", epsilon)
        if self.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.estimate_batches = estimate_batches_param(estimate_batches, 1)
        self.collude_seed = optional_seed("collude_seed", collude_seed)
        self.is_omniscient = flag("omniscient", omniscient)
        if self.is_omniscient:
            self.needs = frozenset({"honest_gradients"})
        elif self.estimate_batches == 1:
            self.needs = Ipm.needs - {"sample_batch"}

    def __call__(self, ctx: AttackContext) -> torch.Tensor:
        """``(d,)`` float32 ``-epsilon * mu_hat`` (or the true mu)."""
        self.require(ctx)
        if self.is_omniscient:
            return -self.epsilon * _estimate.true_rows(ctx, 1).mean(dim=0)
        grads = _estimate.raw_gradients(ctx, self.estimate_batches, self.collude_seed,
                                        self.name)
        return -self.epsilon * _estimate.centre(ctx, grads)
