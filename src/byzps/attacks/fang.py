"""Fang et al.'s attack on trimmed mean and median: push every coordinate against the honest
direction, just beyond the honest extremes.

Definition (Fang, Cao, Jia and Gong, "Local Model Poisoning Attacks to Byzantine-Robust
Federated Learning", USENIX Security 2020, the trimmed-mean attack, written for gradients): with
g_1..g_h the honest vectors of the round, ``s_j = sign(mean_i g_ij)`` the direction in which
coordinate j of the model would move without the attack (it moves by minus the gradient; the
paper defines s_j through the rule's output without the attack, here it is the sign of the
honest mean as common implementations take it; the two can differ in a coordinate whose honest
values are skewed around 0), and
``g_max,j`` / ``g_min,j`` the largest / smallest honest value of coordinate j, each Byzantine
worker draws every coordinate independently and uniformly:

* ``s_j > 0`` (honest gradients push the parameter down; send values at the bottom):
  in ``[g_min,j / b, g_min,j]`` if ``g_min,j > 0``, else in ``[b g_min,j, g_min,j]``;
* ``s_j <= 0``: in ``[g_max,j, b g_max,j]`` if ``g_max,j > 0``, else in
  ``[g_max,j, g_max,j / b]``;

with b = 2 in the paper (parameter ``b`` > 1). This is the full-knowledge attack
(``omniscient: true``, simulation only). The same attack is the paper's attack on the median.

Partial knowledge (``omniscient: false``, the default; runs over TCP): the paper's variant for
an attacker who knows only the compromised workers' own data estimates the mean mu_j and
standard deviation sigma_j of the honest vectors (here from ``estimate_batches`` minibatches of
the worker's own shard, see :mod:`byzps.attacks._estimate`) and draws coordinate j uniformly in
``[mu_j - 4 sigma_j, mu_j - 3 sigma_j]`` when ``s_j > 0`` (s from mu), else in
``[mu_j + 3 sigma_j, mu_j + 4 sigma_j]``.

Randomness: the uniform draws come from a generator seeded by (seed, round), seed being
``collude_seed`` if given, else the worker's own seed: by default every Byzantine worker sends
its own draw, as in the paper; with a shared ``collude_seed`` they send the same vector.

Parameters: ``b`` (finite > 1, default 2.0), ``estimate_batches`` (int 2..64, default 5),
``collude_seed`` (int >= 0 or None), ``omniscient`` (bool, default false).
Needs: ``honest_gradients`` (omniscient) or the own-shard fields. Shapes: ``(d,)`` float32 out.
Errors: ValueError for bad parameters or too few honest vectors.
"""

from __future__ import annotations

from typing import Optional

import torch

from byzps.attacks._honest import HonestVectorsAttack
from byzps.attacks.base import AttackContext, finite_float, round_generator


class Fang(HonestVectorsAttack):
    """Fang et al.'s trimmed-mean / median attack (see the module docstring).

    Args:
        b: the factor of the sampling intervals (> 1; 2 in the paper).
        estimate_batches, collude_seed, omniscient: see :mod:`byzps.attacks._honest`.

    Raises:
        ValueError: bad parameters.
    """

    name = "fang"
    min_rows = 2

    def __init__(self, b: float = 2.0, estimate_batches: Optional[int] = 5,
                 collude_seed: Optional[int] = None, omniscient: bool = False):
        self.b = finite_float("b", b)
        if self.b <= 1:
            raise ValueError(f"b must be > 1, got {b}")
        super().__init__(estimate_batches, collude_seed, omniscient)

    def interval(self, honest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-coordinate sampling interval ``(low, high)``, each ``(d,)`` float32, for the
        honest vectors ``(h, d)``: the full-knowledge one when omniscient, else the
        partial-knowledge one (see the module docstring)."""
        mu = honest.mean(dim=0)
        down = mu > 0
        if not self.is_omniscient:
            sigma = honest.std(dim=0, correction=1)
            low = torch.where(down, mu - 4 * sigma, mu + 3 * sigma)
            return low, low + sigma
        g_min, g_max = honest.amin(dim=0), honest.amax(dim=0)
        b = self.b
        low = torch.where(down, torch.where(g_min > 0, g_min / b, b * g_min),
                          g_max)
        high = torch.where(down, g_min,
                           torch.where(g_max > 0, b * g_max, g_max / b))
        return low, high

    def __call__(self, ctx: AttackContext) -> torch.Tensor:
        """``(d,)`` float32, each coordinate uniform in its interval."""
        honest = self.honest(ctx)
        low, high = self.interval(honest)
        gen = round_generator(ctx.seed if self.collude_seed is None else self.collude_seed,
                              ctx.round, self.name)
        u = torch.rand(low.shape, generator=gen, dtype=torch.float32)
        return low + u * (high - low)
