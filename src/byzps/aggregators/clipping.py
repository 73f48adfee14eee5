"""Static L2-norm clipping (pre-aggregator)."""

from __future__ import annotations

import torch

from ._base import F_PARAM, Param, PreAggregator
from ._common import row_norms


#: float32 factors below this would be subnormal or close to it: such rows go through float64
_TINY_FACTOR = 2.0**-100


def scale_rows(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x * factor[:, None]`` in x's dtype, as a new tensor; rows whose factor is exactly 1 are
    returned unchanged bit for bit. When few rows change (ARC), x is copied and only those rows
    are multiplied in place; otherwise one multiplication does it. For float32 rows with a tiny
    factor (huge rows) the product is formed in float64 so it does not lose precision to
    subnormal factors. Extra memory: the output only."""
    n = x.shape[0]
    factor = factor.to(device=x.device, dtype=torch.float64)
    scaled = factor.to(x.dtype)
    rows = torch.nonzero(factor != 1.0).flatten().tolist()
    if 2 * len(rows) > n:
        out = x * scaled[:, None]
    else:
        out = x.clone()
        for i in rows:
            out[i].mul_(scaled[i])
    if x.dtype == torch.float32:
        for i in torch.nonzero(factor < _TINY_FACTOR).flatten().tolist():
            out[i].copy_(x[i].to(torch.float64).mul_(factor[i]))
    return out


class Clipping(PreAggregator):
    """``clipping``: scale every row whose L2 norm exceeds ``threshold`` down to that norm.

    Definition: ``y_i = x_i * min(1, threshold / ||x_i||_2)``. Rows within the threshold are
    returned unchanged; norms that would overflow or underflow in the input dtype are redone
    in float64.

    Parameters: ``threshold`` (> 0, default 1.0); ``f`` (int >= 0, default 0) is accepted for a
    uniform interface and not used.

    Precondition: n >= 1. Output rows: m = n. Complexity: O(n d) time (two passes: norms,
    scaling); O(n) extra memory besides the (n, d) output.

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
