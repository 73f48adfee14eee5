"""Non-omniscient estimates of the honest workers' statistics, from the attacker's own shard.

ALIE, IPM and mimic are defined in their papers on the honest workers' gradients, which a
Byzantine worker in a real TCP deployment never sees. Here it estimates them from
k = ``estimate_batches`` minibatches of its own shard at the current model:

* g_1 is the gradient of the current minibatch (``ctx.batch``); g_2..g_k come from
  ``ctx.sample_batch(generator)`` with a generator seeded by ``(seed, round)``, where seed is the
  attack's ``collude_seed`` if set, else the worker's own ``ctx.seed``.
* Without worker momentum (beta = 0) honest workers send raw gradients:
  mu_hat = mean_i g_i and sigma_hat = coordinate-wise standard deviation (Bessel-corrected,
  k - 1 in the denominator).
* With worker momentum beta > 0 honest workers send momenta m_t: the centre is this worker's
  own momentum (``ctx.honest_gradient``) and sigma_hat is scaled by sqrt((1 - beta) / (1 + beta)),
  the stationary standard deviation of an exponential moving average of i.i.d. noise with
  standard deviation 1.

The omniscient variants (``omniscient: true``, simulation only) skip the estimate:
:func:`true_rows` returns the honest workers' own vectors of the round (momenta when worker
momentum is on), and mu / sigma are their plain mean and Bessel-corrected standard deviation.

Attacks that need the honest vectors themselves, not just mu and sigma (Min-Max, Min-Sum, Fang,
the optimised ALIE/IPM), get them from :func:`honest_rows`: the true rows when omniscient, else
k stand-in rows from the worker's own shard (:func:`standin_rows`) with the estimated centre and
spread.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from byzps.attacks.base import AttackContext, round_generator


def raw_gradients(ctx: AttackContext, k: int, seed: Optional[int], salt: str) -> torch.Tensor:
    """The ``(k, d)`` float32 raw gradients g_1..g_k described in the module docstring.

    Args:
        ctx: needs ``batch`` and ``gradient`` (unless beta = 0, when g_1 is
            ``honest_gradient``), and ``sample_batch`` when k > 1.
        k: number of minibatches (>= 1).
        seed: collusion seed, or None for the worker's own ``ctx.seed``.
        salt: the attack name (separates its random stream from other attacks').

    Raises:
        ValueError: a needed context field is None.
    """
    if ctx.worker_momentum == 0:
        rows = [ctx.honest_gradient]
    else:
        if ctx.batch is None or ctx.gradient is None:
            raise ValueError("with worker momentum the estimate needs batch and gradient")
        rows = [ctx.gradient(*ctx.batch)]
    if k > 1:
        if ctx.sample_batch is None or ctx.gradient is None:
            raise ValueError(f"estimating from {k} minibatches needs sample_batch and gradient")
        gen = round_generator(ctx.seed if seed is None else seed, ctx.round, salt)
        rows += [ctx.gradient(*ctx.sample_batch(gen)) for _ in range(k - 1)]
    return torch.stack([r.to(torch.float32).reshape(-1) for r in rows])


def centre(ctx: AttackContext, grads: torch.Tensor) -> torch.Tensor:
    """mu_hat ``(d,)`` float32: the mean of ``grads`` ``(k, d)``, or ``ctx.honest_gradient``
    (the worker's momentum) when ``ctx.worker_momentum`` > 0."""
    if ctx.worker_momentum == 0:
        return grads.mean(dim=0)
    return ctx.honest_gradient.to(torch.float32)


def spread(ctx: AttackContext, grads: torch.Tensor) -> torch.Tensor:
    """sigma_hat ``(d,)`` float32: coordinate-wise std of ``grads`` ``(k, d)`` (k >= 2, Bessel
    corrected), times sqrt((1 - beta) / (1 + beta)) for worker momentum beta.

    Raises:
        ValueError: fewer than two rows.
    """
    if grads.shape[0] < 2:
        raise ValueError("a standard deviation needs at least 2 minibatches")
    sigma = grads.std(dim=0, correction=1)
    beta = ctx.worker_momentum
    if beta > 0:
        sigma = sigma * math.sqrt((1 - beta) / (1 + beta))
    return sigma


def true_rows(ctx: AttackContext, min_rows: int) -> torch.Tensor:
    """The ``(h, d)`` float32 vectors the honest workers send this round (omniscient attacks).

    Args:
        ctx: needs ``honest_gradients`` (set by the simulator).
        min_rows: the fewest rows the statistic needs (1 for a mean, 2 for a std).

    Raises:
        ValueError: ``honest_gradients`` is None or has fewer than ``min_rows`` rows.
    """
    rows = ctx.honest_gradients
    if rows is None or rows.dim() != 2 or rows.shape[0] < min_rows:
        got = None if rows is None else tuple(rows.shape)
        raise ValueError(f"an omniscient attack needs at least {min_rows} honest vectors "
                         f"(h, d) in round {ctx.round}, got {got}")
    return rows.to(torch.float32)


def standin_rows(ctx: AttackContext, grads: torch.Tensor) -> torch.Tensor:
    """``(k, d)`` float32 stand-ins for the honest vectors, built from ``grads`` ``(k, d)`` raw
    gradients of the worker's own shard: ``centre + s (g_i - mean_i g_i)`` with the centre of
    :func:`centre` and s = sqrt((1 - beta) / (1 + beta)) (1 without worker momentum, when the
    rows are the gradients themselves). Their mean is :func:`centre` and their coordinate-wise
    standard deviation is :func:`spread`."""
    beta = ctx.worker_momentum
    if beta == 0:
        return grads
    dev = grads - grads.mean(dim=0)
    return centre(ctx, grads) + dev * math.sqrt((1 - beta) / (1 + beta))


def honest_rows(ctx: AttackContext, omniscient: bool, k: int, seed: Optional[int], salt: str,
                min_rows: int = 1) -> torch.Tensor:
    """The honest vectors an attack works on: ``(h, d)`` float32.

    Args:
        ctx: the attack context (``honest_gradients`` when omniscient, else what
            :func:`raw_gradients` needs).
        omniscient: the true rows of the round (:func:`true_rows`) instead of stand-ins.
        k: number of stand-in rows (minibatches of the own shard) when not omniscient.
        seed: collusion seed for the stand-ins' sampling, or None for the worker's own.
        salt: the attack name.
        min_rows: the fewest rows the attack needs.

    Raises:
        ValueError: too few rows, or a needed context field is None.
    """
    if omniscient:
        return true_rows(ctx, min_rows)
    if k < min_rows:
        raise ValueError(f"{salt}: needs at least {min_rows} stand-in honest vectors, got "
                         f"estimate_batches = {k}")
    return standin_rows(ctx, raw_gradients(ctx, k, seed, salt))
