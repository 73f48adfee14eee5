"""CAF: covariance-bound agnostic filter (Allouah, Guerraoui and Stephan 2025)."""

from __future__ import annotations

import math

import torch

from ._base import Aggregator, Breakdown
from ._spectral import centred_gram, sq_dists, top_eigen, weighted_mean


class CAF(Aggregator):
    """``caf``: filter rows along the top eigenvector of their weighted covariance; return the
    weighted mean whose covariance had the smallest largest eigenvalue.

    Definition: start with weights c_i = 1. While ``sum_i c_i > n - 2f``:

    1. ``mu_c = sum_i c_i x_i / sum_i c_i`` and
       ``Sigma_c = sum_i c_i (x_i - mu_c)(x_i - mu_c)^T / sum_i c_i``;
    2. (lambda, v) = the largest eigenvalue of Sigma_c and its unit eigenvector; remember mu_c
       if lambda is the smallest seen so far;
    3. ``tau_i = ((x_i - mu_c) . v)^2`` and ``c_i <- c_i (1 - tau_i / tau_max)``.

    The result is the remembered mu_c (with f = 0 the loop never runs: the plain mean).
    ``tau_max`` is the largest tau_i over the rows still weighted (c_i > 0): a row whose
    weight already reached 0 has left the set. So every iteration removes at least one more
    row (the one at tau_max): after k iterations the total weight is at most n - k, and the
    loop ends after at most 2f iterations. If the weighted rows all coincide (lambda = 0) there
    is nothing left to filter and the loop stops with that mean.

    lambda and the projections are exact (an eigendecomposition of the n x n matrix
    ``W^{1/2} K W^{1/2} / sum(c)``, K the c-centred Gram matrix, see ``_spectral``), not a
    power iteration from a random start, so the rule is deterministic.

    Parameters: ``f`` (int >= 0, default 0).

    Precondition: n > 2f (else ValueError): the loop stops at total weight n - 2f >= 1.

    Complexity: O(n^2 d) for the distances plus O(f n^3) for at most 2f eigendecompositions, then
    one O(n d) weighted average; O(n^2) plus one chunk of extra memory.

    Source: Y. Allouah, R. Guerraoui, J. Stephan, "Towards Trustworthy Federated Learning with
    Untrusted Participants", ICML 2025.

    Shapes and dtypes: (n, d) float32/float64 -> (d,) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape,
    n <= 2f, or when every row holds NaN/Inf (such rows are dropped, f lowered by their count).
    """

    name = "caf"

    #: n > 2f: the bound of smea (the filter's mean with the smallest top eigenvalue plays
    #: the role of S*); checked by tests/test_breakdown.py, not proven here
    BREAKDOWN = Breakdown("ball", spread=lambda n, f: 2.0 * math.sqrt(f / (n - 2 * f)))

    def _requirement(self, n: int, f: int) -> str | None:
        if n <= 2 * f:
            return f"caf filters down to total weight n - 2f and needs n > 2f (n={n}, 2f={2 * f})"
        return None

    def weights(self, x: torch.Tensor, f: int) -> torch.Tensor:
        """The weights c (n,) float64 of the returned mean (see the class docstring)."""
        n = x.shape[0]
        c = torch.ones(n, dtype=torch.float64)
        if f == 0:
            return c
        dist = sq_dists(x).cpu()
        best_value, best = math.inf, c.clone()
        while float(c.sum()) > n - 2 * f:
            total = float(c.sum())
            gram = centred_gram(dist, c / total)
            root = c.sqrt()
            value, u = top_eigen(root[:, None] * gram * root[None, :] / total)
            if value < best_value:
                best_value, best = value, c.clone()
            # projections on v, up to the common factor 1/sqrt(total * value)
            tau = (gram @ (root * u)).square_()
            tau_max = float(tau[c > 0].max())
            if value == 0.0 or tau_max == 0.0:
                break
            c = c * (1.0 - tau / tau_max).clamp_(min=0.0)
            c[c <= 0] = 0.0
        return best

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        return weighted_mean(x, self.weights(x, f))
