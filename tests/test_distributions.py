"""Data distributions: exact splits on small inputs, invariants, config and error messages."""

from __future__ import annotations

import numpy as np
import pytest

from byzps import job
from byzps.config import ConfigError
from byzps.job import parse_config
from byzps.partition import (
    dirichlet_proportions,
    dirichlet_split,
    gamma_split,
    iid_shards,
    label_sorted_split,
    make_shards,
    sample_pool,
    split_even,
)

LABELS = np.array([2, 0, 1, 0, 2, 1, 0, 1, 2, 0])   # 10 examples, classes 0..2


def as_lists(shards):
    return [s.tolist() for s in shards]


def test_split_even_sizes_differ_by_at_most_one():
    assert as_lists(split_even(np.arange(7), 3)) == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="num_shards must be >= 1"):
        split_even(np.arange(3), 0)


def test_label_sorted_exact():
    # stable sort by label: class 0 = 1,3,6,9; class 1 = 2,5,7; class 2 = 0,4,8
    assert as_lists(label_sorted_split(np.arange(10), LABELS, 3)) == [
        [1, 3, 6, 9], [2, 5, 7], [0, 4, 8]]
    # the order of `indices` decides ties
    assert as_lists(label_sorted_split(np.array([9, 6, 2, 0]), LABELS, 2)) == [[9, 6], [2, 0]]


def test_gamma_exact_and_extremes():
    idx = np.arange(10)
    # gamma 0.4: the first 4 indices iid (2 + 2), the other 6 label-sorted: 6,9 | 5,7 | 4,8
    assert as_lists(gamma_split(idx, LABELS, 2, 0.4)) == [[0, 1, 6, 9, 5], [2, 3, 7, 4, 8]]
    assert as_lists(gamma_split(idx, LABELS, 3, 1.0)) == as_lists(split_even(idx, 3))
    assert as_lists(gamma_split(idx, LABELS, 3, 0.0)) == as_lists(
        label_sorted_split(idx, LABELS, 3))
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        gamma_split(idx, LABELS, 2, 1.5)


def test_dirichlet_split_exact_with_given_proportions():
    props = np.array([[0.5, 0.5, 0.0],     # class 0 (1,3,6,9): cuts at 2, 4, 4
                      [0.0, 0.0, 1.0],     # class 1 (2,5,7): all to shard 2
                      [1 / 3, 1 / 3, 1 / 3]])  # class 2 (0,4,8): one each
    assert as_lists(dirichlet_split(np.arange(10), LABELS, props)) == [
        [1, 3, 0], [6, 9, 4], [2, 5, 7, 8]]
    with pytest.raises(ValueError, match=r"one row per class"):
        dirichlet_split(np.arange(10), LABELS, np.ones((2, 3)) / 3)


def test_dirichlet_proportions_are_seeded_rows_summing_to_one():
    a = dirichlet_proportions(10, 4, 0.5, seed=3)
    b = dirichlet_proportions(10, 4, 0.5, seed=3)
    assert a.shape == (10, 4) and np.array_equal(a, b)
    assert np.allclose(a.sum(1), 1.0) and (a >= 0).all()
    assert not np.array_equal(a, dirichlet_proportions(10, 4, 0.5, seed=4))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_proportions(10, 4, 0.0, seed=0)


def test_iid_is_unchanged():
    labels = np.arange(1000) % 10
    for limit in (None, 500):
        assert as_lists(make_shards(labels, 7, seed=5, limit=limit)) == as_lists(
            iid_shards(1000, 7, 5, limit))


@pytest.mark.parametrize("dist, kw", [("iid", {}), ("label_sorted", {}),
                                      ("gamma", {"gamma": 0.3}),
                                      ("dirichlet", {"alpha": 5.0})])
def test_shards_are_disjoint_and_cover_the_pool(dist, kw):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 3000)
    shards = make_shards(labels, 6, seed=1, limit=2400, distribution=dist, min_size=8, **kw)
    allidx = np.concatenate(shards)
    assert len(shards) == 6
    assert len(allidx) == len(set(allidx.tolist())) == 2400
    assert set(allidx.tolist()) == set(sample_pool(3000, 1, 2400).tolist())
    assert all(len(s) >= 8 and s.dtype == np.int64 for s in shards)


def test_label_sorted_shards_hold_few_classes():
    labels = np.repeat(np.arange(10), 100)
    shards = make_shards(labels, 10, seed=0, distribution="label_sorted")
    assert [np.unique(labels[s]).tolist() for s in shards] == [[c] for c in range(10)]


def test_a_shard_smaller_than_a_batch_fails_clearly():
    labels = np.repeat(np.arange(10), 10)
    with pytest.raises(ValueError, match=r"shard 0 holds 13 examples, fewer than one batch "
                                         r"of 64"):
        make_shards(labels, 8, seed=0, min_size=64)
    with pytest.raises(ValueError, match=r"raise distribution.alpha"):
        make_shards(labels, 10, seed=0, distribution="dirichlet", alpha=0.01, min_size=5)
    with pytest.raises(ValueError, match="unknown data distribution 'zipf'"):
        make_shards(labels, 2, seed=0, distribution="zipf")


def test_config_distribution_section(base_config):
    cfg = parse_config(base_config)
    assert cfg.training.distribution.name == "iid"
    base_config["training"]["distribution"] = {"name": "dirichlet", "alpha": 0.5}
    cfg = parse_config(base_config)
    labels = np.arange(2000) % 10
    shards = job.shards(cfg, labels)
    assert len(shards) == cfg.n and sum(map(len, shards)) == 2000
    base_config["training"]["distribution"] = {"name": "iid", "alpha": 0.5}
    with pytest.raises(ConfigError, match="alpha is a parameter of dirichlet"):
        parse_config(base_config)
    base_config["training"]["distribution"] = {"name": "gamma", "gamma": 1.5}
    with pytest.raises(ConfigError, match=r"training.distribution.gamma"):
        parse_config(base_config)
    base_config["training"]["distribution"] = {"name": "zipf"}
    with pytest.raises(ConfigError, match=r"training.distribution.name"):
        parse_config(base_config)
