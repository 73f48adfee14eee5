"""The line search of the optimised attacks: pick the attack factor that moves the configured
pipeline's output farthest from the honest mean.

Objective (ByzFL's definition, used by Allouah et al., "Fixing by Mixing: A Recipe for Optimal
Byzantine ML under Heterogeneity", AISTATS 2023): for a factor tau, the attack vector a(tau)
is sent by all b Byzantine workers;
``y(tau) = || pipeline([honest rows; b copies of a(tau)]) - mean(honest rows) ||_2``.

Search (ByzFL's line maximisation, ``evals`` evaluations of y in all):

* expansion: evaluate y(start); then, with step delta, propose best + delta; while the
  proposal is strictly better, accept it and double delta; at the first proposal that is not
  better, multiply delta by ``ratio`` and stop expanding;
* contraction: with the remaining evaluations propose best + delta, accept it if strictly
  better, and multiply delta by ``ratio`` after each proposal.

The result is the best factor found (the first one on ties). The search only looks in the
direction of delta's sign from ``start``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Optional

import torch

from byzps.attacks._honest import HonestVectorsAttack
from byzps.attacks.base import AttackContext, finite_float, int_at_least


def search_params(evals: object, start: object, delta: object, ratio: object
                  ) -> tuple[int, float, float, float]:
    """Validate the search parameters: ``evals`` int >= 1, ``start`` finite, ``delta`` finite
    and non-zero, ``ratio`` in (0.5, 1) (ByzFL's ranges).

    Raises:
        ValueError: naming the bad parameter.
    """
    evals = int_at_least("evals", evals, 1)
    start = finite_float("start", start)
    delta = finite_float("delta", delta)
    if delta == 0:
        raise ValueError("delta must be non-zero")
    ratio = finite_float("ratio", ratio)
    if not 0.5 < ratio < 1:
        raise ValueError(f"ratio must be strictly between 0.5 and 1, got {ratio}")
    return evals, start, delta, ratio


def line_maximize(objective: Callable[[float], float], evals: int, start: float, delta: float,
                  ratio: float) -> float:
    """The factor tau found by the search described in the module docstring.

    Args:
        objective: tau -> y(tau), a finite float (larger is better for the attacker).
        evals: total evaluations of the objective (>= 1).
        start, delta, ratio: see the module docstring.
    """
    best_x, best_y = start, objective(start)
    left = evals - 1
    while left > 0:                      # expansion
        x = best_x + delta
        y = objective(x)
        left -= 1
        if y > best_y:
            best_x, best_y = x, y
            delta *= 2
        else:
            delta *= ratio
            break
    while left > 0:                      # contraction
        x = best_x + delta
        y = objective(x)
        left -= 1
        if y > best_y:
            best_x, best_y = x, y
        delta *= ratio
    return best_x


def deviation(aggregate: Callable[[torch.Tensor], torch.Tensor], honest: torch.Tensor,
              attack: torch.Tensor, copies: int) -> float:
    """``|| aggregate([honest; copies x attack]) - mean(honest) ||_2`` (float64 norm).

    Args:
        aggregate: the pipeline, ``(h + copies, d) -> (d,)``.
        honest: ``(h, d)`` float32 honest vectors.
        attack: ``(d,)`` the vector every Byzantine worker sends.
        copies: number of Byzantine workers (>= 1).

    Raises:
        ValueError: from the pipeline (e.g. too few rows for its precondition).
    """
    rows = torch.cat([honest, attack.to(honest.dtype).expand(copies, -1)])
    out = aggregate(rows).to(torch.float64)
    return float(torch.linalg.vector_norm(out - honest.to(torch.float64).mean(dim=0)))


#: the last omniscient search: (key, the honest tensor it ran on, tau); see LineSearchAttack
_LAST_SEARCH: list = []
_SEARCH_LOCK = threading.Lock()


class LineSearchAttack(HonestVectorsAttack):
    """Base of the optimised attacks: every Byzantine worker sends ``vector(honest, tau)`` with
    tau from :func:`line_maximize` of :func:`deviation` against ``ctx.aggregate``.

    Omniscient attackers of one simulated round all see the same honest tensor object and the
    same rule state, so they would all run the same search (``evals`` runs of the pipeline
    each); the first one's tau is kept and reused by the others: a one-entry cache keyed by
    the attack's class and parameters, the round, n and f, and the identity of
    ``ctx.honest_gradients`` (a reference to that tensor is held, so its identity cannot be
    reused while cached). The cache is guarded by a lock: attackers answering on several
    threads wait for the first one's search instead of racing it.

    Args:
        evals, start, delta, ratio: the search (defaults: ByzFL's 20, 0.0, 10.0, 0.8).
        estimate_batches, collude_seed, omniscient: where the honest vectors come from (see
            :mod:`byzps.attacks._honest`).

    Raises:
        ValueError: bad parameters.
    """

    def __init__(self, evals: int = 20, start: float = 0.0, delta: float = 10.0,
                 ratio: float = 0.8, estimate_batches: Optional[int] = None,
                 collude_seed: Optional[int] = None, omniscient: bool = False):
        self.evals, self.start, self.delta, self.ratio = search_params(evals, start, delta,
                                                                       ratio)
        super().__init__(estimate_batches, collude_seed, omniscient,
                         frozenset({"aggregate", "n", "f"}))

    def vector(self, honest: torch.Tensor, tau: float) -> torch.Tensor:  # pragma: no cover
        """``(d,)`` the attack vector for factor tau and honest vectors ``(h, d)``."""
        raise NotImplementedError

    def factor(self, ctx: AttackContext, honest: torch.Tensor) -> float:
        """The tau the search picks for ``honest`` ``(h, d)`` in ``ctx``'s round; ``start``
        without a search when the honest vectors hold NaN/Inf (the model has diverged: the
        pipeline has nothing to aggregate, and the PS drops such rows anyway)."""
        if not bool(torch.isfinite(honest).all()):
            return self.start
        copies = self.byzantine_count(ctx, honest.shape[0])
        return line_maximize(
            lambda tau: deviation(ctx.aggregate_fn(), honest, self.vector(honest, tau), copies),
            self.evals, self.start, self.delta, self.ratio)

    def __call__(self, ctx: AttackContext) -> torch.Tensor:
        """``(d,)`` float32: ``vector(honest, tau)`` with the searched tau."""
        honest = self.honest(ctx)
        if not self.is_omniscient:
            return self.vector(honest, self.factor(ctx, honest))
        key = (type(self), self.evals, self.start, self.delta, self.ratio, ctx.round, ctx.n,
               ctx.f)
        with _SEARCH_LOCK:
            if not (_LAST_SEARCH and _LAST_SEARCH[0] == key
                    and _LAST_SEARCH[1] is ctx.honest_gradients):
                _LAST_SEARCH[:] = [key, ctx.honest_gradients, self.factor(ctx, honest)]
            tau = _LAST_SEARCH[2]
        return self.vector(honest, tau)
