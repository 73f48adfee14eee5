"""Mean around the median (Xie et al. 2018)."""

from __future__ import annotations

import torch

from ._base import Aggregator, Breakdown
from ._sorting import sorted_column_chunks, window_sum_sorted


class MeaMed(Aggregator):
    """``meamed``: per coordinate, the mean of the n - f values closest to the median.

    Definition: for coordinate j with median m_j (even count: mean of the two middle values),
    ``out[j]`` is the average of the n - f values x_i[j] with the smallest |x_i[j] - m_j|. Ties
    (a value below and one above m_j at the same distance) go to the lower value, i.e. the
    selected values are the n - f smallest of the key (|v - m_j|, v); they form a window of the
    sorted values, which is how it is computed.

    Parameters: ``f`` (int >= 0, default 0).

    Precondition: n > f to run (else ValueError); the guarantee needs n > 2f, otherwise
    ``warning(n)`` says so.

    Complexity: O(d N log^2 N) time for N = n rounded up to a power of two (a bitonic sorting
    network over column blocks) plus O(d n) to pick the window; a few blocks of extra memory;
    sums in float64.

    Source: C. Xie, O. Koyejo, I. Gupta, "Generalized Byzantine-tolerant SGD", arXiv:1802.10116
    (2018), "mean around median".

    Shapes and dtypes: (n, d) float32/float64 -> (d,) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape,
    n <= f, or when every row holds NaN/Inf (such rows are dropped, f lowered by their count).
    """

    #: the median lies in the honest range and the n - f values nearest to it are within the
    #: farthest honest value's distance, at most w_j (a Byzantine value just outside the
    #: range can be averaged in, so the box itself does not hold)
    BREAKDOWN = Breakdown("box", spread=1.0)

    name = "meamed"

    def _requirement(self, n: int, f: int) -> str | None:
        if n <= f:
            return f"meamed averages n - f values and needs n > f (n={n}, f={f})"
        return None

    def _guarantee(self, n: int, f: int) -> str | None:
        if n <= 2 * f:
            return "the guarantee of mean-around-median needs n > 2f"
        return None

    _fast_path = True

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        n, d = x.shape
        out = torch.empty(d, dtype=x.dtype, device=x.device)
        buf = None
        for start, stop, s in sorted_column_chunks(x, check=check):
            if buf is None:
                buf = torch.empty((n - f) * s.shape[1], dtype=torch.float64, device=x.device)
            out[start:stop] = window_sum_sorted(s, n - f, buf).div_(n - f)
        return out
