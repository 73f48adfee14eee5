"""Divide-and-Conquer (Shejwalkar and Houmansadr 2021)."""

from __future__ import annotations

import math

import torch

from ._base import F_PARAM, Aggregator, Breakdown, Param
from ._calls import CallCounter, call_generator
from ._reduce import mean_rows
from ._spectral import centred_gram, sq_dists, top_eigen


class DnC(CallCounter, Aggregator):
    """``dnc``: drop the rows that stick out most along the top singular direction of random
    coordinate subsamples; average the rest.

    Definition (the paper's DnC algorithm): for iteration i = 1..niters, draw a random set r_i
    of b coordinates (all d when b >= d); with ``z_j = x_j[r_i] - mean_k x_k[r_i]`` and v the
    top right singular vector of the centred (n, b) matrix Z, score each row by
    ``s_j = (z_j . v)^2`` and keep the n - ceil(c f) rows with the lowest scores (ties by
    index). The good set is the intersection of the kept sets over the iterations; the result
    is the mean of the good rows. If the intersection is empty (possible only when
    niters * ceil(c f) >= n), the rows kept in the most iterations are averaged instead.

    Scores are exact: ``s_j = lambda u_j^2`` for the top eigenpair (lambda, u) of the n x n
    centred Gram matrix Z Z^T (see ``_spectral``), computed in float64 from translation-
    invariant distances.

    Randomness and state (as bucketing): call number t (0, 1, 2, ... counted by the object)
    draws its coordinate sets from a ``torch.Generator`` seeded from (seed, t), so a run is
    reproducible; ``state_dict()`` -> ``{"calls": t}``, restored by ``load_state_dict``, so a
    resumed run continues the same sequence. ``coordinates(t, d)`` returns the sets of call t
    without advancing the counter.

    Parameters: ``f`` (int >= 0, default 0), ``niters`` (int >= 1, default 5), ``b`` (int >= 1,
    default 10000: coordinates per subsample), ``c`` (float > 0, default 1.0: filtering
    fraction, ceil(c f) rows removed per iteration), ``seed`` (int, default 0).

    Precondition: n > ceil(c f) (each iteration keeps at least one row), else ValueError. The
    rule has no worst-case guarantee (the paper evaluates it empirically; a far Byzantine row
    whose projection on the top direction is small survives), so ``warning(n)`` says so
    whenever f > 0.

    Complexity: per iteration O(n b) to gather the subsample plus O(n^2 b + n^3) for its
    distances and eigendecomposition; O(n b) extra memory (the subsample), then one O(n d)
    averaging pass.

    Source: V. Shejwalkar, A. Houmansadr, "Manipulating the Byzantine: Optimizing Model
    Poisoning Attacks and Defenses for Federated Learning", NDSS 2021.

    Shapes and dtypes: (n, d) float32/float64 -> (d,) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape,
    n <= ceil(c f), or when every row holds NaN/Inf (such rows are dropped, f lowered by their
    count); a stored call counter that is not an integer >= 0.
    """

    name = "dnc"
    PARAMS = {
        "f": F_PARAM,
        "niters": Param("int", 5, "random subsamples per call", minimum=1),
        "b": Param("int", 10000, "coordinates per subsample", minimum=1),
        "c": Param("float", 1.0, "filtering fraction: ceil(c f) rows removed per subsample",
                   minimum=0.0, strict=True),
        "seed": Param("int", 0, "seed of the per-call coordinate subsamples"),
    }

    niters: int
    b: int
    c: float
    seed: int
    calls: int

    #: within its guarantee only f = 0 (it has no worst-case one, see ``warning``): the mean of
    #: all rows, inside their bounding box
    BREAKDOWN = Breakdown("box")

    def removed(self, f: int) -> int:
        """Rows removed per subsample: ceil(c f)."""
        return math.ceil(self.c * f)

    def _requirement(self, n: int, f: int) -> str | None:
        if n <= self.removed(f):
            return (f"dnc removes ceil(c f) = {self.removed(f)} rows per subsample and needs "
                    f"n > ceil(c f)")
        return None

    def _guarantee(self, n: int, f: int) -> str | None:
        if n <= 2 * f:
            return "Divide-and-Conquer assumes fewer than half Byzantine gradients"
        if f > 0:
            return ("Divide-and-Conquer has no worst-case guarantee (the paper evaluates it "
                    "empirically): a Byzantine gradient with a small projection on the top "
                    "singular direction of a subsample survives the filter however far it is")
        return None

    def coordinates(self, call: int, d: int) -> list[torch.Tensor | None]:
        """The coordinate sets (CPU int64, ascending) of the niters subsamples of call number
        ``call`` for d coordinates; None stands for all d (when b >= d)."""
        if self.b >= d:
            return [None] * self.niters
        gen = call_generator(self.seed, call)
        return [torch.sort(torch.randperm(d, generator=gen)[: self.b]).values
                for _ in range(self.niters)]

    def good_rows(self, x: torch.Tensor, f: int, call: int) -> torch.Tensor:
        """Indices (ascending int64) of the rows averaged at call number ``call``."""
        n, d = x.shape
        keep = n - self.removed(f)
        if keep == n:
            return torch.arange(n, device=x.device)
        kept = torch.zeros(n, dtype=torch.long)
        uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
        for cols in self.coordinates(call, d):
            sub = x if cols is None else x[:, cols.to(x.device)]
            value, u = top_eigen(centred_gram(sq_dists(sub).cpu(), uniform))
            scores = value * u.square()
            kept[torch.sort(scores, stable=True).indices[:keep]] += 1
        best = int(kept.max())   # == niters unless the intersection is empty
        return torch.nonzero(kept == best).flatten().to(x.device)

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        good = self.good_rows(x, f, self.calls)
        out = mean_rows(x, good)
        self.calls += 1
        return out
