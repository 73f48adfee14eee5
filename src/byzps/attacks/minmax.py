"""Min-Max: the honest mean pushed along a perturbation as far as the honest vectors' own
largest distance allows.

Definition (Shejwalkar and Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning
Attacks and Defenses for Federated Learning", NDSS 2021, the AGR-agnostic Min-Max attack): with
g_1..g_h the honest vectors and mu their mean, every Byzantine worker sends
``m(gamma) = mu + gamma * p`` for the perturbation p (parameter ``perturbation``):

* ``"unit"``: the inverse unit vector of the mean, ``-mu / ||mu||`` (0 when mu = 0);
* ``"std"``: the inverse coordinate-wise standard deviation, ``-sigma`` (Bessel-corrected);
* ``"sign"``: the inverse sign of the mean, ``-sign(mu)``;

and gamma is the largest value the paper's search finds such that
``max_i ||m - g_i|| <= max_{i,j} ||g_i - g_j||`` (Min-Max; Min-Sum, :mod:`minsum`, bounds the
sum of squared distances instead). Search (the paper's halving search, defaults from the
paper): gamma = gamma_init, step = gamma_init, gamma_succ = 0; while
``|gamma_succ - gamma| > tol``: if m(gamma) meets the condition, gamma_succ = gamma and gamma
+= step / 2, else gamma -= step / 2; then step /= 2. The result uses gamma_succ (0 when no
tried gamma met the condition). All squared distances are expanded exactly as
``||mu - g_i||^2 + 2 gamma (mu - g_i).p + gamma^2 ||p||^2`` (float64), so each trial costs
O(h) after one O(h d) pass.

Parameters: ``perturbation`` ("unit" | "std" | "sign", default "unit"), ``gamma_init``
(finite > 0, default 10.0), ``tol`` (finite > 0, default 1e-5), and ``estimate_batches``
(default 5), ``collude_seed``, ``omniscient`` as in :mod:`byzps.attacks._honest`
(omniscient: the true honest vectors, as in the paper's full-knowledge setting; otherwise
stand-ins from the own shard).
Needs: ``honest_gradients`` (omniscient) or the own-shard fields. Shapes: ``(d,)`` float32 out.
Errors: ValueError for bad parameters or fewer than 2 honest vectors.
"""

from __future__ import annotations

from typing import Optional

import torch

from byzps.aggregators._distances import pairwise_sq_dists
from byzps.attacks._honest import HonestVectorsAttack
from byzps.attacks.base import AttackContext, finite_float

#: a search never needs more halvings than this (gamma_init / 2**200 is below any tol)
_MAX_STEPS = 200

PERTURBATIONS = ("unit", "std", "sign")


def perturbation_vector(kind: str, honest: torch.Tensor) -> torch.Tensor:
    """The perturbation p ``(d,)`` float32 of ``honest`` ``(h, d)``: ``"unit"``, ``"std"`` or
    ``"sign"`` (see the module docstring).

    Raises:
        ValueError: an unknown kind, or ``"std"`` with fewer than 2 rows.
    """
    mu = honest.mean(dim=0)
    if kind == "unit":
        norm = torch.linalg.vector_norm(mu.to(torch.float64))
        return torch.zeros_like(mu) if float(norm) == 0 else (-mu.to(torch.float64) / norm).to(
            mu.dtype)
    if kind == "std":
        if honest.shape[0] < 2:
            raise ValueError("the 'std' perturbation needs at least 2 honest vectors")
        return -honest.std(dim=0, correction=1)
    if kind == "sign":
        return -torch.sign(mu)
    raise ValueError(f"perturbation must be one of {', '.join(PERTURBATIONS)}, got {kind!r}")


def halving_search(ok, gamma_init: float, tol: float) -> float:
    """The paper's search for the largest gamma with ``ok(gamma)`` (see the module
    docstring); 0.0 when no tried gamma passes."""
    gamma, step, succ = gamma_init, gamma_init, 0.0
    for _ in range(_MAX_STEPS):
        if abs(succ - gamma) <= tol:
            break
        if ok(gamma):
            succ = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return succ


class MinMax(HonestVectorsAttack):
    """Send ``mu + gamma * p`` with the Min-Max gamma (see the module docstring).

    Args:
        perturbation: "unit", "std" or "sign".
        gamma_init: first gamma tried and first step (> 0).
        tol: the search stops when the last passing gamma and the next trial are this close.
        estimate_batches, collude_seed, omniscient: see :mod:`byzps.attacks._honest`.

    Raises:
        ValueError: bad parameters.
    """

    name = "minmax"
    min_rows = 2

    def __init__(self, perturbation: str = "unit", gamma_init: float = 10.0, tol: float = 1e-5,
                 estimate_batches: Optional[int] = 5, collude_seed: Optional[int] = None,
                 omniscient: bool = False):
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {', '.join(PERTURBATIONS)}, got "
                             f"{perturbation!r}")
        self.perturbation = perturbation
        self.gamma_init = finite_float("gamma_init", gamma_init)
        self.tol = finite_float("tol", tol)
        if self.gamma_init <= 0 or self.tol <= 0:
            raise ValueError(f"gamma_init and tol must be > 0, got {gamma_init}, {tol}")
        super().__init__(estimate_batches, collude_seed, omniscient)

    def condition(self, dist: torch.Tensor, base: torch.Tensor, cross: torch.Tensor,
                  pp: float):
        """``ok(gamma)`` for the search: Min-Max's condition. ``dist`` (h, h) squared distances
        among the honest vectors, ``base_i = ||mu - g_i||^2``, ``cross_i = (mu - g_i).p``,
        ``pp = ||p||^2`` (float64)."""
        bound = float(dist.max())

        def ok(gamma: float) -> bool:
            return float((base + 2 * gamma * cross + gamma * gamma * pp).max()) <= bound
        return ok

    def gamma(self, honest: torch.Tensor, p: torch.Tensor) -> float:
        """The gamma the search finds for ``honest`` ``(h, d)`` and perturbation p ``(d,)``."""
        h64 = honest.to(torch.float64)
        mu = h64.mean(dim=0)
        dev = mu - h64
        p64 = p.to(torch.float64)
        base = dev.square().sum(dim=1)
        cross = dev @ p64
        pp = float(p64 @ p64)
        ok = self.condition(pairwise_sq_dists(h64), base, cross, pp)
        return halving_search(ok, self.gamma_init, self.tol)

    def __call__(self, ctx: AttackContext) -> torch.Tensor:
        """``(d,)`` float32 ``mu + gamma * p``."""
        honest = self.honest(ctx)
        p = perturbation_vector(self.perturbation, honest)
        return honest.mean(dim=0) + self.gamma(honest, p) * p
