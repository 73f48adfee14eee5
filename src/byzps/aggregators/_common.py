"""Numerical helpers shared by the aggregation rules.

Everything here works on a gradient matrix ``x`` of shape ``(n, d)`` (one row per worker) of
dtype float32 or float64, on any device. Two conventions hold throughout:

* **Bounded extra memory.** Work that needs a float64 copy, a transposed copy or a sort is done
  on column chunks of about ``CHUNK_ELEMENTS`` entries, so the peak extra memory of a rule is
  one chunk plus O(n^2 + d) floats, never a second copy of the input (the output of a
  pre-aggregator is of course as large as its input).
* **Accurate, overflow-free reductions.** Means of float32 rows are accumulated in float64 (so
  the mean of identical float32 rows is that row exactly and 1e38-sized rows do not overflow);
  pairwise distances are computed in float64 from rows centred on a central data row, so
  adding the same vector to every row changes no selection.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

__all__ = [
    "CHUNK_ELEMENTS",
    "SUPPORTED_DTYPES",
    "as_matrix",
    "chunks64",
    "column_chunks",
    "coordinate_median",
    "drop_nonfinite",
    "nonfinite_rows",
    "mean_rows",
    "median_of_sorted",
    "pairwise_sq_dists",
    "row_norms",
    "sorted_column_chunks",
    "window_mean_around_median",
]

#: Largest number of matrix entries processed per column chunk (2**18 -> 2 MiB as float64,
#: small enough to stay in a core's L2 cache, which is measurably faster than larger chunks).
CHUNK_ELEMENTS = 1 << 18

SUPPORTED_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------- input handling


def as_matrix(grads: object, rule: str) -> torch.Tensor:
    """Validate the input of a rule and return it detached.

    Raises TypeError when ``grads`` is not a torch.Tensor or not float32/float64, ValueError
    when it is not two-dimensional or has no rows or no columns.
    """
    if not isinstance(grads, torch.Tensor):
        raise TypeError(
            f"{rule}: expected a torch.Tensor of shape (n, d), got {type(grads).__name__}"
        )
    if grads.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{rule}: expected dtype float32 or float64, got {grads.dtype}")
    if grads.dim() != 2:
        raise ValueError(
            f"{rule}: expected a 2-D tensor (n workers, d parameters), got shape "
            f"{tuple(grads.shape)}"
        )
    n, d = grads.shape
    if n == 0:
        raise ValueError(f"{rule}: got no gradients (shape {tuple(grads.shape)})")
    if d == 0:
        raise ValueError(f"{rule}: gradients have no coordinates (shape {tuple(grads.shape)})")
    return grads.detach()


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """Boolean mask (n,) of rows holding at least one NaN or +-Inf.

    Fast path: a row whose float sum is finite holds no NaN/Inf (NaN and Inf propagate through
    a sum), so only rows whose sum is non-finite - either faulty or finite rows that overflowed -
    are inspected entry by entry.
    """
    bad = ~torch.isfinite(x.sum(dim=1))
    if bool(bad.any()):
        for i in torch.nonzero(bad).flatten().tolist():
            bad[i] = not bool(torch.isfinite(x[i]).all())
    return bad


def drop_nonfinite(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Return ``(rows of x that are entirely finite, number of rows dropped)``."""
    bad = nonfinite_rows(x)
    dropped = int(bad.sum())
    if dropped:
        x = x[~bad]
    return x, dropped


# --------------------------------------------------------------------------- chunking


def chunk_columns(n: int, d: int, elements: int | None = None) -> int:
    """Number of columns per chunk.

    A chunk holds about ``elements`` entries; by default ``min(CHUNK_ELEMENTS, n*d/16)`` (at
    least 65536), so that the few chunk-sized temporaries a rule keeps alive (a float64 copy,
    and what the allocator keeps of previous chunks) stay well below the size of a float32
    input.
    """
    if elements is None:
        elements = min(CHUNK_ELEMENTS, max(n * d // 16, 1 << 16))
    return max(1, min(d, elements // max(n, 1)))


def column_chunks(n: int, d: int, elements: int | None = None) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` column ranges covering ``range(d)`` (see ``chunk_columns``)."""
    step = chunk_columns(n, d, elements)
    for start in range(0, d, step):
        yield start, min(d, start + step)


def chunks64(x: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, c)`` with ``c`` a contiguous float64 copy of ``x[:, start:stop]``.

    All chunks are written into one buffer allocated once, so iterative rules that sweep the
    matrix many times allocate nothing per chunk (no allocator churn, no heap fragmentation).
    ``c`` may be modified in place; it is overwritten by the next chunk.
    """
    n, d = x.shape
    step = chunk_columns(n, d)
    buf = torch.empty(n * step, dtype=torch.float64, device=x.device)
    for start in range(0, d, step):
        stop = min(d, start + step)
        c = buf[: n * (stop - start)].view(n, stop - start)
        c.copy_(x[:, start:stop])
        yield start, stop, c


def sorted_column_chunks(
    x: torch.Tensor, rows: torch.Tensor | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, s)`` where ``s`` (stop - start, m) holds each coordinate's values
    over the rows of ``x`` (or only ``rows``, int64 indices, m of them) in ascending order
    (input dtype). Sorting a contiguous transposed chunk along its last dimension is about
    twice as fast as sorting along dim 0."""
    n, d = x.shape
    m = n if rows is None else int(rows.numel())
    # a sort keeps values, int64 indices and its own buffers alive: use quarter-size chunks
    elements = max(min(CHUNK_ELEMENTS, n * d // 16) // 4, 1 << 14)
    for start, stop in column_chunks(m, d, elements):
        block = x[:, start:stop] if rows is None else x[rows, start:stop]
        s, _ = torch.sort(block.T.contiguous(), dim=1)
        yield start, stop, s


# --------------------------------------------------------------------------- reductions


def mean_rows(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the rows of ``x`` (n, d) -> (d,) in x's dtype, accumulated in float64; with
    ``rows`` (int64 indices) the mean of those rows only, gathered chunk by chunk (no copy of
    the selected rows).

    For float32 input the float64 sum of up to 2**29 rows is exact, so the mean of identical rows
    is that row exactly and no finite input overflows. For float64 input a sum that overflows is
    recomputed as the sum of ``row / m``.
    """
    n, d = x.shape
    m = n if rows is None else int(rows.numel())

    def block(start: int, stop: int) -> torch.Tensor:
        return x[:, start:stop] if rows is None else x[rows, start:stop]

    out = torch.empty(d, dtype=torch.float64, device=x.device)
    for start, stop in column_chunks(m, d):
        torch.sum(block(start, stop).to(torch.float64), dim=0, out=out[start:stop])
    out.div_(m)
    if x.dtype == torch.float64 and not bool(torch.isfinite(out).all()):
        for start, stop in column_chunks(m, d):
            torch.sum(block(start, stop) / m, dim=0, out=out[start:stop])
    return out.to(x.dtype)


def row_norms(x: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean norms (n,) float64 of the rows of ``x - center`` (center (d,) or None).

    Without a centre: one ``torch.linalg.vector_norm`` in x's dtype; rows whose norm came out
    non-finite (squares overflowed) or below 1e-18 (squares may have underflowed) are redone
    in float64. With a centre: float64 column chunks. Either way rows whose float64 squares
    overflow are rescaled, so the result is finite for every finite input.
    """
    n, d = x.shape
    if center is None:
        norms = torch.linalg.vector_norm(x, dim=1).to(torch.float64)
        redo = ~torch.isfinite(norms) | (norms < 1e-18)
        for i in torch.nonzero(redo).flatten().tolist():
            norms[i] = _row_norm64(x[i])
        return norms
    sq = torch.zeros(n, dtype=torch.float64, device=x.device)
    for start, stop, c in chunks64(x):
        c.sub_(center[start:stop].to(torch.float64))
        sq.add_(c.square_().sum(dim=1))
    norms = sq.sqrt_()
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):  # only float64 rows with entries beyond ~1e154 get here
        for i in torch.nonzero(bad).flatten().tolist():
            norms[i] = _row_norm64(x[i].to(torch.float64) - center.to(torch.float64))
    return norms


def _row_norm64(row: torch.Tensor) -> float:
    """Norm of one row in float64, rescaled by its largest entry so squares cannot overflow."""
    row = row.to(torch.float64)
    m = row.abs().max()
    if not bool(torch.isfinite(m)) or float(m) == 0.0:
        return float(m)
    return float(m * torch.linalg.vector_norm(row / m))


def median_of_sorted(s: torch.Tensor) -> torch.Tensor:
    """Median of each row of a row-sorted (c, n) tensor, as float64 (c,); for even n the mean
    of the two middle values (computed as 0.5*a + 0.5*b so it cannot overflow)."""
    n = s.shape[1]
    if n % 2:
        return s[:, n // 2].to(torch.float64)
    lo = s[:, n // 2 - 1].to(torch.float64)
    hi = s[:, n // 2].to(torch.float64)
    return 0.5 * lo + 0.5 * hi


def _median_transposed(t: torch.Tensor) -> torch.Tensor:
    """Median (float64) of each row of an unsorted contiguous (c, n) tensor, even n -> mean of
    the two middle values. Uses selection (kthvalue / topk), not a full sort."""
    n = t.shape[1]
    if n % 2:
        return torch.kthvalue(t, (n + 1) // 2, dim=1).values.to(torch.float64)
    if n == 2:
        lo, hi = torch.aminmax(t, dim=1)
    else:
        # the n/2 + 1 smallest values; the two largest of them are the middle pair
        low_half = torch.topk(t, n // 2 + 1, dim=1, largest=False, sorted=False).values
        top2 = torch.topk(low_half, 2, dim=1, largest=True, sorted=True).values
        hi, lo = top2[:, 0], top2[:, 1]
    return 0.5 * lo.to(torch.float64) + 0.5 * hi.to(torch.float64)


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median (d,) of ``x`` (n, d) in x's dtype; for even n the mean of the two
    middle values. O(n d) time, one chunk of extra memory."""
    n, d = x.shape
    out = torch.empty(d, dtype=x.dtype, device=x.device)
    if n == 1:
        return out.copy_(x[0])
    for start, stop in column_chunks(n, d):
        t = x[:, start:stop].T.contiguous()
        out[start:stop] = _median_transposed(t).to(x.dtype)
    return out


def window_mean_around_median(s: torch.Tensor, k: int) -> torch.Tensor:
    """For each row of a row-sorted (c, n) tensor: the mean (float64) of the k values closest
    to the row's median (even n: mean of the middle pair).

    Ties (a value below and one above the median at the same distance) go to the lower value,
    i.e. the chosen values are the k smallest of the key ``(|v - med|, v)``. They form a window
    ``s[a:a+k]`` of the sorted row: sliding the window from a to a + 1 swaps ``s[a]`` for
    ``s[a+k]``, which brings a strictly closer value exactly when ``s[a] + s[a+k] < 2 med``;
    that test is monotone in a, so the window start is the number of a in [0, n - k) passing
    it. O(n) per row after the sort.
    """
    c, n = s.shape
    if k == n:
        return s.to(torch.float64).sum(dim=1) / n
    med = median_of_sorted(s)
    # halves cannot overflow; exact for float32 data, correctly rounded for float64 data
    mid = s[:, : n - k].to(torch.float64) * 0.5  # out of place: s may already be float64
    mid += s[:, k:].to(torch.float64) * 0.5
    start = (mid < med[:, None]).sum(dim=1)
    if k == 1:
        return torch.gather(s, 1, start[:, None])[:, 0].to(torch.float64)
    idx = start[:, None] + torch.arange(k, device=s.device)[None, :]
    return torch.gather(s, 1, idx).to(torch.float64).sum(dim=1) / k


# --------------------------------------------------------------------------- distances


def _centred_gram(x: torch.Tensor, centre: int) -> torch.Tensor:
    """Gram matrix (n, n) float64 of the rows of ``x - x[centre]``."""
    n, d = x.shape
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for _, _, c in chunks64(x):
        c.sub_(c[centre].clone())
        gram.addmm_(c, c.T)
    return gram


def _dist_from_gram(gram: torch.Tensor) -> torch.Tensor:
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


def _gram_dists(x: torch.Tensor, centre: int) -> torch.Tensor:
    gram = _centred_gram(x, centre)
    if not bool(torch.isfinite(gram).all()):
        # float64 rows beyond ~1e150: a common rescaling would flush the small distances to
        # zero (and tie them with the huge ones), so sum explicit differences instead
        return _direct_dists(x)
    return _dist_from_gram(gram)


#: a centre row whose median squared distance to the rows exceeds this many times the
#: smallest such median is re-chosen (float64 keeps ~16 digits; 1e4 costs at most 4 of them)
_CENTRE_SLACK = 1e4


def pairwise_sq_dists(x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (n, n) float64 between the rows of ``x`` (n, d).

    Computed as ``D_ij = |a_i|^2 + |a_j|^2 - 2 a_i.a_j`` in float64 (one matrix product over
    column chunks) on rows centred on one of the rows, ``a_i = x_i - x_c``, clamped at 0 with an
    exact zero diagonal. Subtracting a data row makes the result independent of a common
    translation of the rows (exactly so when the arithmetic is exact, e.g. small integers), and
    the rounding error of an entry is about 1e-16 (|a_i|^2 + |a_j|^2), small next to the
    distances among the bulk of the rows as long as the centre row lies in that bulk. The
    first pass centres on row 0; if row 0 turns out to be far away (its median squared
    distance to the rows exceeds 1e4 times the smallest such median: an outlier, e.g. a
    Byzantine row of size 1e30), the distances are recomputed centred on the most central row
    (smallest median distance). Float64 keeps float32 inputs up to 3.4e38 free of overflow;
    for float64 inputs so large that squares overflow, the distances are summed from explicit
    row differences instead, and an entry whose square overflows is +inf (every caller only
    compares distances, and +inf compares correctly).

    Cost: O(n^2 d) flops in one (rarely two) passes, O(n^2) plus one chunk of extra memory.
    """
    n, _ = x.shape
    dist = _gram_dists(x, 0)
    if n > 2:
        typical = torch.median(dist, dim=1).values  # lower median, self distance included
        best = int(torch.argmin(typical))
        if best != 0 and float(typical[0]) > _CENTRE_SLACK * float(typical[best]):
            dist = _gram_dists(x, best)
    return dist
