"""Static L2-norm clipping (pre-aggregator)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._base import F_PARAM, Breakdown, Param, PreAggregator
from ._chunks import empty_output, for_each_part
from ._reduce import row_norms

#: float32 factors below this would be subnormal or close to it: such rows go through float64
_TINY_FACTOR = 2.0**-100

#: rows are processed in groups of about this many bytes (the group stays in cache between
#: its norm pass and its scaling pass, so the input is read from memory once)
_GROUP_BYTES = 1 << 20


def row_groups(x: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of about ``_GROUP_BYTES`` each (at least one row)."""
    n, d = x.shape
    rows = max(1, _GROUP_BYTES // max(1, d * x.element_size()))
    return [(i, min(n, i + rows)) for i in range(0, n, rows)]


def write_scaled(x: torch.Tensor, factor: torch.Tensor, out: torch.Tensor) -> None:
    """``out = x * factor[:, None]`` for a group of rows (factor float64 (m,)); rows whose
    factor is exactly 1 are copied bit for bit; for float32 rows with a tiny factor (huge rows)
    the product is formed in float64 so it does not lose precision to a subnormal factor."""
    if bool((factor == 1.0).all()):
        out.copy_(x)
        return
    torch.mul(x, factor.to(x.dtype)[:, None], out=out)
    if x.dtype == torch.float32:
        for i in torch.nonzero(factor < _TINY_FACTOR).flatten().tolist():
            out[i].copy_(x[i].to(torch.float64).mul_(factor[i]))


class Clipping(PreAggregator):
    """``clipping``: scale every row whose L2 norm exceeds ``threshold`` down to that norm.

    Definition: ``y_i = x_i * min(1, threshold / ||x_i||_2)``. Rows within the threshold are
    returned unchanged; norms that would overflow or underflow in the input dtype are redone
    in float64.

    Parameters: ``threshold`` (> 0, default 1.0); ``f`` (int >= 0, default 0) is accepted for a
    uniform interface and not used.

    Precondition: n >= 1. Output rows: m = n. Complexity: O(n d) time (norms, then scaling,
    one cache-sized group of rows at a time, so the input is read from memory once); O(n)
    extra memory besides the (n, d) output.

    Rows holding NaN/Inf come out as all-NaN rows (see ``PreAggregator``).
    Shapes and dtypes: (n, d) float32/float64 -> (n, d) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape or
    when every row holds NaN/Inf.
    """

    #: row-wise: an honest row is only scaled towards 0, whatever the other rows hold
    BREAKDOWN = Breakdown("box", origin=True)

    name = "clipping"
    PARAMS = {
        "f": F_PARAM,
        "threshold": Param("float", 1.0, "largest L2 norm a row may keep", minimum=0.0,
                           strict=True),
    }

    threshold: float

    _fast_path = True

    def _factor(self, norms: torch.Tensor) -> torch.Tensor:
        return torch.where(norms > self.threshold,
                           self.threshold / norms.clamp(min=self.threshold), 1.0)

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        # one group of rows at a time: norms, then the scaled copy while the group is in cache
        out = empty_output(tuple(x.shape), x)

        def part(groups: Sequence[tuple[int, int]]) -> None:
            # each group of rows is independent: parts may run on other threads
            for start, stop in groups:
                group = x[start:stop]
                write_scaled(group, self._factor(row_norms(group, check=check)),
                             out[start:stop])

        for_each_part(row_groups(x), part)
        return out
