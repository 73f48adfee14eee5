"""Pairwise squared Euclidean distances between the rows of an ``(n, d)`` input.

Distances are computed in float64 from rows centred on a data row, so adding the same vector to
every row changes no selection (Krum, MDA, Bulyan, NNM), and every entry whose rounding bound
is not small next to it is recomputed around a row of its own cluster: identical rows get
exactly 0 and bit-identical distance rows.
"""

from __future__ import annotations

import math

import torch

from ._chunks import chunk_columns, chunks64
from ._finite import NonFiniteInput, all_finite


def _centred_gram(
    x: torch.Tensor, centre: int, rows: torch.Tensor | None = None, check: bool = False
) -> torch.Tensor:
    """Gram matrix (m, m) float64 of the rows ``x[rows] - x[centre]`` (all n rows when
    ``rows`` is None), symmetrised so that ``G_ij == G_ji`` bit for bit (a BLAS product sums
    G_ij and G_ji in different orders). One pass over float64 column chunks. With ``check``,
    a non-finite result raises ``NonFiniteInput``."""
    if rows is None:
        m = x.shape[0]
        gram = torch.zeros(m, m, dtype=torch.float64, device=x.device)
        for _, _, c in chunks64(x, x[centre]):
            gram.addmm_(c, c.T)
    else:
        m, d = int(rows.numel()), x.shape[1]
        gram = torch.zeros(m, m, dtype=torch.float64, device=x.device)
        centre64 = x[centre].to(torch.float64)
        step = chunk_columns(m, d)
        buf = torch.empty(m * step, dtype=torch.float64, device=x.device)
        for start in range(0, d, step):
            stop = min(d, start + step)
            c = buf[: m * (stop - start)].view(m, stop - start)
            c.copy_(x[rows, start:stop]).sub_(centre64[start:stop])
            gram.addmm_(c, c.T)
    if check and not all_finite(gram):
        raise NonFiniteInput
    return (gram + gram.T).mul_(0.5)


def _dist_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Squared distances ``D_ij = G_ii + G_jj - 2 G_ij`` (float64, clamped at 0, exact zero
    diagonal) from a symmetric Gram matrix of centred rows."""
    sq = gram.diagonal().clone()
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    dist.clamp_(min=0.0)
    dist.fill_diagonal_(0.0)
    return torch.nan_to_num(dist, nan=math.inf)  # defensive: cannot happen after rescaling


def _direct_dists(x: torch.Tensor) -> torch.Tensor:
    """Squared distances (n, n) float64 summed from explicit row differences; an entry whose
    square overflows float64 is +inf (which still compares correctly). O(n^2 d)."""
    n, _ = x.shape
    dist = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for _, _, c in chunks64(x):
        for i in range(n):
            diff = c - c[i]
            dist[i] += (diff * diff).sum(dim=1)
    dist.fill_diagonal_(0.0)
    return torch.nan_to_num(dist, nan=math.inf)


#: an entry D_ij is accepted once its rounding-error bound is at most this fraction of it
#: (float64 keeps about 16 digits; the bound below is a worst case, the typical error of a
#: d-term dot product is about sqrt(d) times smaller)
_DIST_REL_ERROR = 2.0**-20


def _rounding_bound(gram: torch.Tensor, d: int) -> torch.Tensor:
    """Bound (m, m) on the rounding error of the squared distances computed from ``gram`` (the
    Gram matrix of m rows centred on a data row, d coordinates): ``tau (G_ii + G_jj)`` with
    ``tau = 4 (d + 8) u``, u = 2**-53: the centring subtraction (relative u per entry), the
    d-term float64 dot products (at most d u |a_i| |a_j|, Higham, "Accuracy and Stability of
    Numerical Algorithms", 2002, section 3.1) and the few operations forming D, with a factor 2
    to spare. Zero for a pair of rows both equal to the centre: their distance 0 is exact."""
    tau = 4.0 * (d + 8) * 2.0**-53
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :]).mul_(tau)


def pairwise_sq_dists(x: torch.Tensor, check: bool = False) -> torch.Tensor:
    """Squared Euclidean distances (n, n) float64 between the rows of ``x`` (n, d), each to a
    relative accuracy of about 1e-6 or better whatever the rows' magnitudes, bit-identical
    rows for identical inputs.

    Method. ``D_ij = |a_i|^2 + |a_j|^2 - 2 a_i.a_j`` in float64 (one matrix product over
    column chunks) on rows centred on a data row, ``a_i = x_i - x_c`` (centre: row 0 first), so
    a common translation of the rows changes nothing (exactly so when the arithmetic is exact,
    e.g. small integers). The rounding error of an entry is bounded by ``tau (|a_i|^2 +
    |a_j|^2)`` (``_rounding_bound``): small next to D_ij unless rows i and j are close to each
    other compared with their distance to the centre, e.g. honest rows when the centre is a
    Byzantine row at 1e30, or identical far rows (whose computed distance is then noise, not
    0). Every entry whose bound exceeds 2**-20 of its value is recomputed: take the row i with
    the most such entries, recompute the distances among i and the rows j of its unresolved
    entries centred on x_i (one pass over those rows; the pair (i, j) is then
    ``|x_j - x_i|^2`` itself, accurate to the bound ``tau D_ij``), keep every entry whose bound
    improved, and repeat. Each round resolves every entry of row i, so at most n rounds run;
    inputs without clusters of close rows need none, one far cluster needs one.

    Identical rows. After the rounds, D_ij == 0 exactly iff rows i and j are identical (a pair
    at distance 0 is resolved only by centring on one of them, where the other's difference is
    exactly 0). Every row then takes the distances of the first row identical to it, so that
    identical rows have bit-identical distance rows: choices that are ties in exact arithmetic
    (Krum scores, MDA diameters) are ties in floating point too, and their documented tie rules
    decide them, not a last-bit difference of the matrix product.

    Float64 keeps float32 inputs up to 3.4e38 free of overflow; for float64 inputs so large
    that squares overflow, the distances are summed from explicit row differences instead
    (accurate, O(n^2 d)), and an entry whose square overflows is +inf (every caller only
    compares distances, and +inf compares correctly). With ``check``, a non-finite Gram matrix
    raises ``NonFiniteInput`` (so does any row holding NaN/Inf).

    Cost: O(n^2 d) flops in one pass for inputs without clusters of close rows; each
    recomputation round costs one pass over the rows involved. Memory: O(n^2) plus one chunk.
    """
    n, d = x.shape
    gram = _centred_gram(x, 0)
    if not all_finite(gram):
        if check:  # NaN/Inf in a row (or float64 overflow): the careful path decides
            raise NonFiniteInput
        # float64 rows beyond ~1e150: a common rescaling would flush the small distances to
        # zero (and tie them with the huge ones), so sum explicit differences instead
        return _identical_rows_alike(_direct_dists(x))
    dist = _dist_from_gram(gram)
    bound = _rounding_bound(gram, d)
    bound.fill_diagonal_(0.0)
    for _ in range(n):  # each round resolves one row for good: at most n rounds
        unresolved = (dist <= bound / _DIST_REL_ERROR) & (bound > 0)
        counts = unresolved.sum(dim=1)
        i = int(torch.argmax(counts))
        if int(counts[i]) == 0:
            break
        rows = torch.nonzero(unresolved[i] | (torch.arange(n, device=x.device) == i))
        rows = rows.flatten()
        sub = _centred_gram(x, i, rows)
        if all_finite(sub):
            sub_dist, sub_bound = _dist_from_gram(sub), _rounding_bound(sub, d)
        else:  # float64 rows near the overflow threshold: explicit differences, accurate
            sub_dist = _direct_dists(x[rows])
            sub_bound = sub_dist * (4.0 * (d + 8) * 2.0**-53)
        sub_bound.fill_diagonal_(0.0)
        block = (rows[:, None], rows[None, :])
        better = sub_bound < bound[block]
        dist[block] = torch.where(better, sub_dist, dist[block])
        bound[block] = torch.where(better, sub_bound, bound[block])
    return _identical_rows_alike(dist)


def _identical_rows_alike(dist: torch.Tensor) -> torch.Tensor:
    """``dist`` with every row and column replaced by those of the first row at distance
    exactly 0 from it (its identical twin of lowest index), so identical rows get bit-identical
    distances (see ``pairwise_sq_dists``)."""
    first = torch.argmax((dist == 0).to(torch.uint8), dim=0)  # the diagonal is 0: always found
    if bool((first == torch.arange(dist.shape[0], device=dist.device)).all()):
        return dist
    return dist[first][:, first]
