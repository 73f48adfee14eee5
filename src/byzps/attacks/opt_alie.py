"""Optimised ALIE: ALIE's shift along the honest standard deviation, its size tau chosen by a
line search against the configured pipeline.

Definition (ByzFL's Opt-ALIE, after Baruch, Baruch and Goldberg, "A little is enough:
circumventing defenses for distributed learning", NeurIPS 2019; used by Allouah et al., "Fixing
by Mixing", AISTATS 2023): with mu and sigma the coordinate-wise mean and Bessel-corrected
standard deviation of the honest vectors, every Byzantine worker sends ``mu + tau * sigma``
where tau maximises ``|| pipeline(honest + b copies) - mu ||`` over the search of
:mod:`byzps.attacks._search` (b: the number of Byzantine workers). The sign of tau is free (the
search goes from ``start`` in the direction of ``delta``); today's ``alie`` sends
``mu - z sigma`` with z from n and f instead.

Parameters: ``evals`` (int >= 1, default 20), ``start`` (default 0.0), ``delta`` (non-zero,
default 10.0), ``ratio`` (in (0.5, 1), default 0.8): ByzFL's defaults; ``estimate_batches``,
``collude_seed``, ``omniscient`` as in :mod:`byzps.attacks._honest` (omniscient: the true
honest vectors and the PS's rule state of the round, simulation only; otherwise estimate_batches
stand-ins, default n - f, from the own shard, and the pipeline from its initial state).
Needs: ``aggregate``, ``n``, ``f``, and ``honest_gradients`` (omniscient) or the own-shard
fields. Shapes: ``(d,)`` float32 out. Cost per round: ``evals`` runs of the pipeline on n rows.
Errors: ValueError for bad parameters, fewer than 2 honest vectors, or a pipeline that cannot
run on the rows.
"""

from __future__ import annotations

import torch

from byzps.attacks._search import LineSearchAttack


class OptAlie(LineSearchAttack):
    """Send ``mu + tau * sigma`` with tau from the line search (see the module docstring).

    Args: see :class:`byzps.attacks._search.LineSearchAttack`.

    Raises:
        ValueError: bad parameters.
    """

    name = "opt_alie"
    min_rows = 2

    def vector(self, honest: torch.Tensor, tau: float) -> torch.Tensor:
        """``(d,)`` ``mu + tau * sigma`` of ``honest`` ``(h, d)``."""
        return honest.mean(dim=0) + tau * honest.std(dim=0, correction=1)
