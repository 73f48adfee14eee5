"""Comparative gradient elimination (Gupta, Liu and Vaidya 2021)."""

from __future__ import annotations

import torch

from ._base import F_PARAM, Aggregator, Breakdown, Param
from ._reduce import mean_rows, row_norms


class CGE(Aggregator):
    """``cge``: drop the f gradients with the largest Euclidean norms, average the rest.

    Definition: sort the rows by norm ``||x_i||_2`` (ties: lower index first) and keep the
    n - f smallest, S; ``out = (1/(n-f)) sum_{i in S} x_i`` (``reduce="mean"``, default) or
    ``sum_{i in S} x_i`` (``reduce="sum"``, the paper's filter). The two differ only by the
    factor n - f, i.e. by the step size; the mean keeps the scale of one gradient, so a
    learning rate tuned for the other rules fits it too.

    Parameters: ``f`` (int >= 0, default 0), ``reduce`` ("mean" | "sum", default "mean").

    Precondition: n > f (at least one row kept), else ValueError. The paper's guarantee needs
    a minority of Byzantine workers (and more, depending on the cost functions);
    ``warning(n)`` reports n <= 2f.

    Complexity: O(n d) time (the norms, then one averaging pass), one float64 chunk of extra
    memory.

    Source: N. Gupta, S. Liu, N. H. Vaidya, "Byzantine Fault-Tolerant Distributed Machine
    Learning with Norm-Based Comparative Gradient Elimination", DSN Workshops 2021 (also N.
    Gupta, N. H. Vaidya, "Fault-Tolerance in Distributed Optimization: The Case of
    Redundancy", PODC 2020).

    Shapes and dtypes: (n, d) float32/float64 -> (d,) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape,
    n <= f, or when every row holds NaN/Inf (such rows are dropped, f lowered by their count).
    """

    name = "cge"
    PARAMS = {
        "f": F_PARAM,
        "reduce": Param("choice", "mean", "average (mean) or add up (sum, as in the paper) "
                        "the n - f kept gradients", choices=("mean", "sum")),
    }

    reduce: str

    #: n > f: the n - f smallest norms are at most the largest honest norm M (at least n - f
    #: rows are honest), so the mean of the kept rows has norm <= M; with the origin counted
    #: as an honest row (M <= Delta, ||c|| <= R): ||out - c|| <= R + Delta (``reduce="mean"``)
    BREAKDOWN = Breakdown("ball", spread=1.0, origin=True)

    def _requirement(self, n: int, f: int) -> str | None:
        if n <= f:
            return f"cge keeps the n - f smallest-norm gradients and needs n > f (n={n}, f={f})"
        return None

    def _guarantee(self, n: int, f: int) -> str | None:
        if n <= 2 * f:
            return "comparative gradient elimination needs fewer than half Byzantine gradients"
        return None

    def kept(self, x: torch.Tensor, f: int) -> torch.Tensor:
        """Indices (n - f,) int64, ascending, of the rows that survive the norm filter."""
        norms = row_norms(x)
        order = torch.sort(norms, stable=True).indices[: x.shape[0] - f]
        return torch.sort(order).values

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        keep = self.kept(x, f)
        out = mean_rows(x, keep)
        if self.reduce == "sum":
            out = (out.to(torch.float64) * keep.numel()).to(x.dtype)
        return out
