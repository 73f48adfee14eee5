"""Plain averaging (the non-robust baseline)."""

from __future__ import annotations

import torch

from ._base import Aggregator, Breakdown
from ._reduce import mean_rows


class Mean(Aggregator):
    """``mean``: the coordinate-wise average of the rows.

    Definition: ``out = (1/n) * sum_i x_i``.

    Parameters: ``f`` (int >= 0, default 0) is accepted for a uniform interface; the mean
    tolerates no Byzantine row (a single row can move it arbitrarily far), so ``warning(n)``
    says so when f > 0.

    Precondition: n >= 1. Complexity: O(n d) time; one float64 chunk of extra memory (the sum is
    accumulated in float64, so the mean of identical float32 rows is exactly that row).

    Shapes and dtypes: (n, d) float32/float64 on any device -> (d,) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape or
    when every row holds NaN/Inf (such rows are dropped before averaging).
    """

    #: f = 0 only (its guarantee): the mean of the rows lies in their bounding box
    BREAKDOWN = Breakdown("box")

    name = "mean"

    def _guarantee(self, n: int, f: int) -> str | None:
        if f > 0:
            return "the mean is not robust: one Byzantine row can move it arbitrarily far"
        return None

    _fast_path = True

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        return mean_rows(x, check=check)
