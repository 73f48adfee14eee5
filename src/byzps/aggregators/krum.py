"""Krum and Multi-Krum (Blanchard et al. 2017)."""

from __future__ import annotations

import math

import torch

from ._base import F_PARAM, Aggregator, Breakdown, Param
from ._distances import pairwise_sq_dists
from ._reduce import mean_rows


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Krum scores (n,) float64 from squared distances ``dist`` (n, n): the sum of each row's
    squared distances to its ``n - f - 2`` nearest other rows (0 neighbours -> score 0)."""
    n = dist.shape[0]
    k = n - f - 2
    if k <= 0:
        return torch.zeros(n, dtype=dist.dtype, device=dist.device)
    others = dist.clone()
    others.fill_diagonal_(math.inf)
    return torch.topk(others, k, dim=1, largest=False, sorted=True).values.sum(dim=1)


def krum_order(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Row indices sorted by Krum score, lowest first.

    Ties are broken by the total squared distance to all rows (the more central row first),
    then by index, so the selection does not depend on the order of the rows unless rows are
    exactly symmetric.
    """
    scores = krum_scores(dist, f)
    total = dist.sum(dim=1)
    order = torch.sort(total, stable=True).indices
    order = order[torch.sort(scores[order], stable=True).indices]
    return order


class MultiKrum(Aggregator):
    """``multi_krum``: average of the q rows with the lowest Krum scores.

    Definition: the score of row i is the sum of its squared Euclidean distances to its
    n - f - 2 nearest other rows (Blanchard et al. 2017); the q rows with the lowest scores
    are averaged (q = 1 is Krum). Equal scores are ordered by total squared distance to all
    rows, then by index. Distances are computed in float64 on rows centred on a central data
    row (see ``_distances.pairwise_sq_dists``), so a common translation of all rows changes no
    selection.

    Parameters: ``f`` (int >= 0, default 0), ``q`` (int >= 1 or None, default None meaning
    n - f).

    Precondition: n >= f + 3 (so each score has at least one neighbour), else ValueError; and
    q <= n - f (checked by ``check(n)``; at call time, when rows holding NaN/Inf were dropped,
    q is capped at n' - f'). The paper's guarantee needs n >= 2f + 3: for f + 3 <= n < 2f + 3
    the rule runs and ``warning(n)`` explains that the guarantee does not hold (the seed's
    example, 4 workers with f = 1, is such a case).

    Complexity: O(n^2 d) time for the distances (one float64 matrix product on centred
    chunks) plus O(q d) for the average; O(n^2) plus one chunk of extra memory.

    Source: P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.

    Shapes and dtypes: (n, d) float32/float64 -> (d,) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape,
    n < f + 3, q > n - f, or when every row holds NaN/Inf (such rows are dropped, f lowered by
    their count).
    """

    #: n >= 2f + 3: every chosen row scores at most an honest row's score, (n - f - 2) Delta^2,
    #: and a Byzantine one has n - 2f - 1 or more honest rows among its scored neighbours, so it
    #: lies within Delta sqrt((n - f - 2) / (n - 2f - 1)) of an honest row (Blanchard et al.
    #: 2017); the average of the chosen rows is that close to the honest rows' convex hull
    BREAKDOWN = Breakdown("ball", spread=lambda n, f: math.sqrt((n - f - 2) / (n - 2 * f - 1)))

    name = "multi_krum"
    PARAMS = {
        "f": F_PARAM,
        "q": Param("int", None, "number of lowest-score rows averaged (default n - f)",
                   minimum=1, allow_none=True),
    }

    q: int | None

    def _requirement(self, n: int, f: int) -> str | None:
        if n < f + 3:
            return (
                f"{self.name} needs n >= f + 3 = {f + 3} so that each score sums at least one "
                f"neighbour distance (n - f - 2 >= 1)"
            )
        return None

    def check(self, n: int) -> None:
        super().check(n)
        if self.q is not None and self.q > n - self.f:
            raise ValueError(
                f"{self.name} cannot run with n={n} rows and f={self.f}: q={self.q} must be "
                f"<= n - f = {n - self.f}"
            )

    def _guarantee(self, n: int, f: int) -> str | None:
        if n < 2 * f + 3:
            return (
                f"Blanchard et al.'s guarantee needs n >= 2f + 3 = {2 * f + 3}; the rule runs "
                f"(each score uses n - f - 2 = {n - f - 2} neighbour(s)) but may select a "
                f"Byzantine gradient"
            )
        return None

    def _count(self, n: int, f: int) -> int:
        q = n - f if self.q is None else self.q
        return min(q, n - f)

    _fast_path = True

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        n = x.shape[0]
        order = krum_order(pairwise_sq_dists(x, check), f)  # finite Gram: every row finite
        q = self._count(n, f)
        if q == 1:
            return x[int(order[0])].clone()
        chosen = torch.sort(order[:q]).values
        return mean_rows(x, chosen)


class Krum(MultiKrum):
    """``krum``: the single row with the lowest Krum score (Multi-Krum with q = 1).

    Definition: the score of row i is the sum of its squared distances to its n - f - 2
    nearest other rows; the row with the lowest score is returned (ties: lowest total squared
    distance to all rows, then lowest index).

    Parameters: ``f`` (int >= 0, default 0).

    Precondition: n >= f + 3, else ValueError; guarantee needs n >= 2f + 3, otherwise
    ``warning(n)`` explains (the rule still runs).

    Complexity: O(n^2 d) time, O(n^2) plus one chunk of extra memory.

    Source: P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.

    Shapes and dtypes: (n, d) float32/float64 -> (d,) same dtype/device (a copy of one row).
    Errors: as for ``multi_krum``.
    """

    name = "krum"
    PARAMS = {"f": F_PARAM}

    def _post_init(self) -> None:
        self.q = 1
