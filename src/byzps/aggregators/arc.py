"""Adaptive robust clipping (Allouah et al. 2024), pre-aggregator."""

from __future__ import annotations

import torch

from ._base import F_PARAM, Breakdown, PreAggregator
from ._chunks import empty_output
from ._reduce import row_norms
from .clipping import row_groups, write_scaled


def arc_clipped_count(n: int, f: int) -> int:
    """k = floor(2 (f / n) (n - f)), computed in integers, kept within [0, n - 1]."""
    if n <= 0:
        return 0
    return max(0, min(n - 1, (2 * f * (n - f)) // n))


class ARC(PreAggregator):
    """``arc``: clip the k largest-norm rows to the (k+1)-th largest norm.

    Definition (Allouah et al. 2024, Algorithm "ARC"): let k = floor(2 (f/n) (n - f)) and
    sort the rows by L2 norm, ``||x_pi(1)|| >= ... >= ||x_pi(n)||``; the clipping threshold is
    ``C = ||x_pi(k+1)||`` and every row becomes ``x_i * min(1, C / ||x_i||)``. So the k rows
    of largest norm are scaled down to norm C and the others are unchanged (equal norms at the
    boundary are all kept at C, which is the same thing). With f = 0, k = 0 and nothing changes.

    Parameters: ``f`` (int >= 0, default 0). k is computed from the number of finite rows n'
    and f' = max(f - dropped, 0).

    Precondition: n >= 1 (k <= n/2 < n, so C always exists); the paper assumes f < n/2,
    otherwise ``warning(n)`` says so. Output rows: m = n.

    Complexity: O(n d + n log n) time (one pass computes the norms and copies the rows, then
    the k clipped rows are rescaled); O(n) extra memory besides the output.

    Source: Y. Allouah, R. Guerraoui, N. Gupta, A. Jellouli, G. Rizk, J. Stephan, "The Vital
    Role of Gradient Clipping in Byzantine-Resilient Distributed Learning", arXiv:2405.14432
    (2024).

    Rows holding NaN/Inf come out as all-NaN rows (see ``PreAggregator``).
    Shapes and dtypes: (n, d) float32/float64 -> (n, d) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape or
    when every row holds NaN/Inf.
    """

    #: an honest row is kept or scaled towards 0 (to the (k+1)-th largest norm)
    BREAKDOWN = Breakdown("box", origin=True)

    name = "arc"
    PARAMS = {"f": F_PARAM}

    def _guarantee(self, n: int, f: int) -> str | None:
        if n <= 2 * f:
            return "ARC's analysis assumes f < n/2"
        return None

    _fast_path = True

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        n = x.shape[0]
        k = arc_clipped_count(n, f)
        out = empty_output(tuple(x.shape), x)
        if k == 0:
            if check:  # nothing is clipped, but NaN/Inf rows must still be reported
                for start, stop in row_groups(x):
                    row_norms(x[start:stop], check=check)
            return out.copy_(x)
        # one pass: the norms of a group of rows and its copy into the output (the group is in
        # cache); then only the k clipped rows are rescaled in place
        norms = torch.empty(n, dtype=torch.float64, device=x.device)
        for start, stop in row_groups(x):
            norms[start:stop] = row_norms(x[start:stop], check=check)
            out[start:stop].copy_(x[start:stop])
        c = torch.sort(norms, descending=True).values[k]
        above = norms > c  # these norms are > C >= 0, so the division below is safe
        rows = torch.nonzero(above).flatten()
        if rows.numel():
            factor = c / norms[rows]
            for i, fac in zip(rows.tolist(), factor.tolist()):
                write_scaled(x[i : i + 1], torch.tensor([fac], dtype=torch.float64),
                             out[i : i + 1])
        return out
