"""Geometric median by the smoothed Weiszfeld algorithm (RFA, Pillutla et al. 2022)."""

from __future__ import annotations

import math

import torch

from ._base import Aggregator, F_PARAM, Param
from ._common import (
    all_finite,
    chunks64,
    mean_and_distances,
    median_and_distances,
    row_norms,
)

#: the mean is the start point unless a row is farther from it than this many times the
#: median distance (then the coordinate-wise median is)
_MEAN_START_SLACK = 4.0

#: a final iterate within this many times max(eps, tol * g / n) of a row triggers the test
#: whether that row is the exact geometric median
_SNAP = 100.0


class GeometricMedian(Aggregator):
    """``geometric_median``: approximate ``argmin_z sum_i ||z - x_i||_2``.

    Definition (smoothed Weiszfeld, RFA): start from z_0 and iterate
    ``beta_i = 1 / max(eps, ||z_t - x_i||)``, ``z_{t+1} = sum_i beta_i x_i / sum_i beta_i``.
    Start: the mean of the rows, as in RFA, unless a row lies more than 4 times the median
    distance from it (an outlier pulled the mean away: Weiszfeld would then need many
    iterations to walk back), in which case the coordinate-wise median (even count: mean of
    the middle pair) is used; the choice changes how many iterations run, not the point they
    converge to. The smoothing ``eps`` keeps every weight finite (no division by zero when z_t
    lands on a row). It stops after ``max_iter`` iterations or once a step moves z by at most
    ``tol * g(z) / n``, where ``g(z) = sum_i ||z - x_i||`` (a step relative to the mean
    distance, so the stopping rule depends neither on a translation nor on the scale of the
    gradients); the iterate with the lowest g is returned, except that when it lies within
    100 max(eps, tol g / n) of a row x_k and x_k passes the optimality test of Vardi and Zhang
    (``|| sum_{x_i != x_k} (x_i - x_k) / ||x_i - x_k|| || <= #{i: x_i = x_k}``), x_k itself
    is returned exactly (Weiszfeld converges only slowly to an optimum at a data point).
    When all rows coincide g(z_0) = 0 and that row is returned exactly (no iteration runs; the
    float64 mean of identical float32 rows is exact).

    Parameters: ``f`` (int >= 0, default 0; does not change the computation), ``tol`` (> 0,
    default 1e-6), ``max_iter`` (int >= 1, default 100), ``eps`` (> 0, default 1e-8: smoothing
    distance nu of RFA, in the units of the gradients).

    Precondition: n >= 1 to run; the breakdown point is 1/2, so the guarantee needs n > 2f,
    otherwise ``warning(n)`` says so.

    Complexity: one pass for the mean and the distances to it (plus, when the median start is
    needed, the coordinate-wise median, see ``coordinate_median``), then O(n d) per iteration
    (one fused pass over float64 column chunks computes the step and the next distances),
    O(n d * iterations) in all; a few chunks of extra memory.

    Source: K. Pillutla, S. M. Kakade, Z. Harchaoui, "Robust Aggregation for Federated
    Learning", IEEE Trans. Signal Processing 70 (2022) (RFA); E. Weiszfeld (1937); Y. Vardi,
    C.-H. Zhang, "The multivariate L1-median and associated data depth", PNAS 97 (2000).

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

    _fast_path = True

    def _aggregate(self, x: torch.Tensor, f: int) -> torch.Tensor:
        return self._run(x, check=False)

    def _aggregate_checked(self, x: torch.Tensor, f: int) -> torch.Tensor:
        return self._run(x, check=True)

    def _run(self, x: torch.Tensor, check: bool) -> torch.Tensor:
        n, d = x.shape
        # the mean and the distances to it: one pass (and it reveals NaN/Inf rows)
        z, dist = mean_and_distances(x, check)
        if not (all_finite(dist) and all_finite(z)) or float(dist.max()) > _MEAN_START_SLACK * \
                float(dist.median()):
            z, dist = median_and_distances(x)
        g = float(dist.sum())
        best_z, best_g, best_dist = z, g, dist
        for _ in range(self.max_iter):
            if g == 0.0:
                break
            w = 1.0 / torch.clamp(dist, min=self.eps)
            p = w / w.sum()  # normalised weights: the step cannot overflow
            z_new = torch.empty_like(z)
            sq = torch.zeros(n, dtype=torch.float64, device=x.device)
            step_sq = torch.zeros((), dtype=torch.float64, device=x.device)
            for start, stop, c in chunks64(x):  # c = x (float64)
                zc = torch.mv(c.T, p, out=z_new[start:stop])  # sum_i p_i x_i
                c.sub_(zc)  # x - z_new
                sq.add_(torch.linalg.vector_norm(c, dim=1).square_())
                step = zc - z[start:stop]
                step_sq += step @ step
            moved = math.sqrt(float(step_sq))
            limit = self.tol * g / n
            dist = sq.sqrt_()
            if not all_finite(dist):
                dist = row_norms(x, z_new)
            z, g = z_new, float(dist.sum())
            if g < best_g:
                best_z, best_g, best_dist = z, g, dist
            if not moved > limit:
                break
        if best_g > 0.0:
            # Weiszfeld only creeps towards an optimum that is a data row: when it ended next to
            # a row, test that row for optimality and return it exactly if it is the median
            k = int(torch.argmin(best_dist))
            near = _SNAP * max(self.eps, self.tol * best_g / n)
            if float(best_dist[k]) <= near and row_is_geometric_median(x, k):
                return x[k].clone()
        return best_z.to(x.dtype)


def row_is_geometric_median(x: torch.Tensor, k: int) -> bool:
    """Whether row k of x (n, d) minimises ``sum_i ||z - x_i||`` (Vardi & Zhang 2000): with m
    rows equal to x_k, iff ``|| sum_{x_i != x_k} (x_i - x_k) / ||x_i - x_k|| || <= m``.
    Two passes over float64 column chunks (distances, then the weighted sum)."""
    n, d = x.shape
    r = row_norms(x, x[k])  # exact zeros for the rows equal to x_k
    same = r == 0.0
    w = torch.where(same, 0.0, 1.0 / torch.where(same, 1.0, r))
    sq = 0.0
    for _, _, c in chunks64(x, x[k]):
        u = w @ c
        sq += float(u @ u)
    return math.sqrt(sq) <= int(same.sum())
