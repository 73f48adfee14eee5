"""Geometric median by the smoothed Weiszfeld algorithm (RFA, Pillutla et al. 2022)."""

from __future__ import annotations

import math

import torch

from ._base import Aggregator, F_PARAM, Param
from ._common import chunks64, coordinate_median, row_norms


class GeometricMedian(Aggregator):
    """``geometric_median``: approximate ``argmin_z sum_i ||z - x_i||_2``.

    Definition (smoothed Weiszfeld, RFA): start from the coordinate-wise median z_0 (even
    count: mean of the middle pair) and iterate
    ``beta_i = 1 / max(eps, ||z_t - x_i||)``, ``z_{t+1} = z_t + sum_i beta_i (x_i - z_t) / sum_i
    beta_i``. The smoothing ``eps`` keeps every weight finite (no division by zero when z_t
    lands on a row). It stops after ``max_iter`` iterations or once a step moves z by at most
    ``tol * g(z) / n``, where ``g(z) = sum_i ||z - x_i||`` (a step relative to the mean
    distance, so the stopping rule depends neither on a translation nor on the scale of the
    gradients); the iterate with the lowest g is returned.
    When all rows coincide g(z_0) = 0 and that row is returned exactly; the update is written as
    ``z + step`` so a zero step leaves z exactly unchanged.

    Parameters: ``f`` (int >= 0, default 0; does not change the computation), ``tol`` (> 0,
    default 1e-6), ``max_iter`` (int >= 1, default 100), ``eps`` (> 0, default 1e-8: smoothing
    distance nu of RFA, in the units of the gradients).

    Precondition: n >= 1 to run; the breakdown point is 1/2, so the guarantee needs n > 2f,
    otherwise ``warning(n)`` says so.

    Complexity: O(n d) per iteration (one fused pass over float64 column chunks computes the
    step and the next distances), O(n d * iterations) in all; one chunk of extra memory.

    Source: K. Pillutla, S. M. Kakade, Z. Harchaoui, "Robust Aggregation for Federated
    Learning", IEEE Trans. Signal Processing 70 (2022) (RFA); E. Weiszfeld (1937).

    Shapes and dtypes: (n, d) float32/float64 -> (d,) same dtype/device; the iterate is kept in
    float64.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape or
    when every row holds NaN/Inf (such rows are dropped, f lowered by their count).
    """

    name = "geometric_median"
    PARAMS = {
        "f": F_PARAM,
        "tol": Param("float", 1e-6, "stop when a step is at most tol * mean distance",
                     minimum=0.0, strict=True),
        "max_iter": Param("int", 100, "maximum number of Weiszfeld iterations", minimum=1),
        "eps": Param("float", 1e-8, "smoothing distance (weights are 1/max(eps, distance))",
                     minimum=0.0, strict=True),
    }

    tol: float
    max_iter: int
    eps: float

    def _guarantee(self, n: int, f: int) -> str | None:
        if n <= 2 * f:
            return "the geometric median's breakdown point is 1/2: its guarantee needs n > 2f"
        return None

    def _aggregate(self, x: torch.Tensor, f: int) -> torch.Tensor:
        n, d = x.shape
        z = coordinate_median(x).to(torch.float64)
        dist = row_norms(x, z)
        g = float(dist.sum())
        best_z, best_g = z, g
        for _ in range(self.max_iter):
            if g == 0.0:
                break
            w = 1.0 / torch.clamp(dist, min=self.eps)
            p = w / w.sum()  # normalised weights: the step cannot overflow
            z_new = torch.empty_like(z)
            sq = torch.zeros(n, dtype=torch.float64, device=x.device)
            step_sq = torch.zeros((), dtype=torch.float64, device=x.device)
            for start, stop, c in chunks64(x):
                c.sub_(z[start:stop])  # x - z
                step = p @ c
                z_new[start:stop] = z[start:stop] + step
                c.sub_(step)  # x - z_new
                sq.add_(c.square_().sum(dim=1))
                step_sq += step @ step
            moved = math.sqrt(float(step_sq))
            limit = self.tol * g / n
            dist = sq.sqrt_()
            if not bool(torch.isfinite(dist).all()):
                dist = row_norms(x, z_new)
            z, g = z_new, float(dist.sum())
            if g < best_g:
                best_z, best_g = z, g
            if not moved > limit:
                break
        return best_z.to(x.dtype)
