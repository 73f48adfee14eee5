"""Coordinate-wise trimmed mean (Yin et al. 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._base import Aggregator, Breakdown
from ._chunks import for_each_part
from ._sorting import sort_blocks, sorted_column_chunks, sum_rows64


class TrimmedMean(Aggregator):
    """``trimmed_mean``: per coordinate, drop the f smallest and f largest values, average the
    remaining n - 2f.

    Definition: with ``v_(1) <= ... <= v_(n)`` the sorted values of coordinate j,
    ``out[j] = (1/(n-2f)) * sum_{k=f+1}^{n-f} v_(k)``.

    Parameters: ``f`` (int >= 0, default 0): values trimmed on each side.

    Precondition: n > 2f (else ValueError). Complexity: O(d N log^2 N) time for N = n rounded
    up to a power of two (a bitonic sorting network over column blocks, see
    ``_sorting.sorted_column_chunks``), a few blocks of extra memory; the kept values are summed
    in float64.

    Source: D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates", ICML 2018.

    Shapes and dtypes: (n, d) float32/float64 -> (d,) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape,
    n <= 2f, or when every row holds NaN/Inf (such rows are dropped, f lowered by their count).
    """

    #: with n > 2f every value kept lies between two honest values (Yin et al. 2018)
    BREAKDOWN = Breakdown("box")

    name = "trimmed_mean"

    def _requirement(self, n: int, f: int) -> str | None:
        if n <= 2 * f:
            return f"trimmed_mean needs n > 2f (n={n} must exceed 2f={2 * f})"
        return None

    _fast_path = True

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        n, d = x.shape
        out = torch.empty(d, dtype=x.dtype, device=x.device)

        def part(blocks: Sequence[tuple[int, int]]) -> None:
            # column blocks are independent: parts of them may run on other threads
            buf = None
            for start, stop, s in sorted_column_chunks(x, check=check, blocks=blocks):
                kept = s[f : n - f]
                if buf is None and x.dtype != torch.float64:
                    buf = torch.empty(kept.numel(), dtype=torch.float64, device=x.device)
                out[start:stop] = sum_rows64(kept, buf).div_(n - 2 * f)

        for_each_part(sort_blocks(n, d), part)
        return out
