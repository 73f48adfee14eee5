"""Minimum-diameter averaging (El Mhamdi, Guerraoui, Rouault 2020)."""

from __future__ import annotations

import itertools
import math

import torch

from ._base import Aggregator, F_PARAM, Param
from ._common import mean_rows, pairwise_sq_dists

_BATCH_ENTRIES = 1 << 18


class MDA(Aggregator):
    """``mda``: average of the subset of n - f rows with the smallest diameter.

    Definition: among all subsets S of n - f rows, take one minimising the diameter
    ``max_{i, j in S} ||x_i - x_j||`` and return the mean of its rows. The subsets are
    enumerated exactly (as the C(n, f) sets of f rows left out, in lexicographic order).
    Equal diameters are common, not accidental: the diameter is one pair's distance, and every
    subset keeping that pair and leaving out rows elsewhere shares it. Ties are therefore broken
    by the smaller sum of squared pairwise distances within the subset (the tighter subset),
    which does not depend on the order of the rows, and only then by the enumeration order.

    Parameters: ``f`` (int >= 0, default 0), ``limit`` (int >= 1, default 100000): the largest
    number of subsets C(n, f) the rule may enumerate.

    Precondition: n > f (the subset is not empty) and C(n, f) <= limit, else ValueError; the
    guarantee needs n > 2f, otherwise ``warning(n)`` says so.

    Complexity: O(n^2 d) for the distances plus O(C(n, f) n^2) for the enumeration (batched,
    about 2**18 matrix entries at a time), O(n^2) plus one chunk of extra memory.

    Source: E. M. El Mhamdi, R. Guerraoui, S. Rouault, "Fast and Robust Distributed Learning
    in High Dimension", SRDS 2020 (MDA; also used in El Mhamdi et al., "Distributed Momentum
    for Byzantine-resilient Stochastic Gradient Descent", ICLR 2021).

    Shapes and dtypes: (n, d) float32/float64 -> (d,) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape,
    n <= f, C(n, f) > limit, or when every row holds NaN/Inf (such rows are dropped, f lowered
    by their count).
    """

    name = "mda"
    PARAMS = {
        "f": F_PARAM,
        "limit": Param("int", 100_000, "largest number of subsets C(n, f) to enumerate",
                       minimum=1),
    }

    limit: int

    def _requirement(self, n: int, f: int) -> str | None:
        if n <= f:
            return f"mda averages n - f rows and needs n > f (n={n}, f={f})"
        count = math.comb(n, f)
        if count > self.limit:
            return (
                f"mda would enumerate C(n, f) = {count} subsets, more than limit={self.limit}; "
                f"raise 'limit' or choose a cheaper rule"
            )
        return None

    def _guarantee(self, n: int, f: int) -> str | None:
        if n <= 2 * f:
            return "minimum-diameter averaging's guarantee needs n > 2f"
        return None

    def select(self, x: torch.Tensor, f: int | None = None, check: bool = False) -> torch.Tensor:
        """Boolean mask (n,) of the chosen n - f rows (with ``check``, ``NonFiniteInput`` is
        raised when x holds NaN/Inf)."""
        f = self.f if f is None else f
        n = x.shape[0]
        if f == 0:
            return torch.ones(n, dtype=torch.bool, device=x.device)
        dist = pairwise_sq_dists(x, check)  # squared: same minimiser as the diameter itself
        batch = max(1, _BATCH_ENTRIES // (n * n))
        combos = itertools.combinations(range(n), f)
        best = (math.inf, math.inf)
        best_keep = None
        zero = torch.zeros((), dtype=dist.dtype, device=dist.device)
        inf = torch.full((), math.inf, dtype=dist.dtype, device=dist.device)
        while True:
            left_out = list(itertools.islice(combos, batch))
            if not left_out:
                break
            rem = torch.tensor(left_out, dtype=torch.long, device=dist.device)
            keep = torch.ones(len(left_out), n, dtype=torch.bool, device=dist.device)
            keep.scatter_(1, rem, False)
            pair = keep[:, :, None] & keep[:, None, :]
            within = torch.where(pair, dist, zero)
            diam = within.amax(dim=(1, 2))
            spread = within.sum(dim=(1, 2))
            lowest = diam.min()
            # among the subsets of smallest diameter, the first of smallest spread
            i = int(torch.argmin(torch.where(diam == lowest, spread, inf)))
            key = (float(diam[i]), float(spread[i]))
            if key < best:
                best = key
                best_keep = keep[i].clone()
        assert best_keep is not None
        return best_keep

    _fast_path = True

    def _aggregate(self, x: torch.Tensor, f: int) -> torch.Tensor:
        keep = self.select(x, f)
        return mean_rows(x, torch.nonzero(keep).flatten())

    def _aggregate_checked(self, x: torch.Tensor, f: int) -> torch.Tensor:
        keep = self.select(x, f, check=True)
        if f == 0:  # no distances computed: the float64 sum reveals NaN/Inf
            return mean_rows(x, check=True)
        return mean_rows(x, torch.nonzero(keep).flatten())
