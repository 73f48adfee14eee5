"""The worker's minibatch sampler is a pure function of (seed, round)."""

from __future__ import annotations

import pytest
import torch

from byzps.partition import ShardSampler

X = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1)
Y = torch.arange(10)


def test_batches_are_a_function_of_the_round_only():
    a, b = ShardSampler(X, Y, 4, seed=7), ShardSampler(X, Y, 4, seed=7)
    forward = [a.batch(r)[1].tolist() for r in range(6)]
    backward = [b.batch(r)[1].tolist() for r in reversed(range(6))][::-1]
    assert forward == backward


def test_each_epoch_is_a_permutation_without_the_remainder():
    s = ShardSampler(X, Y, 4, seed=1)
    # 10 samples, B = 4: two batches per epoch, the last 2 samples of each shuffle unused
    epoch0 = s.batch(0)[1].tolist() + s.batch(1)[1].tolist()
    assert len(set(epoch0)) == 8
    epoch1 = s.batch(2)[1].tolist() + s.batch(3)[1].tolist()
    assert len(set(epoch1)) == 8 and epoch1 != epoch0
    x, y = s.batch(5)
    assert torch.equal(x.view(-1), y.float())      # inputs and labels stay paired


def test_small_shard_and_bad_round():
    s = ShardSampler(X[:3], Y[:3], 64, seed=0)
    assert sorted(s.batch(0)[1].tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="round must be >= 0"):
        s.batch(-1)
