"""Input handling shared by the rules: the accepted dtypes, one-pass finiteness checks, and
dropping the rows that hold NaN or Inf.

A rule first runs on the raw ``(n, d)`` input and detects NaN/Inf as a by-product of its own
passes (helpers take ``check=True`` and raise :class:`NonFiniteInput`); only then is the input
scanned row by row (:func:`nonfinite_rows`) and the rule rerun on the finite rows. This saves
a separate scan (a full pass over the input, about as long as ``torch.mean``) in the usual case.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite. One ``torch.aminmax`` (NaN propagates to both):
    ``torch.isfinite(t).all()`` is 10-30x slower on CPU (3 ms for 1e6 float32 entries)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


class NonFiniteInput(Exception):
    """Raised by a helper called with ``check=True`` when the input holds NaN or +-Inf (or,
    for float64 input, values so large that an intermediate overflowed): the caller then drops
    the non-finite rows and runs again without the check."""


def as_matrix(grads: object, rule: str) -> torch.Tensor:
    """Validate the input of a rule and return it detached.

    Raises TypeError when ``grads`` is not a torch.Tensor or not float32/float64, ValueError
    when it is not two-dimensional or has no rows or no columns.
    """
    if not isinstance(grads, torch.Tensor):
        raise TypeError(
            f"{rule}: expected a torch.Tensor of shape (n, d), got {type(grads).__name__}"
        )
    if grads.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{rule}: expected dtype float32 or float64, got {grads.dtype}")
    if grads.dim() != 2:
        raise ValueError(
            f"{rule}: expected a 2-D tensor (n workers, d parameters), got shape "
            f"{tuple(grads.shape)}"
        )
    n, d = grads.shape
    if n == 0:
        raise ValueError(f"{rule}: got no gradients (shape {tuple(grads.shape)})")
    if d == 0:
        raise ValueError(f"{rule}: gradients have no coordinates (shape {tuple(grads.shape)})")
    return grads.detach()


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """Boolean mask (n,) of rows holding at least one NaN or +-Inf.

    Fast path: a row whose float sum is finite holds no NaN/Inf (NaN and Inf propagate through
    a sum), so only rows whose sum is non-finite - either faulty or finite rows that overflowed -
    are inspected entry by entry.
    """
    bad = ~torch.isfinite(x.sum(dim=1))
    if bool(bad.any()):
        for i in torch.nonzero(bad).flatten().tolist():
            bad[i] = not all_finite(x[i])
    return bad


def drop_nonfinite(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Return ``(rows of x that are entirely finite, number of rows dropped)``."""
    bad = nonfinite_rows(x)
    dropped = int(bad.sum())
    if dropped:
        x = x[~bad]
    return x, dropped
