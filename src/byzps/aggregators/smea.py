"""SMEA: smallest maximum eigenvalue averaging (Allouah et al. 2023)."""

from __future__ import annotations

import itertools
import math
from typing import Optional

import torch

from ._base import F_PARAM, Aggregator, Breakdown, Param
from ._reduce import mean_rows
from ._spectral import sq_dists

#: float64 entries of the batched (subsets, m, m) matrices handled at once (32 MiB)
_BATCH_ENTRIES = 1 << 22


class SMEA(Aggregator):
    """``smea``: the mean of the n - f rows whose empirical covariance has the smallest
    largest eigenvalue.

    Definition: over all subsets S of n - f rows, with ``mu_S`` their mean and
    ``Sigma_S = (1/|S|) sum_{i in S} (x_i - mu_S)(x_i - mu_S)^T``, pick
    ``S* = argmin_S lambda_max(Sigma_S)`` and return ``mu_{S*}``. The subsets are enumerated
    exactly, as the C(n, f) sets of f rows left out in lexicographic order (as ``mda`` does);
    equal eigenvalues go to the first subset in that order.

    lambda_max is exact (an eigendecomposition, not a power iteration): it equals
    lambda_max(K_S)/|S| for the centred Gram matrix ``K_S = -1/2 J D_S J`` of the subset
    (D_S its squared distances, ``J = I - 11^T/|S|``), so after one O(n^2 d) pass for the
    distances each subset costs O((n - f)^3), independent of d.

    Parameters: ``f`` (int >= 0, default 0), ``limit`` (int >= 1, default 100000): the largest
    number of subsets C(n, f) the rule may examine (the work grows combinatorially; C(13, 3) =
    286, C(20, 5) = 15504).

    Precondition: n > f and C(n, f) <= limit, else ValueError; the paper's guarantee needs
    n > 2f, otherwise ``warning(n)`` says so.

    Complexity: O(n^2 d + C(n, f) (n - f)^3) time; O(n^2) plus one chunk plus a 32 MiB batch of
    subset matrices of extra memory.

    Source: Y. Allouah, R. Guerraoui, N. Gupta, R. Pinot, J. Stephan, "On the Privacy-Robustness-
    Utility Trilemma in Distributed Learning", ICML 2023.

    Shapes and dtypes: (n, d) float32/float64 -> (d,) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape,
    n <= f, C(n, f) > limit, or when every row holds NaN/Inf (such rows are dropped, f
    lowered by their count).
    """

    name = "smea"
    PARAMS = {
        "f": F_PARAM,
        "limit": Param("int", 100_000, "largest number of subsets C(n, f) to examine",
                       minimum=1),
    }

    limit: int

    #: n > 2f: S* has a top covariance eigenvalue at most that of any n - f honest rows
    #: (<= Delta^2), and S* shares >= n - 2f rows with the honest rows H; a subset holding a
    #: fraction 1 - e of a set has its mean within sqrt(lambda e / (1 - e)) of the set's mean,
    #: with e / (1 - e) <= f / (n - 2f) for both S* and H: ||out - c|| <= 2 Delta sqrt(f/(n-2f))
    BREAKDOWN = Breakdown("ball", spread=lambda n, f: 2.0 * math.sqrt(f / (n - 2 * f)))

    def _requirement(self, n: int, f: int) -> str | None:
        if n <= f:
            return f"smea averages n - f rows and needs n > f (n={n}, f={f})"
        count = math.comb(n, f)
        if count > self.limit:
            return (f"smea would examine C(n, f) = {count} subsets, more than limit={self.limit}; "
                    f"raise 'limit' or choose a cheaper rule")
        return None

    def _guarantee(self, n: int, f: int) -> str | None:
        if n <= 2 * f:
            return "SMEA's guarantee needs n > 2f"
        return None

    def best_subset(self, x: torch.Tensor, f: int) -> torch.Tensor:
        """Indices (n - f,) int64, ascending, of the subset S* (see the class docstring)."""
        n = x.shape[0]
        m = n - f
        if f == 0:
            return torch.arange(n, device=x.device)
        dist = sq_dists(x).cpu()
        centre = torch.eye(m, dtype=torch.float64) - 1.0 / m
        per_batch = max(1, _BATCH_ENTRIES // (m * m))
        combos = itertools.combinations(range(n), f)
        best_value = math.inf
        best: Optional[torch.Tensor] = None
        while True:
            left_out = list(itertools.islice(combos, per_batch))
            if not left_out:
                break
            keep = torch.ones(len(left_out), n, dtype=torch.bool)
            keep.scatter_(1, torch.tensor(left_out, dtype=torch.long), False)
            idx = torch.nonzero(keep)[:, 1].view(len(left_out), m)      # (b, m) ascending
            sub = dist[idx[:, :, None], idx[:, None, :]]                 # (b, m, m)
            gram = -0.5 * (centre @ sub @ centre)
            gram = (gram + gram.transpose(1, 2)) * 0.5
            top = torch.linalg.eigvalsh(gram)[:, -1]
            k = int(torch.argmin(top))                                   # first of equals
            if float(top[k]) < best_value:
                best_value, best = float(top[k]), idx[k]
        if best is None:   # cannot happen: 0 < f < n gives at least one subset
            raise ValueError(f"smea: no subset of {m} of the {n} rows to choose from")
        return best.to(x.device)

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        chosen = self.best_subset(x, f)
        return mean_rows(x, chosen)
