"""How the training data is split among the n workers, and which minibatch a worker takes in
each round: pure functions of plain arguments (labels, n, seed, round), no config and no I/O.

* :func:`make_shards` splits a pool of example indices into n disjoint shards with one of
  :data:`DISTRIBUTIONS`: ``iid`` (equal random pieces), ``dirichlet`` (per class, proportions
  drawn from Dir(alpha): Hsu et al. 2019, "Measuring the effects of non-identical data
  distribution for federated visual classification"), ``label_sorted`` (sorted by label, cut
  into n pieces: McMahan et al. 2017's pathological non-iid split) or ``gamma`` (a fraction
  gamma iid, the rest label-sorted: Karimireddy et al. 2022, "Byzantine-robust learning on
  heterogeneous datasets via bucketing").
* :func:`holdout_indices` is the validation split: training examples no shard holds, for
  tuning hyperparameters without looking at the test set.
* :class:`ShardSampler` gives a worker's minibatch of round r as a pure function of
  (seed, r): a seeded reshuffle of the shard each epoch.
"""

from __future__ import annotations

import numpy as np
import torch


def iid_shards(num_samples: int, num_shards: int, seed: int,
               limit: int | None = None) -> list[np.ndarray]:
    """Split sample indices into disjoint iid shards.

    A seeded permutation of ``range(num_samples)`` (truncated to ``limit`` if given) is cut
    into ``num_shards`` contiguous pieces whose sizes differ by at most one.

    Args:
        num_samples: dataset size m.
        num_shards: n (>= 1).
        seed: permutation seed; equal seeds give equal shards on every machine.
        limit: use only the first ``limit`` indices of the permutation.

    Returns:
        list of n int64 index arrays, disjoint, covering the (limited) permutation.

    Raises:
        ValueError: ``num_shards < 1`` or more shards than samples.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    perm = np.random.default_rng(seed).permutation(num_samples)
    if limit is not None:
        perm = perm[:limit]
    if len(perm) < num_shards:
        raise ValueError(f"{len(perm)} samples cannot fill {num_shards} shards")
    return [s.astype(np.int64) for s in np.array_split(perm, num_shards)]


# ---------------------------------------------------------------------------------------------
# Data distributions: how the pool of training examples is split into worker shards

#: Names accepted by :func:`make_shards`.
DISTRIBUTIONS = ("iid", "dirichlet", "label_sorted", "gamma")


def sample_pool(num_samples: int, seed: int, limit: int | None = None,
                holdout: int = 0) -> np.ndarray:
    """The examples every distribution splits: a seeded permutation of ``range(num_samples)``
    without its last ``holdout`` entries (the validation split, :func:`holdout_indices`), cut
    to its first ``limit`` entries (the same pool :func:`iid_shards` cuts).

    Args:
        num_samples: N, the training set's size.
        seed: ``training.seed``.
        limit: ``training.train_limit`` (None = every example not held out).
        holdout: ``training.validation`` (0 = none), 0 <= holdout < N.

    Returns:
        ``(min(limit, N - holdout),)`` int64 indices, distinct, none of them held out.

    Raises:
        ValueError: ``holdout`` outside ``0 .. N - 1``.
    """
    perm = _permutation(num_samples, seed, holdout)
    keep = perm[:num_samples - holdout]
    return (keep if limit is None else keep[:limit]).astype(np.int64)


def holdout_indices(num_samples: int, seed: int, holdout: int) -> np.ndarray:
    """The validation split: the last ``holdout`` entries of the permutation
    :func:`sample_pool` takes its pool from, so they are never in any worker's shard.

    Returns:
        ``(holdout,)`` int64 indices into the training set, distinct, sorted.

    Raises:
        ValueError: ``holdout`` outside ``1 .. N - 1``.
    """
    if holdout < 1:
        raise ValueError(f"a validation split needs at least 1 example, got {holdout}")
    perm = _permutation(num_samples, seed, holdout)
    return np.sort(perm[num_samples - holdout:]).astype(np.int64)


def _permutation(num_samples: int, seed: int, holdout: int) -> np.ndarray:
    if not 0 <= holdout < num_samples:
        raise ValueError(f"{holdout} examples held out of a training set of {num_samples}; "
                         f"expected 0 .. {num_samples - 1}")
    return np.random.default_rng(seed).permutation(num_samples)


def split_even(indices: np.ndarray, num_shards: int) -> list[np.ndarray]:
    """Cut ``indices`` in order into ``num_shards`` contiguous pieces whose sizes differ by at
    most one (the first ``len % num_shards`` pieces are the larger ones; ``np.array_split``).

    Raises:
        ValueError: ``num_shards < 1``.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return [np.asarray(s, dtype=np.int64) for s in np.array_split(np.asarray(indices),
                                                                  num_shards)]


def label_sorted_split(indices: np.ndarray, labels: np.ndarray,
                       num_shards: int) -> list[np.ndarray]:
    """Extreme non-iid: sort ``indices`` by their label (stable: equal labels keep their order
    in ``indices``), then :func:`split_even`. Each shard then holds one or two classes (for
    n >= number of classes).

    Args:
        indices: ``(m,)`` int indices into ``labels``.
        labels: ``(N,)`` integer labels of the whole dataset.
        num_shards: n >= 1.

    Returns:
        n int64 index arrays, disjoint, covering ``indices``.
    """
    indices = np.asarray(indices, dtype=np.int64)
    order = np.argsort(np.asarray(labels)[indices], kind="stable")
    return split_even(indices[order], num_shards)


def gamma_split(indices: np.ndarray, labels: np.ndarray, num_shards: int,
                gamma: float) -> list[np.ndarray]:
    """Gamma-similarity split (Karimireddy et al. 2022): the first ``round(gamma * m)`` of
    ``indices`` are split iid (:func:`split_even`), the rest label-sorted
    (:func:`label_sorted_split`); shard k is iid piece k followed by sorted piece k.
    ``gamma = 1`` is iid, ``gamma = 0`` label-sorted.

    Args:
        indices: ``(m,)`` int indices into ``labels`` (already shuffled: the iid part is
            their prefix).
        labels: ``(N,)`` integer labels.
        num_shards: n >= 1.
        gamma: iid fraction in [0, 1].

    Raises:
        ValueError: gamma outside [0, 1].
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    indices = np.asarray(indices, dtype=np.int64)
    k = int(round(gamma * len(indices)))
    iid = split_even(indices[:k], num_shards)
    rest = label_sorted_split(indices[k:], labels, num_shards)
    return [np.concatenate([a, b]).astype(np.int64) for a, b in zip(iid, rest)]


def dirichlet_split(indices: np.ndarray, labels: np.ndarray,
                    proportions: np.ndarray) -> list[np.ndarray]:
    """Split each class of ``indices`` over the shards by the given proportions.

    For class c (ascending label values), its examples in ``indices`` (in their order there),
    m_c of them, are cut at ``floor(cumsum(proportions[c]) * m_c)``: shard k receives the
    piece between cut k-1 and cut k (the last cut is m_c, so nothing is lost). Shard k is the
    concatenation of its pieces over classes, in class order.

    Args:
        indices: ``(m,)`` int indices into ``labels``.
        labels: ``(N,)`` integer labels.
        proportions: ``(C, n)`` non-negative rows summing to 1, one row per distinct label of
            ``indices`` (ascending).

    Returns:
        n int64 index arrays, disjoint, covering ``indices``.

    Raises:
        ValueError: ``proportions`` has the wrong number of rows or a negative entry.
    """
    indices = np.asarray(indices, dtype=np.int64)
    lab = np.asarray(labels)[indices]
    classes = np.unique(lab)
    proportions = np.asarray(proportions, dtype=np.float64)
    if proportions.ndim != 2 or proportions.shape[0] != len(classes):
        raise ValueError(f"proportions must be ({len(classes)}, n) (one row per class), got "
                         f"{proportions.shape}")
    if (proportions < 0).any():
        raise ValueError("proportions must be non-negative")
    n = proportions.shape[1]
    pieces: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c, p in zip(classes, proportions):
        members = indices[lab == c]
        cuts = np.floor(np.cumsum(p) / p.sum() * len(members)).astype(np.int64)
        cuts[-1] = len(members)
        start = 0
        for k in range(n):
            pieces[k].append(members[start:cuts[k]])
            start = max(start, cuts[k])
    return [np.concatenate(p).astype(np.int64) for p in pieces]


def dirichlet_proportions(num_classes: int, num_shards: int, alpha: float,
                          seed: int) -> np.ndarray:
    """``(num_classes, num_shards)`` rows drawn from Dir(alpha * 1_n) with
    ``np.random.default_rng([seed, 1])`` (a stream separate from the pool permutation's).

    Raises:
        ValueError: alpha <= 0.
    """
    if not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng([seed, 1])
    return rng.dirichlet(np.full(num_shards, float(alpha)), size=num_classes)


def make_shards(labels: np.ndarray, num_shards: int, seed: int, limit: int | None = None,
                distribution: str = "iid", alpha: float | None = None,
                gamma: float | None = None, min_size: int = 1,
                holdout: int = 0) -> list[np.ndarray]:
    """Split the training set into ``num_shards`` worker shards.

    All distributions split the same pool (:func:`sample_pool`). ``iid`` gives exactly
    :func:`iid_shards` (so runs from before distributions existed are unchanged);
    ``label_sorted`` :func:`label_sorted_split`; ``gamma`` :func:`gamma_split` (default
    gamma 0.5); ``dirichlet`` :func:`dirichlet_split` with :func:`dirichlet_proportions`
    (default alpha 1.0).

    Args:
        labels: ``(N,)`` integer labels of the whole training set.
        num_shards: n >= 1.
        seed: ``training.seed``.
        limit: ``training.train_limit`` (None = all N).
        distribution: one of :data:`DISTRIBUTIONS`.
        alpha, gamma: the distribution's parameter (None = its default).
        min_size: every shard must hold at least this many examples (the batch size).
        holdout: examples held out as the validation split (:func:`holdout_indices`),
            never in a shard; 0 = none.

    Returns:
        n int64 index arrays into ``labels``, disjoint, covering the pool.

    Raises:
        ValueError: unknown distribution, a bad parameter, ``holdout`` not below N, or a
            shard smaller than ``min_size`` (the message names the shard, its size, and what to change).
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown data distribution {distribution!r}; expected one of "
                         f"{', '.join(DISTRIBUTIONS)}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    labels = np.asarray(labels)
    pool = sample_pool(len(labels), seed, limit, holdout)
    if distribution == "iid":
        shards = split_even(pool, num_shards)
    elif distribution == "label_sorted":
        shards = label_sorted_split(pool, labels, num_shards)
    elif distribution == "gamma":
        shards = gamma_split(pool, labels, num_shards, 0.5 if gamma is None else gamma)
    else:
        a = 1.0 if alpha is None else alpha
        props = dirichlet_proportions(len(np.unique(labels[pool])), num_shards, a, seed)
        shards = dirichlet_split(pool, labels, props)
    sizes = [len(s) for s in shards]
    small = [k for k, m in enumerate(sizes) if m < min_size]
    if small:
        k = small[0]
        hint = (" (raise distribution.alpha, or lower batch_size)" if distribution == "dirichlet"
                else " (use more data: train_limit; fewer workers; or a smaller batch_size)")
        if holdout:
            hint += f"; {holdout} of the {len(labels)} examples are held out for validation"
        raise ValueError(f"data distribution {distribution}: shard {k} holds {sizes[k]} "
                         f"examples, fewer than one batch of {min_size}; shard sizes "
                         f"{sizes}{hint}")
    return shards


class ShardSampler:
    """Endless minibatches from one shard: a seeded reshuffle each epoch, last partial batch
    dropped (or the whole shard as one batch when it is smaller than ``batch_size``).

    Args:
        x: ``(m, *input_shape)`` shard inputs (the task's input shape and dtype).
        y: ``(m,)`` int64 labels.
        batch_size: B.
        seed: sampling seed (same seed, same sequence).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        self.x, self.y = x, y
        self.batch_size = min(batch_size, len(y))
        self.seed = seed
        self._order = torch.empty(0, dtype=torch.int64)
        self._epoch = -1

    def batch(self, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The minibatch of round ``round_``: ``(B, *input_shape)`` inputs, ``(B,)`` labels.

        A pure function of (seed, round): epoch e = round // (m // B) uses the permutation
        seeded by (seed, e), so a worker that reconnects, or a PS resumed from a checkpoint,
        sees exactly the batches an uninterrupted run would.

        Raises:
            ValueError: a negative round.
        """
        if round_ < 0:
            raise ValueError(f"round must be >= 0, got {round_}")
        per_epoch = len(self.y) // self.batch_size
        epoch, pos = divmod(round_, per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self.y), generator=gen)
            self._epoch = epoch
        idx = self._order[pos * self.batch_size:(pos + 1) * self.batch_size]
        return self.x[idx], self.y[idx]
