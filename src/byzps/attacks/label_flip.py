"""Label flip: an honest computation on poisoned labels, ``y -> (num_classes - 1) - y``.

Definition: send the loss gradient of the current minibatch ``(x, y)`` with every label y
replaced by ``num_classes - 1 - y`` (9 - y on MNIST). With worker momentum the worker runs this
gradient through its own momentum like an honest worker would (``output_is_gradient``), so it
behaves exactly like an honest worker whose data is mislabelled.
Parameters: ``num_classes`` (int >= 2, default 10).
Needs: ``batch``, ``gradient``.
Shapes: x ``(B, *input_shape)``, y ``(B,)`` int64 in; ``(d,)`` float32 out.
Errors: ValueError for a bad num_classes, or labels outside 0..num_classes-1.
Source: the label-flipping attack of e.g. Allen-Zhu et al. 2021 and Karimireddy et al. 2021
("Learning from history for Byzantine robust optimization", ICML).
"""

from __future__ import annotations

import torch

from byzps.attacks.base import Attack, AttackContext, int_at_least


class LabelFlip(Attack):
    """Send the gradient on labels ``num_classes - 1 - y``.

    Args:
        num_classes: number of classes C; labels must lie in 0..C-1.

    Raises:
        ValueError: bad parameter.
    """

    name = "label_flip"
    needs = frozenset({"batch", "gradient"})
    output_is_gradient = True

    def __init__(self, num_classes: int = 10):
        self.num_classes = int_at_least("num_classes", num_classes, 2)

    def __call__(self, ctx: AttackContext) -> torch.Tensor:
        """``(d,)`` float32 gradient of the current minibatch with flipped labels."""
        self.require(ctx)
        x, y = ctx.minibatch()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"label_flip: labels must be in 0..{self.num_classes - 1}, got "
                             f"{int(y.min())}..{int(y.max())}")
        return ctx.gradient_fn()(x, (self.num_classes - 1) - y)
