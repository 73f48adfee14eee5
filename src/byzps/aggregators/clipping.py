"""Static L2-norm clipping (pre-aggregator)."""

from __future__ import annotations

import torch

from ._base import F_PARAM, Param, PreAggregator
from ._common import column_chunks, row_norms


def scale_rows(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x * factor[:, None]`` computed in float64 chunks, returned in x's dtype; rows whose
    factor is exactly 1 are returned unchanged bit for bit."""
    n, d = x.shape
    out = torch.empty_like(x)
    f64 = factor.to(torch.float64)[:, None]
    for start, stop in column_chunks(n, d):
        c = x[:, start:stop].to(torch.float64, copy=True)
        out[:, start:stop].copy_(c.mul_(f64))
    return out


class Clipping(PreAggregator):
    """``clipping``: scale every row whose L2 norm exceeds ``threshold`` down to that norm.

    Definition: ``y_i = x_i * min(1, threshold / ||x_i||_2)``. Rows within the threshold are
    returned unchanged; norms are computed in float64 (no overflow for float32 rows).

    Parameters: ``threshold`` (> 0, default 1.0); ``f`` (int >= 0, default 0) is accepted for a
    uniform interface and not used.

    Precondition: n >= 1. Output rows: m = n. Complexity: O(n d) time; one float64 chunk of
    extra memory besides the (n, d) output.

    Rows holding NaN/Inf come out as all-NaN rows (see ``PreAggregator``).
    Shapes and dtypes: (n, d) float32/float64 -> (n, d) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape or
    when every row holds NaN/Inf.
    """

    name = "clipping"
    PARAMS = {
        "f": F_PARAM,
        "threshold": Param("float", 1.0, "largest L2 norm a row may keep", minimum=0.0,
                           strict=True),
    }

    threshold: float

    def _transform(self, x: torch.Tensor, f: int) -> torch.Tensor:
        norms = row_norms(x)
        factor = torch.where(norms > self.threshold,
                             self.threshold / norms.clamp(min=self.threshold), 1.0)
        return scale_rows(x, factor)
