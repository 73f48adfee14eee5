"""Optimised IPM: send -tau times the honest mean, tau chosen by a line search against the
configured pipeline.

Definition (ByzFL's Opt-IPM, after Xie, Koyejo and Gupta, "Fall of empires: breaking
Byzantine-tolerant SGD by inner product manipulation", UAI 2020; used by Allouah et al.,
"Fixing by Mixing", AISTATS 2023): with mu the mean of the honest vectors, every Byzantine
worker sends ``-tau * mu`` where tau maximises ``|| pipeline(honest + b copies) - mu ||`` over
the search of :mod:`byzps.attacks._search` (b: the number of Byzantine workers).

Parameters: ``evals`` (int >= 1, default 20), ``start`` (default 0.0), ``delta`` (non-zero,
default 10.0), ``ratio`` (in (0.5, 1), default 0.8): ByzFL's defaults; ``estimate_batches``,
``collude_seed``, ``omniscient`` as in :mod:`byzps.attacks._honest`.
Needs: ``aggregate``, ``n``, ``f``, and ``honest_gradients`` (omniscient) or the own-shard
fields. Shapes: ``(d,)`` float32 out. Cost per round: ``evals`` runs of the pipeline on n rows.
Errors: ValueError for bad parameters or a pipeline that cannot run on the rows.
"""

from __future__ import annotations

import torch

from byzps.attacks._search import LineSearchAttack


class OptIpm(LineSearchAttack):
    """Send ``-tau * mu`` with tau from the line search (see the module docstring).

    Args: see :class:`byzps.attacks._search.LineSearchAttack`.

    Raises:
        ValueError: bad parameters.
    """

    name = "opt_ipm"
    min_rows = 1

    def vector(self, honest: torch.Tensor, tau: float) -> torch.Tensor:
        """``(d,)`` ``-tau * mu`` of ``honest`` ``(h, d)``."""
        return -tau * honest.mean(dim=0)
