"""Coordinate-wise median (Yin et al. 2018)."""

from __future__ import annotations

import torch

from ._base import Aggregator, Breakdown
from ._sorting import coordinate_median


class CoordinateWiseMedian(Aggregator):
    """``coordinate_wise_median``: per coordinate, the median of the n values.

    Definition: ``out[j] = median(x_1[j], ..., x_n[j])``; for an even count the median is the
    mean of the two middle values (project convention, see DESIGN.md).

    Parameters: ``f`` (int >= 0, default 0); it does not change the computation.

    Precondition: n >= 1 to run; the robustness guarantee needs n > 2f (a majority of honest
    rows), otherwise ``warning(n)`` says so.

    Complexity: O(n d) expected time (selection with ``torch.kthvalue`` / ``torch.topk`` on
    transposed column chunks), one chunk of extra memory.

    Source: D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates", ICML 2018.

    Shapes and dtypes: (n, d) float32/float64 -> (d,) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape or
    when every row holds NaN/Inf (such rows are dropped, f is lowered by their count).
    """

    #: with f < n/2 each coordinate's median lies between two honest values (Yin et al. 2018)
    BREAKDOWN = Breakdown("box")

    name = "coordinate_wise_median"

    def _guarantee(self, n: int, f: int) -> str | None:
        if n <= 2 * f:
            return "the median's guarantee needs n > 2f (a majority of honest gradients)"
        return None

    _fast_path = True

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        return coordinate_median(x, check=check)
