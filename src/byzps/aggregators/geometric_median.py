"""Geometric median by the smoothed Weiszfeld algorithm (RFA, Pillutla et al. 2022)."""

from __future__ import annotations

import math

import torch

from ._base import F_PARAM, Aggregator, Breakdown, Param
from ._chunks import chunks64
from ._finite import all_finite
from ._reduce import mean_and_distances, row_norms
from ._sorting import median_and_distances

#: the mean stays the start point only while the subgradient of the objective there has norm
#: at most this (see ``GeometricMedian``): far from the optimum it is at least about 1
_MEAN_START_GRADIENT = 0.5

#: a final iterate within this many times max(eps, tol * r(z)) of a row triggers the test
#: whether that row is the exact geometric median
_SNAP = 100.0


class GeometricMedian(Aggregator):
    """``geometric_median``: ``argmin_z g(z)``, ``g(z) = sum_i ||z - x_i||_2``, by Weiszfeld's
    algorithm with the modification of Vardi and Zhang at data points.

    Iteration: with distances ``delta_i = ||z_t - x_i||``, the rows within ``eps`` of z_t are
    treated as lying at z_t (their number is eta); the others get weights
    ``w_i = 1 / delta_i`` and ``T = sum_i w_i x_i / sum_i w_i`` (Weiszfeld's step). With
    ``R = sum_i w_i (x_i - z_t)`` (the pull of the other rows; ``|R| - eta`` is the norm of the
    smallest subgradient of g at z_t), the next iterate is
    ``z_{t+1} = (1 - lambda) T + lambda z_t`` with ``lambda = min(1, eta / |R|)`` (Vardi and
    Zhang 2000): plain Weiszfeld when no row is at z_t, and a data row z_t that is optimal
    (``|R| <= eta``) is a fixed point, so the algorithm neither stalls at a row that is not
    optimal nor leaves one that is. Every step lowers g; the last iterate is returned.

    Start. The mean of the rows when the subgradient of g there has norm at most 1/2, else the
    coordinate-wise median (even count: mean of the middle pair). A far-away mean, pulled by f
    rows placed far from the h > f others, has a subgradient of norm at least about
    ``h - f >= 1`` (the pulls of the h others point one way); a norm <= 1/2 puts the mean
    within ``sqrt(2h) r`` of the other rows' centre, r their radius, whatever the f rows hold.
    The coordinate-wise median lies within the honest rows' range in every coordinate when
    f < n/2. So the start is always within a multiple of the honest rows' spread of the
    optimum, and the far rows cannot slow the iteration down by their size. The test costs
    nothing: it is the first Weiszfeld step from the mean.

    Stopping. After ``max_iter`` iterations, or once a step moves z by at most
    ``tol * r(z)`` and so does the distance still to go as estimated from the last two steps
    (``s_t rho / (1 - rho)`` with ``rho = s_t / s_{t-1}``: the iteration converges linearly),
    with r(z) the median distance from z to the rows (the lower median of the n distances):
    with f < n/2 it is set by the honest rows, not by the total distance that a far row
    dominates, and the test depends neither on a translation nor on the scale of the
    gradients. The result is then within about ``tol * r(z)`` of the optimum; at least two
    steps run unless a step does not move z at all. Finally, when the iterate lies within
    100 max(eps, tol r(z)) of a row x_k and x_k passes the optimality test of Vardi and Zhang
    (``|| sum_{x_i != x_k} (x_i - x_k) / ||x_i - x_k|| || <= #{i: x_i = x_k}``), x_k itself
    is returned exactly (Weiszfeld converges only slowly to an optimum at a data point).
    When all rows lie within eps of the start (e.g. all identical: the float64 mean of
    identical float32 rows is exact) the start is returned.

    Breakdown: with f < n/2 rows anywhere (``BREAKDOWN``), the optimum z* lies within
    ``2 (n - f) R / (n - 2f)`` of any point c whose ball of radius R holds the n - f honest
    rows: ``g(z*) <= g(c)`` and the triangle inequality give ``(n - 2f) ||z* - c|| <=
    2 (n - f) R``.

    Parameters: ``f`` (int >= 0, default 0; does not change the computation), ``tol`` (> 0,
    default 1e-6), ``max_iter`` (int >= 1, default 100), ``eps`` (> 0, default 1e-8: rows
    this close to the iterate count as lying on it, in the units of the gradients).

    Precondition: n >= 1 to run; the breakdown point is 1/2, so the guarantee needs n > 2f,
    otherwise ``warning(n)`` says so.

    Complexity: one pass for the mean and the distances to it (plus, when the median start is
    needed, the coordinate-wise median, see ``coordinate_median``), then O(n d) per iteration
    (one fused pass over float64 column chunks computes the step and the next distances; one
    more when a row lies at the iterate), O(n d * iterations) in all; a few chunks of extra
    memory.

    Source: E. Weiszfeld (1937); Y. Vardi, C.-H. Zhang, "The multivariate L1-median and
    associated data depth", PNAS 97 (2000) (modified step and optimality test); K. Pillutla,
    S. M. Kakade, Z. Harchaoui, "Robust Aggregation for Federated Learning", IEEE Trans.
    Signal Processing 70 (2022) (RFA: the geometric median as a robust aggregator); breakdown
    point 1/2: H. P. Lopuhaa, P. J. Rousseeuw, "Breakdown points of affine equivariant
    estimators of multivariate location and covariance matrices", Ann. Statist. 19 (1991).

    Shapes and dtypes: (n, d) float32/float64 -> (d,) same dtype/device; the iterate is kept in
    float64.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape or
    when every row holds NaN/Inf (such rows are dropped, f lowered by their count).
    """

    #: 2(n - f) R / (n - 2f) from the honest mean (see the class docstring) <= R + k Delta
    BREAKDOWN = Breakdown("ball", spread=lambda n, f: n / (n - 2 * f))

    name = "geometric_median"
    PARAMS = {
        "f": F_PARAM,
        "tol": Param("float", 1e-6, "stop when a step is at most tol * median distance",
                     minimum=0.0, strict=True),
        "max_iter": Param("int", 100, "maximum number of Weiszfeld iterations", minimum=1),
        "eps": Param("float", 1e-8, "rows this close to the iterate count as lying on it",
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

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        # the mean and the distances to it: one pass (and it reveals NaN/Inf rows)
        z, dist = mean_and_distances(x, check)
        step = None
        if all_finite(dist) and all_finite(z):
            step = self._step(x, z, dist)
            if step[3] > _MEAN_START_GRADIENT:  # the mean is far from the optimum
                step = None
        if step is None:
            z, dist = median_and_distances(x)
        prev = 0.0  # the previous step's length (none yet)
        for it in range(self.max_iter):
            z_new, dist_new, moved, _ = step if it == 0 and step is not None else \
                self._step(x, z, dist)
            z, dist = z_new, dist_new
            if moved == 0.0:
                break
            # Weiszfeld converges linearly: with contraction rho (estimated from the last two
            # steps) the optimum is about moved * rho / (1 - rho) away; stop once both the step
            # and that estimate are within tol * r(z)
            limit = self.tol * _median_distance(dist)
            rho = moved / prev if prev > 0.0 else 1.0
            if moved <= limit and rho < 1.0 and moved * rho <= limit * (1.0 - rho):
                break
            prev = moved
        # Weiszfeld only creeps towards an optimum that is a data row: when it ended next to a
        # row, test that row for optimality and return it exactly if it is the median
        k = int(torch.argmin(dist))
        near = _SNAP * max(self.eps, self.tol * _median_distance(dist))
        if 0.0 < float(dist[k]) <= near and row_is_geometric_median(x, k):
            return x[k].clone()
        return z.to(x.dtype)

    def _step(self, x: torch.Tensor, z: torch.Tensor, dist: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """One modified Weiszfeld step from z (float64 (d,)) given the distances dist (n,)
        of the rows to z: ``(z_next, distances to z_next, ||z_next - z||, subgradient norm
        at z)``. One fused pass over float64 column chunks (two when a row lies at z and the
        step is damped)."""
        n = x.shape[0]
        at = dist <= self.eps
        eta = int(at.sum())
        if eta == n:  # every row lies at z: z is optimal
            return z, dist, 0.0, 0.0
        w = torch.where(at, 0.0, 1.0 / torch.where(at, 1.0, dist))
        total = float(w.sum())
        p = w / total  # normalised weights: the step cannot overflow
        t = torch.empty_like(z)
        sq = torch.zeros(n, dtype=torch.float64, device=x.device)
        step_sq = torch.zeros((), dtype=torch.float64, device=x.device)
        for start, stop, c in chunks64(x):  # c = x (float64)
            tc = torch.mv(c.T, p, out=t[start:stop])  # sum_i p_i x_i
            c.sub_(tc)  # x - t
            sq.add_(torch.linalg.vector_norm(c, dim=1).square_())
            diff = tc - z[start:stop]
            step_sq += diff @ diff
        moved = math.sqrt(float(step_sq))
        pull = total * moved  # ||sum_i w_i (x_i - z)||
        new_dist = sq.sqrt_()
        if not all_finite(new_dist):
            new_dist = row_norms(x, t)
        if eta == 0:
            return t, new_dist, moved, pull
        lam = 1.0 if pull <= eta else eta / pull
        if lam == 1.0:
            return z, dist, 0.0, 0.0
        z_new = t.mul_(1.0 - lam).add_(z, alpha=lam)
        return z_new, row_norms(x, z_new), (1.0 - lam) * moved, pull - eta


def _median_distance(dist: torch.Tensor) -> float:
    """The lower median of the distances (n,): with f < n/2 rows anywhere it is at most the
    largest distance to an honest row."""
    return float(torch.median(dist))


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
