"""MoNNA: mean of the nearest neighbours of a trusted vector (Farhadkhani et al. 2023)."""

from __future__ import annotations

import torch

from ._base import F_PARAM, Aggregator, Breakdown, Param
from ._reduce import mean_rows, row_norms


class MoNNA(Aggregator):
    """``monna``: average the n - f rows nearest to the pivot row.

    Definition: with p the pivot row index, N_p the n - f rows closest to x_p in Euclidean
    distance (x_p itself included, at distance 0; ties by index),
    ``out = (1/(n-f)) sum_{j in N_p} x_j``.

    In the paper every honest node of a peer-to-peer system pivots on its own vector, which it
    trusts. A parameter server has no vector of its own, so ``pivot`` names the row (the
    position among the rows the rule receives, i.e. among the accepted workers in id order)
    that is trusted; the guarantee holds only when that row is honest. Rows holding NaN/Inf
    are dropped before the rule runs, which shifts the positions after them.

    Parameters: ``f`` (int >= 0, default 0), ``pivot`` (int >= 0, default 0).

    Precondition: n > f and pivot < n, else ValueError. The paper's analysis assumes n > 2f and
    an honest pivot, which the PS cannot check, so ``warning(n)`` says so whenever f > 0.

    Complexity: O(n d) time (distances to one row, then one averaging pass), one float64 chunk
    of extra memory.

    Source: S. Farhadkhani, R. Guerraoui, N. Gupta, L.-N. Hoang, R. Pinot, J. Stephan, "Robust
    Collaborative Learning with Linear Gradient Overhead", ICML 2023.

    Shapes and dtypes: (n, d) float32/float64 -> (d,) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape,
    n <= f, pivot >= n, or when every row holds NaN/Inf.
    """

    name = "monna"
    PARAMS = {
        "f": F_PARAM,
        "pivot": Param("int", 0, "index of the trusted row whose neighbours are averaged",
                       minimum=0),
    }

    pivot: int

    #: within the guarantee the PS can rely on only f = 0 (an honest pivot cannot be checked,
    #: see ``warning``): the mean of all rows, inside their bounding box
    BREAKDOWN = Breakdown("box")

    def _requirement(self, n: int, f: int) -> str | None:
        if n <= f:
            return f"monna averages n - f neighbours and needs n > f (n={n}, f={f})"
        if self.pivot >= n:
            return f"monna's pivot row {self.pivot} must be < n = {n}"
        return None

    def _guarantee(self, n: int, f: int) -> str | None:
        if n <= 2 * f:
            return "MoNNA's analysis assumes n > 2f"
        if f > 0:
            return (f"MoNNA's guarantee needs its pivot row (position {self.pivot}) to be "
                    f"honest, which the PS cannot check")
        return None

    def neighbours(self, x: torch.Tensor, f: int) -> torch.Tensor:
        """Indices (n - f,) int64, ascending, of the pivot's n - f nearest rows."""
        dist = row_norms(x, x[self.pivot])
        dist[self.pivot] = -1.0  # itself first, even next to an identical row
        near = torch.sort(dist, stable=True).indices[: x.shape[0] - f]
        return torch.sort(near).values

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        near = self.neighbours(x, f)
        return mean_rows(x, near)
