"""Nearest neighbour mixing (Allouah et al. 2023), pre-aggregator."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _chunks
from ._base import F_PARAM, Breakdown, PreAggregator
from ._chunks import chunk_columns, column_chunks, empty_output, for_each_part
from ._distances import pairwise_sq_dists
from ._reduce import mean_rows


class NNM(PreAggregator):
    """``nnm``: replace every row by the mean of its n - f nearest rows (itself included).

    Definition: for each i, let N_i be the n - f rows closest to x_i in Euclidean distance,
    x_i itself always included (ties by index); ``y_i = (1/(n-f)) sum_{j in N_i} x_j``.
    Distances are computed in float64 on rows centred on a central data row (translation
    invariant); the sums are accumulated in float64.

    Parameters: ``f`` (int >= 0, default 0).

    Precondition: n > f (else ValueError); the paper's analysis assumes n > 2f, otherwise
    ``warning(n)`` says so. Output rows: m = n.

    Complexity: O(n^2 d) time (distances and the mixing product), O(n^2) plus one chunk of
    extra memory besides the (n, d) output.

    Source: Y. Allouah, S. Farhadkhani, R. Guerraoui, N. Gupta, R. Pinot, J. Stephan, "Fixing
    by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity", AISTATS 2023.

    Rows holding NaN/Inf come out as all-NaN rows (see ``PreAggregator``).
    Shapes and dtypes: (n, d) float32/float64 -> (n, d) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape,
    n <= f, or when every row holds NaN/Inf.
    """

    #: n > 2f: an honest row's n - f nearest rows are within Delta of it (it has n - f - 1 or
    #: more honest neighbours that close), so its output row is within Delta of it
    BREAKDOWN = Breakdown("ball", spread=1.0)

    name = "nnm"
    PARAMS = {"f": F_PARAM}

    def _requirement(self, n: int, f: int) -> str | None:
        if n <= f:
            return f"nnm averages n - f neighbours and needs n > f (n={n}, f={f})"
        return None

    def _guarantee(self, n: int, f: int) -> str | None:
        if n <= 2 * f:
            return "nearest neighbour mixing's analysis assumes n > 2f"
        return None

    def neighbours(self, x: torch.Tensor, f: int | None = None,
                   check: bool = False) -> torch.Tensor:
        """Indices (n, n - f) of each row's nearest rows, itself first (with ``check``,
        ``NonFiniteInput`` is raised when x holds NaN/Inf)."""
        f = self.f if f is None else f
        n = x.shape[0]
        dist = pairwise_sq_dists(x, check)
        dist.fill_diagonal_(-1.0)  # each row is its own first neighbour
        return torch.sort(dist, dim=1, stable=True).indices[:, : n - f]

    _fast_path = True

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        n, d = x.shape
        k = n - f
        if k == n:
            # every row becomes the mean (the sum of float64 rows reveals NaN/Inf)
            mean = mean_rows(x, check=check)
            return empty_output(tuple(x.shape), x).copy_(mean.expand(n, d))
        mix = torch.zeros(n, n, dtype=torch.float64, device=x.device)
        mix.scatter_(1, self.neighbours(x, f, check), 1.0)
        out = empty_output(tuple(x.shape), x)
        # small buffers: the output already takes n x d
        elements = max(1, _chunks.CHUNK_ELEMENTS // 4)
        step = chunk_columns(n, d, elements)

        def part(ranges: Sequence[tuple[int, int]]) -> None:
            # each column chunk's product is independent: parts may run on other threads
            buf = torch.empty(2 * n * step, dtype=torch.float64, device=x.device)
            for start, stop in ranges:
                b = stop - start
                c = buf[: n * b].view(n, b).copy_(x[:, start:stop])
                mixed = buf[n * step : n * step + n * b].view(n, b)
                out[:, start:stop].copy_(torch.mm(mix, c, out=mixed).div_(k))

        for_each_part(list(column_chunks(n, d, elements)), part)
        return out
