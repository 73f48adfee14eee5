"""Centered clipping (Karimireddy, He, Jaggi 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ._base import F_PARAM, Aggregator, Breakdown, Param
from ._chunks import chunks64
from ._finite import all_finite
from ._reduce import row_norms
from ._sorting import median_and_distances


class CenteredClipping(Aggregator):
    """``centered_clipping``: clip every gradient around a centre kept from the last round.

    Definition: starting from the centre v_0, repeat ``iterations`` times
    ``v_{l+1} = v_l + (1/n) sum_i (x_i - v_l) * min(1, tau / ||x_i - v_l||)``
    (a row at distance 0 contributes nothing; no division by zero). The result v_L is returned
    and becomes the centre of the next call, as in the paper where the centre is the previous
    aggregate (with worker momentum this is the momentum of the last round).

    Initial centre (project choice): the centre is explicit state, ``None`` until the first
    call. With ``init="median"`` (default) the first call starts from the coordinate-wise
    median of its rows (even count: mean of the middle pair), a robust start that does not
    depend on the scale of the gradients; ``init="zero"`` starts from the zero vector as in the
    paper's pseudo-code. The centre is carried by ``state_dict()`` -> ``{"center": tensor (d,)
    or None}`` and restored by ``load_state_dict``; ``reset()`` forgets it.

    Parameters: ``f`` (int >= 0, default 0; does not change the computation), ``tau`` (> 0,
    default 10.0: clipping radius), ``iterations`` (int >= 1, default 1: L in the paper, which
    reports that one iteration suffices with a good centre), ``init`` ("median" | "zero").

    Precondition: n >= 1 to run; the analysis needs a minority of Byzantine rows, so
    ``warning(n)`` reports n <= 2f.

    Complexity: O(n d * (iterations + 1)) time (one pass for the distances, fused with the
    median on the first call, then one fused pass per iteration), one float64 chunk plus the
    centre (d) of extra memory.

    Source: S. P. Karimireddy, L. He, M. Jaggi, "Learning from History for Byzantine Robust
    Optimization", ICML 2021.

    Shapes and dtypes: (n, d) float32/float64 -> (d,) same dtype/device; the centre is stored
    in the dtype/device of the last call.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape,
    a stored centre of a different size d, or when every row holds NaN/Inf (such rows are
    dropped, f lowered by their count).
    """

    #: a fresh object with init="median": the start lies in the honest box (f < n/2) and each
    #: iteration moves the centre by at most tau (a mean of vectors clipped to norm tau)
    BREAKDOWN = Breakdown("box", margin=lambda rule: rule.iterations * rule.tau)

    name = "centered_clipping"
    PARAMS = {
        "f": F_PARAM,
        "tau": Param("float", 10.0, "clipping radius around the centre", minimum=0.0,
                     strict=True),
        "iterations": Param("int", 1, "clipping iterations per round (L)", minimum=1),
        "init": Param("choice", "median", "initial centre", choices=("median", "zero")),
    }

    tau: float
    iterations: int
    init: str
    center: torch.Tensor | None

    def _post_init(self) -> None:
        self.center = None

    def reset(self) -> None:
        """Forget the centre; the next call initialises it again."""
        self.center = None

    def state_dict(self) -> dict[str, Any]:
        return {"center": None if self.center is None else self.center.detach().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        extra = sorted(set(state) - {"center"})
        if extra or "center" not in state:
            raise ValueError(
                f"{self.name}: state must have exactly the key 'center', got {sorted(state)}"
            )
        c = state["center"]
        if c is None:
            self.center = None
            return
        if (
            not isinstance(c, torch.Tensor)
            or c.dim() != 1
            or not c.is_floating_point()
            or not all_finite(c)
        ):
            raise ValueError(
                f"{self.name}: state 'center' must be None or a finite 1-D float tensor"
            )
        self.center = c.detach().clone()

    def _guarantee(self, n: int, f: int) -> str | None:
        if n <= 2 * f:
            return "centered clipping's analysis needs fewer than half Byzantine gradients"
        return None

    _fast_path = True

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:
        n, d = x.shape
        if self.center is None:
            if self.init == "median":
                v, dist = median_and_distances(x, check)
            else:
                v = torch.zeros(d, dtype=torch.float64, device=x.device)
                dist = row_norms(x, v, check)
        else:
            if self.center.shape != (d,):
                raise ValueError(
                    f"{self.name}: stored centre has {self.center.numel()} coordinates but the "
                    f"gradients have d={d}; call reset() or load a matching state"
                )
            v = self.center.to(device=x.device, dtype=torch.float64)
            dist = row_norms(x, v, check)  # a row holding NaN/Inf has a non-finite norm
        for it in range(self.iterations):
            scale = torch.where(dist > self.tau, self.tau / dist.clamp(min=self.tau), 1.0)
            coef = scale / n
            last = it == self.iterations - 1
            v_new = torch.empty_like(v)
            sq = torch.zeros(n, dtype=torch.float64, device=x.device)
            total = float(coef.sum())
            for start, stop, c in chunks64(x):  # c = x (float64)
                # v + sum_i coef_i (x_i - v), as v (1 - sum coef) + sum_i coef_i x_i: one pass
                # fewer; float64 keeps the rounding at 1e-16 |x|, far below the float32 output
                vc = v_new[start:stop]
                torch.mv(c.T, coef, out=vc)
                vc.add_(v[start:stop], alpha=1.0 - total)
                if not last:
                    c.sub_(vc)
                    sq.add_(torch.linalg.vector_norm(c, dim=1).square_())
            v = v_new
            if not last:
                dist = sq.sqrt_()
                if not bool(torch.isfinite(dist).all()):
                    dist = row_norms(x, v)
        out = v.to(x.dtype)
        if all_finite(out):
            self.center = out.clone()
        return out
