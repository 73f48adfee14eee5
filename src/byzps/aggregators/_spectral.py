"""Spectral helpers shared by the covariance-based rules (dnc, caf, smea).

These rules look at the empirical covariance ``Sigma = (1/W) sum_i w_i (x_i - mu)(x_i - mu)^T``
of (weighted) rows, a d x d matrix. With n rows it has rank < n, and everything the rules need
(its largest eigenvalue, and each row's projection on the top eigenvector) can be read from an
n x n matrix instead, without ever forming a d x d one:

* the centred Gram matrix ``K_ij = (x_i - mu) . (x_j - mu)`` follows from the squared distances
  ``D`` (``_distances.pairwise_sq_dists``, float64, translation invariant) by the classical
  multidimensional-scaling identity ``K = -1/2 (I - 1 w^T) D (I - w 1^T)`` for weights w that
  sum to one (mu the w-weighted mean);
* with ``M = W^{1/2} K W^{1/2} / sum(w)`` (W = diag(w)), ``M u = lambda u`` gives the eigenvalue
  lambda of Sigma and its unit eigenvector ``v = Y^T W^{1/2} u / sqrt(sum(w) lambda)`` (rows of
  Y: x_i - mu), so the projection of row i on v is ``(K W^{1/2} u)_i / sqrt(sum(w) lambda)``.

So one O(n^2 d) pass over the input (the distances) is followed by O(n^3) work per eigenvalue,
exact up to floating point (no power iteration, no random start).
"""

from __future__ import annotations

import torch

from ._chunks import chunks64
from ._distances import pairwise_sq_dists

__all__ = ["centred_gram", "sq_dists", "top_eigen", "weighted_mean"]

#: squared distances are capped here (see ``sq_dists``): about 3e150
SQ_DIST_CAP = 2.0 ** 500


def sq_dists(x: torch.Tensor) -> torch.Tensor:
    """Squared distances (n, n) float64 between the finite rows of ``x`` (n, d), capped at
    ``SQ_DIST_CAP`` = 2^500.

    ``_distances.pairwise_sq_dists`` (translation invariant, accurate among the bulk of the rows),
    with every entry above 2^500 lowered to 2^500. A row that far from another (only float64
    rows beyond about 1e75 get there; float32 rows stay below 1e78) is treated as "very far":
    the rules still see it as the outlier it is, while the Gram matrices and eigensolvers
    (which square their entries internally) stay finite. Entries between rows of a common
    scale are exact, so once a filter has given the far rows weight 0 the rest is computed at
    the scale of the remaining rows.
    """
    return pairwise_sq_dists(x).clamp_(max=SQ_DIST_CAP)


def centred_gram(dist: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Centred Gram matrix (n, n) float64 from squared distances.

    Args:
        dist: (n, n) float64 squared Euclidean distances between the rows.
        weights: (n,) float64 non-negative weights summing to 1; the centre is the weighted
            mean of the rows.

    Returns:
        ``K`` with ``K_ij = (x_i - mu) . (x_j - mu)``, symmetrised.
    """
    n = dist.shape[0]
    eye = torch.eye(n, dtype=torch.float64, device=dist.device)
    left = eye - torch.outer(torch.ones_like(weights), weights)   # I - 1 w^T
    k = -0.5 * (left @ dist @ left.T)
    return (k + k.T) * 0.5


def top_eigen(sym: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Largest eigenvalue and a unit eigenvector (float64) of a symmetric (m, m) matrix.

    Uses ``torch.linalg.eigh`` (exact up to rounding); a negative rounding residue of a
    positive semi-definite matrix is returned as 0.
    """
    values, vectors = torch.linalg.eigh(sym)
    return max(float(values[-1]), 0.0), vectors[:, -1]


def weighted_mean(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i weights_i x_i / sum_i weights_i`` (d,) in x's dtype, accumulated in float64 over
    column chunks (one chunk of extra memory).

    Args:
        x: (n, d) float32/float64 finite rows.
        weights: (n,) float64 non-negative, with a positive sum.
    """
    w = weights.to(device=x.device, dtype=torch.float64)
    out = torch.empty(x.shape[1], dtype=torch.float64, device=x.device)
    for start, stop, c in chunks64(x):
        torch.mv(c.T, w, out=out[start:stop])
    return out.div_(w.sum()).to(x.dtype)  # unit weights: an exact sum, then one division
