"""Minimum-diameter averaging (El Mhamdi, Guerraoui, Rouault 2020)."""

from __future__ import annotations

import itertools
import math

import torch

from ._base import F_PARAM, Aggregator, Breakdown, Param
from ._distances import pairwise_sq_dists
from ._reduce import mean_rows

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
    Both keys are exact functions of the distance matrix: identical rows have bit-identical
    distances (``_distances.pairwise_sq_dists``), so diameters equal through duplicated rows are
    equal, and the spreads of the candidate subsets are compared as correctly rounded sums
    (``math.fsum``), which do not depend on the order of summation.

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

    #: n > 2f: the chosen subset's diameter is at most Delta (some n - f honest rows have
    #: diameter <= Delta) and it holds an honest row, so its mean is within Delta of the honest
    #: rows' convex hull (El Mhamdi et al. 2020)
    BREAKDOWN = Breakdown("ball", spread=1.0)

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
        # squared: same minimiser as the diameter itself; identical rows have bit-identical
        # distances, so diameters equal in exact arithmetic through duplicates are equal here
        dist = pairwise_sq_dists(x, check)
        batch = max(1, _BATCH_ENTRIES // (n * n))
        combos = itertools.combinations(range(n), f)
        best_diam = math.inf
        # subsets of the smallest diameter so far whose exact spread may be the smallest:
        # (enumeration index, keep mask, spread as summed by torch, within _spread_slack)
        cands: list[tuple[int, torch.Tensor, float]] = []
        slack = _spread_slack(n - f)
        zero = torch.zeros((), dtype=dist.dtype, device=dist.device)
        offset = 0
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
            lowest = float(diam.min())
            if lowest <= best_diam:
                if lowest < best_diam:
                    best_diam, cands = lowest, []
                at = torch.nonzero(diam == lowest).flatten()
                spread = within[at].sum(dim=(1, 2))
                least = min(float(spread.min()), min((c[2] for c in cands), default=math.inf))
                for j, s in zip(at.tolist(), spread.tolist()):
                    if s <= least * slack:
                        cands.append((offset + j, keep[j].clone(), s))
                cands = [c for c in cands if c[2] <= least * slack]
            offset += len(left_out)
        return _tightest(cands, dist)

    _fast_path = True

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        keep = self.select(x, f, check=check)
        if check and f == 0:  # no distances computed: the float64 sum reveals NaN/Inf
            return mean_rows(x, check=True)
        return mean_rows(x, torch.nonzero(keep).flatten())


def _spread_slack(m: int) -> float:
    """Factor (1 + g) / (1 - g), g = (m^2 - 1) u: a float64 sum of the m^2 non-negative
    entries of a subset's distance matrix, in any order, lies within a factor 1 +- g of the
    exact sum (Higham 2002, section 4.2), so every subset whose exact spread is the smallest
    has a computed spread within this factor of the smallest computed one."""
    g = (m * m - 1) * 2.0**-53
    return (1.0 + g) / (1.0 - g)


def _tightest(cands: list[tuple[int, torch.Tensor, float]], dist: torch.Tensor) -> torch.Tensor:
    """The keep mask of the candidate with the smallest spread, summed exactly (``math.fsum``
    of its pairwise squared distances: correctly rounded, so equal multisets of distances give
    equal spreads whatever their order), then the earliest in enumeration order."""
    if len(cands) == 1:
        return cands[0][1]
    if min(c[2] for c in cands) == 0.0:  # non-negative terms: a zero sum is exactly zero
        return min((c for c in cands if c[2] == 0.0), key=lambda c: c[0])[1]
    best = min(
        cands,
        key=lambda c: (math.fsum(dist[c[1]][:, c[1]].flatten().tolist()), c[0]),
    )
    return best[1]
