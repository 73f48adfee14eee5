"""Bulyan (El Mhamdi, Guerraoui, Rouault 2018)."""

from __future__ import annotations

import torch

from ._base import Aggregator, Breakdown
from ._distances import pairwise_sq_dists
from ._sorting import sorted_column_chunks, window_sum_sorted
from .krum import krum_order


class Bulyan(Aggregator):
    """``bulyan``: Krum-based selection followed by a coordinate-wise trimmed average.

    Definition: (1) selection: theta = n - 2f rows are chosen one at a time; each time Krum
    (score = sum of squared distances to the n_r - f - 2 nearest other remaining rows, where n_r
    is the number of rows remaining; fewer than one neighbour -> every score 0) is applied to
    the rows not yet chosen and its choice is moved to the selection. Equal scores are ordered
    by total squared distance to the remaining rows, then by index. (2) aggregation: per
    coordinate, the beta = theta - 2f selected values closest to the coordinate-wise median of
    the selection (even count: mean of the middle pair) are averaged; ties between a value
    below and one above the median go to the lower value.

    Parameters: ``f`` (int >= 0, default 0).

    Precondition: n >= 4f + 3 (else ValueError).

    Complexity: O(n^2 d) for the distances (computed once), O(n^3) for the repeated Krum
    selection on the (n, n) distance matrix, O(d theta log^2 theta) for the coordinate-wise
    step (a sorting network); O(n^2) plus a few chunks of extra memory.

    Source: E. M. El Mhamdi, R. Guerraoui, S. Rouault, "The Hidden Vulnerability of
    Distributed Learning in Byzantium", ICML 2018.

    Shapes and dtypes: (n, d) float32/float64 -> (d,) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape,
    n < 4f + 3, or when every row holds NaN/Inf (such rows are dropped, f lowered by their
    count).
    """

    #: as meamed on the theta selected rows (at most f Byzantine among them): the beta values
    #: averaged are within w_j of a median that lies in the honest range
    BREAKDOWN = Breakdown("box", spread=1.0)

    name = "bulyan"

    def _requirement(self, n: int, f: int) -> str | None:
        if n < 4 * f + 3:
            return f"bulyan needs n >= 4f + 3 = {4 * f + 3}"
        return None

    def select(self, x: torch.Tensor, f: int | None = None, check: bool = False) -> torch.Tensor:
        """Indices (sorted) of the theta = n - 2f rows chosen by the Krum phase (with
        ``check``, ``NonFiniteInput`` is raised when x holds NaN/Inf)."""
        f = self.f if f is None else f
        n = x.shape[0]
        dist = pairwise_sq_dists(x, check)
        remaining = torch.arange(n, device=dist.device)
        chosen = []
        for _ in range(n - 2 * f):
            sub = dist[remaining][:, remaining]
            pick = int(krum_order(sub, f)[0])
            chosen.append(int(remaining[pick]))
            remaining = torch.cat([remaining[:pick], remaining[pick + 1 :]])
        return torch.tensor(sorted(chosen), dtype=torch.long, device=x.device)

    _fast_path = True

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        n, d = x.shape
        theta = n - 2 * f
        beta = theta - 2 * f
        idx = self.select(x, f, check)
        out = torch.empty(d, dtype=x.dtype, device=x.device)
        buf = None
        for start, stop, s in sorted_column_chunks(x, idx):
            if buf is None:
                buf = torch.empty(beta * s.shape[1], dtype=torch.float64, device=x.device)
            out[start:stop] = window_sum_sorted(s, beta, buf).div_(beta)
        return out
