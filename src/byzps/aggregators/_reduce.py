"""Accurate, overflow-free reductions over rows: means accumulated in float64, row norms, a
mean with each row's distance to it, and an exact comparison of two sums of float64 values.

Means of float32 rows are accumulated in float64, so the mean of identical float32 rows is that
row exactly and 1e38-sized rows do not overflow; order tests on values spanning more than
2**53 are decided exactly (:func:`sums_less`, with Knuth's two-sum).
"""

from __future__ import annotations

import torch

from ._chunks import chunk_columns, chunks64, column_chunks
from ._finite import NonFiniteInput, all_finite


def mean_rows(
    x: torch.Tensor, rows: torch.Tensor | None = None, check: bool = False
) -> torch.Tensor:
    """Mean of the rows of ``x`` (n, d) -> (d,) in x's dtype, accumulated in float64; with
    ``rows`` (int64 indices, m of them) the mean of those rows only.

    For float32 input the float64 sum of up to 2**29 rows is exact, so the mean of identical rows
    is that row exactly and no finite input overflows. For float64 input a sum that overflows is
    recomputed as the sum of ``row / m``. One pass over column chunks (converted to float64 in
    a buffer allocated once); the rows of a subset are gathered chunk by chunk, or, when they
    are at least half of the rows, summed as a 0/1-weighted matrix-vector product over all rows.
    With ``check``, raises ``NonFiniteInput`` when the result is not finite (for float32 input:
    exactly when a summed row holds NaN/Inf).
    """
    n, d = x.shape
    m = n if rows is None else int(rows.numel())
    weights = None
    if rows is not None and m < n and 2 * m >= n:
        weights = torch.zeros(n, dtype=torch.float64, device=x.device)
        weights[rows] = 1.0
    gather = rows if weights is None else None   # the subset to gather chunk by chunk
    k = m if gather is not None else n
    out = torch.empty(d, dtype=torch.float64, device=x.device)
    step = chunk_columns(k, d)
    buf = torch.empty(k * step, dtype=torch.float64, device=x.device)
    for start in range(0, d, step):
        stop = min(d, start + step)
        c = buf[: k * (stop - start)].view(k, stop - start)
        if gather is not None and x.dtype == torch.float64:
            torch.index_select(x[:, start:stop], 0, gather, out=c)
        elif gather is not None:
            c.copy_(x[gather, start:stop])
        else:
            c.copy_(x[:, start:stop])
        if weights is None:
            torch.sum(c, dim=0, out=out[start:stop])
        else:
            torch.mv(c.T, weights, out=out[start:stop])
    out.div_(m)
    if not all_finite(out):
        if check:
            raise NonFiniteInput
        if x.dtype == torch.float64:
            sel = x if rows is None else x[rows]
            for start, stop in column_chunks(m, d):
                torch.sum(sel[:, start:stop] / m, dim=0, out=out[start:stop])
    return out.to(x.dtype)


def row_norms(
    x: torch.Tensor, center: torch.Tensor | None = None, check: bool = False
) -> torch.Tensor:
    """Euclidean norms (n,) float64 of the rows of ``x - center`` (center (d,) or None).

    Without a centre: one ``torch.linalg.vector_norm`` in x's dtype; rows whose norm came out
    non-finite (squares overflowed) or below 1e-18 (squares may have underflowed) are redone
    in float64. With a centre: float64 column chunks (subtraction and conversion in one pass,
    then one norm pass). Either way rows whose float64 squares overflow are rescaled, so the
    result is finite for every finite input. With ``check``, a non-finite norm raises
    ``NonFiniteInput`` instead (a row holding NaN/Inf always has one).
    """
    n, d = x.shape
    if center is None:
        norms = torch.linalg.vector_norm(x, dim=1).to(torch.float64)
        redo = ~torch.isfinite(norms) | (norms < 1e-18)
        if bool(redo.any()):
            for i in torch.nonzero(redo).flatten().tolist():
                norms[i] = _row_norm64(x[i])
            if check and not bool(torch.isfinite(norms).all()):
                raise NonFiniteInput
        return norms
    sq = torch.zeros(n, dtype=torch.float64, device=x.device)
    for _, _, c in chunks64(x, center):
        sq.add_(torch.linalg.vector_norm(c, dim=1).square_())
    norms = sq.sqrt_()
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):  # NaN/Inf rows, or float64 rows with entries beyond ~1e154
        if check:
            raise NonFiniteInput
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


def mean_and_distances(
    x: torch.Tensor, check: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, dist)``: the mean z (d,) float64 of the rows (float64 sums) and the Euclidean
    distances dist (n,) float64 of the rows to it, in one pass over float64 column chunks
    (each chunk's mean is known once the chunk is summed). Returns non-finite values where
    float64 overflowed; with ``check``, raises ``NonFiniteInput`` instead (always when x holds
    NaN/Inf)."""
    n, d = x.shape
    z = torch.empty(d, dtype=torch.float64, device=x.device)
    sq = torch.zeros(n, dtype=torch.float64, device=x.device)
    for start, stop, c in chunks64(x):
        zc = torch.sum(c, dim=0, out=z[start:stop]).div_(n)
        c.sub_(zc)
        sq.add_(torch.linalg.vector_norm(c, dim=1).square_())
    dist = sq.sqrt_()
    if check and not (all_finite(dist) and all_finite(z)):
        raise NonFiniteInput
    return z, dist


def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Error-free sum (Knuth's TwoSum): ``(s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e``
    exactly, elementwise (float64 tensors of one shape, or broadcastable; exact as long as
    no sum overflows)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)).add_(b - bb)


def sums_less(p: torch.Tensor, q: torch.Tensor, r: torch.Tensor,
              t: torch.Tensor) -> torch.Tensor:
    """Boolean tensor of ``p + q < r + t`` decided in exact arithmetic (float32 or float64
    arguments, broadcast together; the sums are formed in float64).

    Rounding to nearest is monotone, so ``fl(p + q) < fl(r + t)`` implies the exact inequality;
    only where the two rounded sums are equal is the answer decided by the rounding errors,
    which TwoSum gives exactly (``_two_sum``). Rounded arithmetic alone gets this wrong as soon
    as the values span more than 2**53 (e.g. ``-2 + 1e17 < 0 + 1e17`` rounds to equality).
    Float32 values cannot overflow a float64 sum; when a sum of float64 values does (beyond
    about 8.9e307) every value is halved first, which is exact except for subnormal values.
    Cost: about three elementwise passes over p and q (more only where rounded sums tie).
    """
    f64 = torch.float64
    wide = any(v.dtype == f64 for v in (p, q, r, t))
    p, r = p.to(f64), r.to(f64)  # exact; no copy for float64
    s1, s2 = p + q, r + t  # float32 q, t are promoted exactly
    if wide and not (all_finite(s1) and all_finite(s2)):
        p, q, r, t = p * 0.5, q.to(f64) * 0.5, r * 0.5, t.to(f64) * 0.5
        s1, s2 = p + q, r + t
    less = s1 < s2
    tie = s1 == s2
    if bool(tie.any()):
        e1 = _two_sum(p, q.to(f64))[1]
        e2 = _two_sum(r, t.to(f64))[1]
        less |= tie & (e1 < e2)
    return less
