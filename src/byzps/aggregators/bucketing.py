"""Bucketing (Karimireddy, He, Jaggi 2022), pre-aggregator."""

from __future__ import annotations

import math

import torch

from ._base import F_PARAM, Breakdown, Param, PreAggregator, _as_count
from ._calls import CallCounter, call_generator
from ._chunks import chunk_columns, empty_output
from ._finite import NonFiniteInput, as_matrix, nonfinite_rows


class Bucketing(CallCounter, PreAggregator):
    """``bucketing``: shuffle the rows, split them into buckets of s, output the bucket means.

    Definition: for call number t (0, 1, 2, ... counted by the object), draw a permutation
    pi_t of the n rows with a ``torch.Generator`` seeded from (seed, t); bucket b holds rows
    pi_t(b s), ..., pi_t(b s + s - 1) (the last bucket holds the n mod s rest when s does not
    divide n) and becomes the mean of its rows. The permutation depends only on (seed, t, n),
    so a run is reproducible; the call counter is state: ``state_dict()`` ->
    ``{"calls": t}``, restored by ``load_state_dict``, so a resumed run continues the same
    sequence. ``permutation(t, n)`` returns pi_t without advancing the counter.

    Parameters: ``s`` (int >= 1, default 2: bucket size), ``seed`` (int, default 0), ``f``
    (int >= 0, default 0; not used: at most f buckets can hold a Byzantine row, so the
    aggregator that follows keeps the same f on m = ceil(n/s) rows).

    Precondition: n >= 1. Output rows: m = ceil(n / s) (see ``output_rows``); the aggregator
    after it must accept m rows with the same f.

    Complexity: O(n d) time (one pass: each column chunk is gathered in bucket order and
    summed in float64), a few chunks of extra memory besides the (m, d) output.

    Source: S. P. Karimireddy, L. He, M. Jaggi, "Byzantine-Robust Learning on Heterogeneous
    Datasets via Bucketing", ICLR 2022.

    A bucket holding a row with NaN/Inf comes out all-NaN, so the aggregator drops it and lowers
    its f by one per such bucket (each holds at least one faulty row).
    Shapes and dtypes: (n, d) float32/float64 -> (ceil(n/s), d) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape or
    when every row holds NaN/Inf.
    """

    #: a bucket without a Byzantine row is a mean of honest rows; at most b buckets hold one
    BREAKDOWN = Breakdown("box")

    name = "bucketing"
    PARAMS = {
        "f": F_PARAM,
        "s": Param("int", 2, "bucket size", minimum=1),
        "seed": Param("int", 0, "seed of the per-call permutations"),
    }

    s: int
    seed: int
    calls: int

    def output_rows(self, n: int) -> int:
        return math.ceil(_as_count(n, self.name) / self.s)

    def permutation(self, call: int, n: int) -> torch.Tensor:
        """The permutation (CPU, int64) used at call number ``call`` for n rows."""
        return torch.randperm(n, generator=call_generator(self.seed, call))

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = as_matrix(grads, self.name)
            n, d = x.shape
            perm = self.permutation(self.calls, n).to(x.device)
            m = self.output_rows(n)
            bucket_of = torch.empty(n, dtype=torch.long, device=x.device)
            bucket_of[perm] = torch.arange(n, device=x.device) // self.s
            sizes = torch.bincount(bucket_of, minlength=m).to(torch.float64)
            try:
                # no scan for NaN/Inf first: a float64 bucket sum reveals them
                out = _bucket_means_all(x, perm, self.s, m)
            except NonFiniteInput:
                bad = nonfinite_rows(x)
                dropped = int(bad.sum())
                self._require_at_call(n - dropped, max(self.f - dropped, 0), dropped)
                good = torch.nonzero(~bad).flatten() if dropped else None
                out = _bucket_means(x, bucket_of, sizes, m, good, check=False)
                if dropped:
                    out[torch.unique(bucket_of[bad])] = math.nan
            self.calls += 1
            return out


def _bucket_means_all(x: torch.Tensor, perm: torch.Tensor, s: int, m: int) -> torch.Tensor:
    """(m, d) bucket means when every row is used: bucket b holds rows perm[b s : b s + s].
    Per column chunk the rows are gathered in bucket order (input dtype), converted to float64
    and summed over a (buckets, s, chunk) view. Raises ``NonFiniteInput`` when a sum is not
    finite (always when x holds NaN/Inf)."""
    n, d = x.shape
    full = n // s  # buckets of s rows; the last bucket holds the n - full * s other rows
    out = empty_output((m, d), x)
    step = chunk_columns(n, d)
    gathered = torch.empty(n * step, dtype=x.dtype, device=x.device)
    buf = torch.empty(n * step, dtype=torch.float64, device=x.device)
    sums = torch.empty(m * step, dtype=torch.float64, device=x.device)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, d, step):
        stop = min(d, start + step)
        b = stop - start
        g = torch.index_select(x[:, start:stop], 0, perm, out=gathered[: n * b].view(n, b))
        c = buf[: n * b].view(n, b)
        c.copy_(g)
        acc = sums[: m * b].view(m, b)
        if full:
            torch.sum(c[: full * s].view(full, s, b), dim=1, out=acc[:full]).div_(s)
        if full < m:
            torch.sum(c[full * s :], dim=0, out=acc[full]).div_(n - full * s)
        total += acc.sum()
        out[:, start:stop].copy_(acc)
    if not bool(torch.isfinite(total)):
        raise NonFiniteInput
    return out


def _bucket_means(x: torch.Tensor, bucket_of: torch.Tensor, sizes: torch.Tensor, m: int,
                  rows: torch.Tensor | None, check: bool) -> torch.Tensor:
    """(m, d) means of the buckets (row i in bucket ``bucket_of[i]`` of ``sizes`` rows), summed
    in float64 over column chunks (one ``index_add_`` per chunk); only ``rows`` when given.
    With ``check``, raises ``NonFiniteInput`` when a sum is not finite."""
    n, d = x.shape
    k = n if rows is None else int(rows.numel())
    target = bucket_of if rows is None else bucket_of[rows]
    out = empty_output((m, d), x)
    step = chunk_columns(n, d)
    buf = torch.empty(k * step, dtype=torch.float64, device=x.device)
    sums = torch.empty(m * step, dtype=torch.float64, device=x.device)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, d, step):
        stop = min(d, start + step)
        b = stop - start
        c = buf[: k * b].view(k, b)
        c.copy_(x[:, start:stop] if rows is None else x[rows, start:stop])
        acc = sums[: m * b].view(m, b).zero_().index_add_(0, target, c)
        if check:
            total += acc.sum()
        out[:, start:stop].copy_(acc.div_(sizes[:, None]))
    if check and not bool(torch.isfinite(total)):
        raise NonFiniteInput
    return out
