"""Mimic: send a plausible, honest-looking gradient that over-represents one part of the data.

Paper (Karimireddy, He and Jaggi 2022, "Byzantine-robust learning on heterogeneous datasets via
bucketing", ICLR): all Byzantine workers copy the gradient of one chosen honest worker, so that
this worker's (heterogeneous) data is over-represented and the model is biased towards it; the
vectors sent are genuine honest gradients, so no outlier filter can reject them.

Non-omniscient variant (this implementation): a Byzantine worker cannot see another worker's
gradient, so it imitates a *heterogeneous honest worker* instead: it sends the genuine loss
gradient, at the current model, of examples of a single target class c taken from its own
shard. The colluders agree on c (the same ``target_class``, or the same ``collude_seed``), so
they all pull in the same direction, exactly as if they all copied one honest worker that
holds mostly class c. Per round: pool the current minibatch and ``estimate_batches - 1``
further minibatches of the own shard (drawn with a generator seeded by (seed, round)), keep
the examples with label c, and send the gradient on the first B of them (B = the minibatch
size, so its noise level looks like an honest minibatch gradient). If the pool holds no
example of class c, it sends the honest gradient of the current minibatch. Like label_flip it
is a raw gradient, so with worker momentum the worker runs it through its own momentum.

Parameters: ``target_class`` (int in 0..num_classes-1 or None: ``collude_seed mod num_classes``
if ``collude_seed`` is set, else the worker's own seed mod num_classes), ``num_classes`` (int >=
2, default 10), ``estimate_batches`` (int 1..64, default 5), ``collude_seed`` (int >= 0 or None).
Needs: ``batch``, ``gradient``, and ``sample_batch`` unless ``estimate_batches = 1``.
Shapes: minibatches ``(B, *input_shape)`` / ``(B,)`` int64; ``(d,)`` float32 out.
Errors: ValueError for bad parameters.
"""

from __future__ import annotations

from typing import Optional

import torch

from byzps.attacks.base import (
    Attack,
    AttackContext,
    estimate_batches_param,
    int_at_least,
    optional_seed,
    round_generator,
)


class Mimic(Attack):
    """Send the gradient of up to B examples of the target class from the own shard.

    Args:
        target_class: the class c to over-represent; None derives it from the seed.
        num_classes: number of classes C.
        estimate_batches: minibatches pooled to find examples of class c (1..64).
        collude_seed: shared seed of colluding workers (sampling, and c when not given).

    Raises:
        ValueError: bad parameters.
    """

    name = "mimic"
    needs = frozenset({"batch", "gradient", "sample_batch"})
    output_is_gradient = True

    def __init__(self, target_class: Optional[int] = None, num_classes: int = 10,
                 estimate_batches: int = 5, collude_seed: Optional[int] = None):
        self.num_classes = int_at_least("num_classes", num_classes, 2)
        self.target_class = None if target_class is None else \
            int_at_least("target_class", target_class, 0)
        if self.target_class is not None and self.target_class >= self.num_classes:
            raise ValueError(f"target_class must be < num_classes={self.num_classes}, "
                             f"got {target_class}")
        self.estimate_batches = estimate_batches_param(estimate_batches, 1)
        self.collude_seed = optional_seed("collude_seed", collude_seed)
        if self.estimate_batches == 1:
            self.needs = Mimic.needs - {"sample_batch"}

    def target_for(self, ctx: AttackContext) -> int:
        """The class c in 0..num_classes-1 this worker over-represents (fixed across rounds)."""
        if self.target_class is not None:
            return self.target_class
        seed = ctx.seed if self.collude_seed is None else self.collude_seed
        return seed % self.num_classes

    def __call__(self, ctx: AttackContext) -> torch.Tensor:
        """``(d,)`` float32 gradient on up to B own examples of the target class."""
        self.require(ctx)
        x, y = ctx.minibatch()
        gradient = ctx.gradient_fn()
        c, b = self.target_for(ctx), len(y)
        xs, ys = [x[y == c]], [y[y == c]]
        if self.estimate_batches > 1:
            seed = ctx.seed if self.collude_seed is None else self.collude_seed
            gen = round_generator(seed, ctx.round, self.name)
            for _ in range(self.estimate_batches - 1):
                xb, yb = ctx.batch_sampler()(gen)
                xs.append(xb[yb == c])
                ys.append(yb[yb == c])
        xc, yc = torch.cat(xs)[:b], torch.cat(ys)[:b]
        if len(yc) == 0:
            return gradient(x, y)
        return gradient(xc, yc)
