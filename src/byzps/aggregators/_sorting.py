"""Per-coordinate order statistics with a sorting network: the coordinate-wise median, sums of
a window of sorted values (trimmed mean, MeaMed, Bulyan) and sums over sorted rows.

Per-coordinate order statistics are computed with a bitonic sorting network (Batcher 1968)
applied to the rows of a column block: every compare-exchange of the network is a
``torch.minimum`` / ``torch.maximum`` of two row slabs of the block, so one network step sorts
all b columns of the block at once with a few vectorised calls over contiguous rows. For n rows
(padded with +inf to a power of two N) a full sort takes log2(N) (log2(N) + 1) / 2 steps of
N * b element operations each, with no data-dependent branch, no index tensor and no
transposition; it is 5-10x faster than ``torch.sort`` / ``torch.kthvalue`` / ``torch.topk``
along either dimension on the usual shapes (measured on one CPU thread: 64 x 65536 float32
median 0.13 s with kthvalue on transposed chunks, about 0.02 s with the network). Min and max
are exact, so the sorted values are bit-identical to a sort's. The median of an even count is
the mean of the two middle values.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from . import _chunks
from ._finite import NonFiniteInput
from ._reduce import row_norms, sums_less


def _sort_block_columns(n: int, d: int) -> int:
    """Columns per block of the sorting network: the two (N, b) work buffers hold about
    ``2 * _chunks.CHUNK_ELEMENTS`` entries each (2 MiB as float32: the block stays in the last-level
    cache and each call of the network is long enough that the per-call overhead is small),
    and at most an eighth of the input, so that the buffers stay well below its size."""
    big = 1 << max(0, (n - 1).bit_length())
    elements = min(2 * _chunks.CHUNK_ELEMENTS, max(n * d // 8, _chunks.CHUNK_ELEMENTS // 4))
    return max(1, min(d, elements // big))


def _bitonic_views(
    src: torch.Tensor, dst: torch.Tensor, k: int, j: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Compare-exchanges of one bitonic step as ``(a, b, lo, hi)`` views: the step writes
    ``lo = min(a, b)`` and ``hi = max(a, b)``. ``src`` (input, may be strided) and ``dst``
    (output) are (N, b); the step belongs to the merge of blocks of k rows (sorted ascending
    for even block index, descending for odd, except when k = N) at distance j."""
    big, b = dst.shape
    v = src.view(big // k, k // (2 * j), 2, j, b)
    o = dst.view(big // k, k // (2 * j), 2, j, b)
    if k == big:
        return [(v[:, :, 0], v[:, :, 1], o[:, :, 0], o[:, :, 1])]
    up, down, oup, odown = v[0::2], v[1::2], o[0::2], o[1::2]
    return [
        (up[:, :, 0], up[:, :, 1], oup[:, :, 0], oup[:, :, 1]),
        (down[:, :, 0], down[:, :, 1], odown[:, :, 1], odown[:, :, 0]),
    ]


class _ColumnSorter:
    """Sorts the values of each column of (n, b) column blocks along dim 0.

    ``full=True``: stages k = 2, ..., N of the bitonic network: rows ascending. ``full=False``
    (for selection): stages k = 2, ..., N/2 only: the first N/2 rows ascending and the last
    N/2 descending, i.e. each column is a bitonic sequence, from which ``bitonic_select``
    extracts one or two ranks with about N more row operations (a full sort would cost
    log2(N) N more). Rows n..N-1 are +inf padding. Buffers and the views of every step are
    built once per block width and reused for every block.
    """

    def __init__(self, n: int, d: int, dtype: torch.dtype, device: torch.device,
                 full: bool) -> None:
        self.n = n
        self.big = 1 << max(0, (n - 1).bit_length())
        self.width = _sort_block_columns(n, d)
        self.top = self.big if full else self.big // 2
        size = self.big * self.width
        self._a = torch.empty(size, dtype=dtype, device=device)
        self._w = torch.empty(size, dtype=dtype, device=device)
        self._plans: dict[int, tuple] = {}

    def _plan(self, b: int) -> tuple:
        plan = self._plans.get(b)
        if plan is None:
            a = self._a[: self.big * b].view(self.big, b)
            w = self._w[: self.big * b].view(self.big, b)
            first, steps = a, []
            src, dst = a, w
            k = 2
            while k <= self.top:
                j = k // 2
                while j >= 1:
                    steps.append(_bitonic_views(src, dst, k, j))
                    src, dst = dst, src
                    j //= 2
                k *= 2
            plan = (first, w, steps, src, dst)
            self._plans[b] = plan
        return plan

    def add_extremes(self, r: torch.Tensor, acc: torch.Tensor) -> None:
        """Add to ``acc`` (float64, (b,) or broadcastable) the extreme values of each sorted
        run of ``r`` (the block just sorted): a sum that stays finite proves that every block
        summed was finite.

        A compare-exchange moves values and spreads NaN (``torch.minimum`` / ``maximum``
        propagate it to both outputs), and in a sorting network every input reaches every
        output of its sorted run. So a block is finite iff the extremes of each sorted run
        are: rows 0 and n-1 after a full sort; for the bitonic result the first and last row
        of the ascending half and of the descending half, whose largest real value sits just
        after the N - n rows of +inf padding. Only these rows are read, not the block; NaN
        and +-Inf propagate through the sum (inf - inf is NaN), and float64 sums of float32
        values cannot overflow (a float64 overflow only sends the caller down the careful
        path). ``torch.isfinite`` itself is slow on CPU, so it is applied once, to the total.
        """
        rows: tuple[int, ...]
        if self.top == self.big:
            rows = (0, self.n - 1)
        else:
            h = self.big // 2
            rows = (0, h - 1, h + self.big - self.n, self.big - 1)
        b = r.shape[1]
        for i in rows:
            acc[:b].add_(r[i])

    def sort(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sort (``full``) or make bitonic the columns of ``block`` (m <= n rows, b columns;
        any strides). Returns ``(r, spare)``: r (N, b) holds the result (first m rows: the
        values, then +inf), spare (N, b) is free scratch space. Both are overwritten by the
        next call."""
        m, b = block.shape
        first, w, steps, result, spare = self._plan(b)
        start = 0
        if m == self.big and steps and block.stride(1) == 1:
            # the first step reads the input directly (no copy into the buffer)
            for a_, b_, lo, hi in _bitonic_views(block, w, 2, 1):
                torch.minimum(a_, b_, out=lo)
                torch.maximum(a_, b_, out=hi)
            start = 1
        else:
            first[:m].copy_(block)
            if m < self.big:
                first[m:].fill_(math.inf)
        for step in steps[start:]:
            for a_, b_, lo, hi in step:
                torch.minimum(a_, b_, out=lo)
                torch.maximum(a_, b_, out=hi)
        return result, spare


def bitonic_select(
    r: torch.Tensor, spare: torch.Tensor, k1: int, k2: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of ranks k1 <= k2 <= k1 + 1 (1-based, ascending) of each column of ``r``
    (N, b), whose columns are bitonic (ascending then descending; N a power of two).

    Bitonic split: ``min(r[:N/2], r[N/2:])`` holds the N/2 smallest values of each column and
    ``max(...)`` the N/2 largest, both bitonic again; descend into the half holding the ranks
    until they are the extreme values of a half (or straddle the split). O(N b) operations.
    ``spare`` (at least N/2 rows) is scratch space.
    """
    while True:
        m = r.shape[0]
        if k2 == 1:
            v = r.amin(dim=0)
            return v, v
        if k1 == m:
            v = r.amax(dim=0)
            return v, v
        h = m // 2
        if k2 <= h:
            r, spare = torch.minimum(r[:h], r[h:], out=spare[:h]), r
        elif k1 > h:
            r, spare = torch.maximum(r[:h], r[h:], out=spare[:h]), r
            k1, k2 = k1 - h, k2 - h
        else:  # k1 = h, k2 = h + 1: the largest of the low half, the smallest of the high half
            lo = torch.minimum(r[:h], r[h:], out=spare[:h])
            hi = torch.maximum(r[:h], r[h:], out=spare[h:m])
            return lo.amax(dim=0), hi.amin(dim=0)


def sort_blocks(m: int, d: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` column blocks that :func:`sorted_column_chunks` sorts for m rows
    of d columns, in order (every block but the last of the same width)."""
    width = _sort_block_columns(m, d)
    return [(start, min(d, start + width)) for start in range(0, d, width)]


def sorted_column_chunks(
    x: torch.Tensor, rows: torch.Tensor | None = None, check: bool = False,
    blocks: Sequence[tuple[int, int]] | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, s)`` where ``s`` (m, stop - start) holds each coordinate's values
    over the rows of ``x`` (or only ``rows``, int64 indices, m of them) sorted ascending
    along dim 0 (input dtype). ``s`` is overwritten by the next chunk. With ``check``, raises
    ``NonFiniteInput`` after the last chunk if any chunk held NaN/Inf.

    ``blocks``: only these blocks of :func:`sort_blocks` ``(m, d)`` (e.g. one part of them, for
    :func:`byzps.aggregators._chunks.for_each_part`); default all of them. Each block is sorted
    exactly as in a call over all blocks."""
    n, d = x.shape
    m = n if rows is None else int(rows.numel())
    sorter = _ColumnSorter(m, d, x.dtype, x.device, full=True)
    acc = torch.zeros(sorter.width, dtype=torch.float64, device=x.device) if check else None
    for start, stop in sort_blocks(m, d) if blocks is None else blocks:
        block = x[:, start:stop] if rows is None else x[rows, start:stop]
        r, _ = sorter.sort(block)
        if acc is not None:
            sorter.add_extremes(r, acc)
        yield start, stop, r[:m]
    if acc is not None and not bool(torch.isfinite(acc.sum())):
        raise NonFiniteInput


def _half_sum(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """0.5 * lo + 0.5 * hi in float64 (exact halves for float32 data; cannot overflow)."""
    out = lo.to(torch.float64) * 0.5  # out of place: lo may be float64 already
    return out.add_(hi.to(torch.float64), alpha=0.5)


def coordinate_median(
    x: torch.Tensor, check: bool = False, visit=None
) -> torch.Tensor:
    """Coordinate-wise median (d,) of ``x`` (n, d) in x's dtype; for even n the mean of the two
    middle values. Selection with a bitonic network (``_ColumnSorter(full=False)`` then
    ``bitonic_select``): about (log2(N) (log2(N) - 1) / 2 + 1) N d element operations for
    N = n rounded up to a power of two; two network buffers of extra memory. With ``check``,
    raises ``NonFiniteInput`` if x holds NaN/Inf (checked on the network's outputs, see
    ``_ColumnSorter.add_extremes``; raised after the last block). ``visit(start, stop, med)``,
    when given, is called after each column block with the block's medians (x's dtype), while
    the block of x is still in cache (geometric median: distances to the start point)."""
    n, d = x.shape
    out = torch.empty(d, dtype=x.dtype, device=x.device)
    if n == 1:
        if check and not bool(torch.isfinite(x[0].sum())):
            raise NonFiniteInput
        out.copy_(x[0])
        if visit is not None:
            visit(0, d, out)
        return out
    sorter = _ColumnSorter(n, d, x.dtype, x.device, full=False)
    acc = torch.zeros(sorter.width, dtype=torch.float64, device=x.device) if check else None
    k1 = (n + 1) // 2
    k2 = n // 2 + 1
    for start in range(0, d, sorter.width):
        stop = min(d, start + sorter.width)
        r, spare = sorter.sort(x[:, start:stop])
        if acc is not None:
            sorter.add_extremes(r, acc)
        lo, hi = bitonic_select(r, spare, k1, k2)
        if k1 == k2:
            out[start:stop] = lo
        else:
            out[start:stop] = _half_sum(lo, hi)
        if visit is not None:
            visit(start, stop, out[start:stop])
    if acc is not None and not bool(torch.isfinite(acc.sum())):
        raise NonFiniteInput
    return out


def median_and_distances(
    x: torch.Tensor, check: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, dist)``: the coordinate-wise median z (d,) float64 (computed in x's dtype, as
    ``coordinate_median``) and the Euclidean distances dist (n,) float64 of the rows to it.

    The distances are accumulated block by block as the median comes out of the sorting
    network, while the block of x is still in cache (one float64 buffer of a block). With
    ``check``, raises ``NonFiniteInput`` if x holds NaN/Inf.
    """
    n, d = x.shape
    sq = torch.zeros(n, dtype=torch.float64, device=x.device)
    bufs: list[torch.Tensor] = []

    def distances(start: int, stop: int, med: torch.Tensor) -> None:
        if not bufs:
            bufs.append(torch.empty(n * (stop - start), dtype=torch.float64, device=x.device))
        c = bufs[0][: n * (stop - start)].view(n, stop - start)
        c.copy_(x[:, start:stop]).sub_(med.to(torch.float64))
        sq.add_(torch.linalg.vector_norm(c, dim=1).square_())

    z = coordinate_median(x, check, distances).to(torch.float64)
    bufs.clear()
    dist = sq.sqrt_()
    if not bool(torch.isfinite(dist).all()):  # float64 squares overflowed: rescaled norms
        dist = row_norms(x, z)
    return z, dist


def window_sum_sorted(
    s: torch.Tensor, k: int, buf: torch.Tensor | None = None
) -> torch.Tensor:
    """For each column of a column-sorted (n, c) tensor: the sum (float64) of the k values
    closest to the column's median (even n: mean of the middle pair).

    Ties (a value below and one above the median at the same distance) go to the lower value,
    i.e. the chosen values are the k smallest of the key ``(|v - med|, v)``. They form a window
    ``s[a:a+k]`` of the sorted column: sliding the window from a to a + 1 swaps ``s[a]`` for
    ``s[a+k]``, which brings a strictly closer value exactly when ``s[a] + s[a+k] < 2 med``
    (``= m_lo + m_hi``, the middle pair); that test is monotone in a, so the window start is
    the number of a in [0, n - k) passing it. The test is decided in exact arithmetic
    (``sums_less``), so values spanning more than 2**53 (a Byzantine 1e17 next to honest
    values of order 1) cannot flip it. When 2k >= n the rows [n-k, k) are in every window and,
    for r in [0, n-k), exactly one of s[r] (when r >= a) and s[k+r] (when r < a) is; otherwise a
    mask selects the window. O(n c) after the sort, no gather. ``buf``: optional float64
    scratch space of k * c entries, reused across calls.
    """
    n, c = s.shape
    if k == n:
        return s.to(torch.float64).sum(dim=0)
    a = sums_less(s[: n - k], s[k:], s[(n - 1) // 2], s[n // 2]).sum(dim=0)
    r = torch.arange(n - k, device=s.device)[:, None]
    if 2 * k >= n:
        # the k window values of each column, gathered into k rows: the rows [n-k, k) that
        # are in every window, then one of s[r] / s[k+r] for each r; summed in float64
        if buf is None:
            buf = torch.empty(k * c, dtype=torch.float64, device=s.device)
        rows = buf[: k * c].view(k, c)
        rows[: 2 * k - n].copy_(s[n - k : k])
        rows[2 * k - n :].copy_(torch.where(r >= a, s[: n - k], s[k:]))
        return rows.sum(dim=0)
    i = torch.arange(n, device=s.device)[:, None]
    inside = (i >= a) & (i < a + k)
    return torch.where(inside, s, 0).to(torch.float64).sum(dim=0)


def window_mean_around_median(s: torch.Tensor, k: int) -> torch.Tensor:
    """Like ``window_sum_sorted`` divided by k, for a row-sorted (c, n) tensor (each row one
    coordinate's sorted values): the mean (float64, (c,)) of the k values of each row closest
    to its median, ties to the lower value."""
    return window_sum_sorted(s.T, k) / k


def sum_rows64(s: torch.Tensor, buf: torch.Tensor | None = None) -> torch.Tensor:
    """Column sums (c,) float64 of an (m, c) tensor, accumulated in float64 (through ``buf``,
    a float64 scratch tensor of at least m * c entries, when given)."""
    if s.dtype == torch.float64:
        return s.sum(dim=0)
    m, c = s.shape
    if buf is None:
        return s.to(torch.float64).sum(dim=0)
    return buf[: m * c].view(m, c).copy_(s).sum(dim=0)
