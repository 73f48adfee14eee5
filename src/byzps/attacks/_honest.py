"""Shared parameters of the attacks that work on the honest vectors of a round.

Min-Max, Min-Sum, Fang and the optimised ALIE/IPM are defined in their papers on the honest
workers' vectors. Each takes the same three parameters for where those vectors come from:

* ``omniscient`` (bool, default false): the true vectors of the round (simulation only, see
  :mod:`byzps.attacks.base`);
* otherwise ``estimate_batches`` stand-in vectors from the worker's own shard
  (:func:`byzps.attacks._estimate.honest_rows`); None means n - f of them, as many as there are
  honest workers when f Byzantine workers attack;
* ``collude_seed``: shared sampling seed of colluding workers (None: the worker's own seed).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from byzps.attacks import _estimate
from byzps.attacks.base import Attack, AttackContext, estimate_batches_param, flag, optional_seed

#: the context fields a non-omniscient attack reads to build its stand-in vectors
SHARD_FIELDS = frozenset({"honest_gradient", "batch", "gradient", "sample_batch"})


class HonestVectorsAttack(Attack):
    """Base of attacks on the honest vectors of a round (see the module docstring).

    Args:
        estimate_batches: stand-in vectors when not omniscient (int ``min_rows``..64), or None
            for n - f.
        collude_seed: shared sampling seed, or None.
        omniscient: use the true honest vectors of the round (simulation only).
        min_rows: the fewest honest vectors the attack needs (a class constant of each
            attack, e.g. 2 for a standard deviation).
        extra_needs: further context fields the attack reads (e.g. ``aggregate``).

    Raises:
        ValueError: bad parameters.
    """

    min_rows: int = 1

    def __init__(self, estimate_batches: Any, collude_seed: Any, omniscient: Any,
                 extra_needs: frozenset[str] = frozenset()):
        self.estimate_batches: Optional[int] = (
            None if estimate_batches is None
            else estimate_batches_param(estimate_batches, max(self.min_rows, 1)))
        self.collude_seed = optional_seed("collude_seed", collude_seed)
        self.is_omniscient = flag("omniscient", omniscient)
        if self.is_omniscient:
            needs = frozenset({"honest_gradients"})
        else:
            needs = SHARD_FIELDS | ({"n", "f"} if self.estimate_batches is None else set())
        self.needs = needs | extra_needs

    def check(self, n: int, f: int) -> None:
        """Raises ValueError when the n - f stand-in vectors (``estimate_batches`` None) are
        fewer than the attack needs."""
        if not self.is_omniscient and self.estimate_batches is None and n - f < self.min_rows:
            raise ValueError(f"{self.name} estimates the honest vectors from n - f = {n - f} "
                             f"minibatches of its own shard and needs at least "
                             f"{self.min_rows}; set estimate_batches")

    def honest(self, ctx: AttackContext) -> torch.Tensor:
        """``(h, d)`` float32: the true honest vectors of the round (omniscient) or the
        stand-ins from the worker's own shard.

        Raises:
            ValueError: a needed field is missing or there are too few vectors.
        """
        self.require(ctx)
        k = self.estimate_batches
        if k is None and not self.is_omniscient:
            n, f = ctx.n_and_f()
            k = n - f
        return _estimate.honest_rows(ctx, self.is_omniscient, k or 0, self.collude_seed,
                                     self.name, self.min_rows)

    def byzantine_count(self, ctx: AttackContext, h: int) -> int:
        """How many Byzantine vectors join the h honest ones in the round: n - h when the
        honest vectors are the true ones (every worker answers in simulation), else f."""
        if self.is_omniscient and ctx.n is not None:
            return max(ctx.n - h, 1)
        return max(ctx.f if ctx.f is not None else 1, 1)
