"""ALIE, "A little is enough": a small, coordinated shift within the honest spread.

Definition (Baruch, Baruch and Goldberg 2019, "A little is enough: circumventing defenses for
distributed learning", NeurIPS): with mu and sigma the coordinate-wise mean and standard
deviation of the honest gradients, send ``mu - z * sigma`` where
``s = floor(n/2 + 1) - f`` (honest workers the attackers must win over for a majority) and
``z = Phi^{-1}((n - s) / n)`` (Phi the standard normal CDF), unless ``z`` is given. Example:
n = 10, f = 3: s = 6 - 3 = 3, z = Phi^{-1}(0.7) = 0.5244.

Non-omniscient variant (this implementation): mu and sigma are estimated from
``estimate_batches`` minibatches of the worker's own shard, see :mod:`byzps.attacks._estimate`
(with worker momentum: centred on the worker's own momentum, sigma scaled by
sqrt((1 - beta) / (1 + beta))). Collusion: every ALIE worker of a config uses the same z; with a
shared ``collude_seed`` they also sample the same positions within their (different) shards.

Omniscient variant (``omniscient: true``, simulation only, as in the paper and ByzFL): mu and
sigma are the coordinate-wise mean and Bessel-corrected standard deviation of the vectors the
honest workers actually send this round; every ALIE worker then sends the same vector.

Parameters: ``z`` (finite float or None = from n and f), ``estimate_batches`` (int 2..64,
default 5), ``collude_seed`` (int >= 0 or None), ``omniscient`` (bool, default false).
Needs: ``honest_gradient``, ``batch``, ``gradient``, ``sample_batch`` (omniscient:
``honest_gradients`` instead), and ``n``, ``f`` when z is not given.
Shapes: ``(d,)`` float32 out.
Errors: ValueError for bad parameters, or when z cannot be derived: it needs
0 < s < n, i.e. f < floor(n/2 + 1) and not s >= n (n <= 2 with f = 0).
"""

from __future__ import annotations

import math
from statistics import NormalDist
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


def alie_z(n: int, f: int) -> float:
    """z = Phi^{-1}((n - s) / n) with s = floor(n/2 + 1) - f (Baruch et al. 2019).

    Args:
        n: number of workers (>= 1).
        f: number of Byzantine workers (>= 0).

    Raises:
        ValueError: when (n - s) / n is not strictly between 0 and 1 (z would be infinite).
    """
    s = math.floor(n / 2 + 1) - f
    if not 0 < s < n:
        raise ValueError(f"alie: z = Phi^-1((n - s)/n) with s = floor(n/2 + 1) - f = {s} is "
                         f"undefined for n={n}, f={f} (needs 0 < s < n); give z explicitly")
    return NormalDist().inv_cdf((n - s) / n)


class Alie(Attack):
    """Send ``mu_hat - z * sigma_hat`` (estimated from the worker's own shard).

    Args:
        z: the shift in standard deviations; None derives it from n and f.
        estimate_batches: minibatches k used for mu_hat and sigma_hat (2..64).
        collude_seed: shared sampling seed of colluding workers; None = own seed.
        omniscient: use the honest workers' true vectors of the round (simulation only).

    Raises:
        ValueError: bad parameters.
    """

    name = "alie"
    needs = frozenset({"honest_gradient", "batch", "gradient", "sample_batch", "n", "f"})

    def __init__(self, z: Optional[float] = None, estimate_batches: int = 5,
                 collude_seed: Optional[int] = None, omniscient: bool = False):
        self.z = None if z is None else finite_float("z", z)
        self.estimate_batches = estimate_batches_param(estimate_batches, 2)
        self.collude_seed = optional_seed("collude_seed", collude_seed)
        self.is_omniscient = flag("omniscient", omniscient)
        needs = frozenset({"honest_gradients", "n", "f"}) if omniscient else Alie.needs
        self.needs = needs - {"n", "f"} if self.z is not None else needs

    def check(self, n: int, f: int) -> None:
        """Raises ValueError when z is not given and cannot be derived from n and f."""
        if self.z is None:
            alie_z(n, f)

    def z_for(self, ctx: AttackContext) -> float:
        """The z used in ``ctx``'s round: the given one, or :func:`alie_z` of ctx.n, ctx.f."""
        return self.z if self.z is not None else alie_z(*ctx.n_and_f())

    def __call__(self, ctx: AttackContext) -> torch.Tensor:
        """``(d,)`` float32 ``mu_hat - z * sigma_hat`` (or the true mu and sigma)."""
        self.require(ctx)
        if self.is_omniscient:
            rows = _estimate.true_rows(ctx, 2)
            return rows.mean(dim=0) - self.z_for(ctx) * rows.std(dim=0, correction=1)
        grads = _estimate.raw_gradients(ctx, self.estimate_batches, self.collude_seed,
                                        self.name)
        return _estimate.centre(ctx, grads) - self.z_for(ctx) * _estimate.spread(ctx, grads)
