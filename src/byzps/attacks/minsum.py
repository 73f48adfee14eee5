"""Min-Sum: the honest mean pushed along a perturbation as far as the honest vectors' own
largest sum of squared distances allows.

Definition (Shejwalkar and Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning
Attacks and Defenses for Federated Learning", NDSS 2021, the AGR-agnostic Min-Sum attack): as
Min-Max (:mod:`byzps.attacks.minmax`: ``m = mu + gamma * p``, the same perturbations and the
same halving search for gamma), with the condition
``sum_i ||m - g_i||^2 <= max_i sum_j ||g_i - g_j||^2``.

Parameters, needs, shapes and errors: as ``minmax``.
"""

from __future__ import annotations

import torch

from byzps.attacks.minmax import MinMax


class MinSum(MinMax):
    """Send ``mu + gamma * p`` with the Min-Sum gamma (see the module docstring).

    Args and errors: as :class:`byzps.attacks.minmax.MinMax`.
    """

    name = "minsum"

    def condition(self, dist: torch.Tensor, base: torch.Tensor, cross: torch.Tensor,
                  pp: float):
        """``ok(gamma)``: Min-Sum's condition (arguments as ``MinMax.condition``)."""
        bound = float(dist.sum(dim=1).max())
        total_base, total_cross, h = float(base.sum()), float(cross.sum()), base.numel()

        def ok(gamma: float) -> bool:
            return total_base + 2 * gamma * total_cross + h * gamma * gamma * pp <= bound
        return ok
