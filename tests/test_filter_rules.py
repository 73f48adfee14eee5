"""The filtering rules dnc, caf, smea, monna and cge: hand-computed values, independent numpy
references that form the d x d covariance explicitly (the rules never do), preconditions and
dnc's seeded, resumable state."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from byzps import aggregators as A
from byzps.robust import RobustPipeline


def col(values, dtype=torch.float64):
    """1-D points as an (n, 1) matrix."""
    return torch.tensor([[v] for v in values], dtype=dtype)


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


# ================================================================================ references
# Written from the papers' definitions with explicit covariance matrices and SVDs.


def np_top_eig(cov):
    values, vectors = np.linalg.eigh(cov)
    return values[-1], vectors[:, -1]


def np_caf(x, f):
    n = len(x)
    c = np.ones(n)
    best_value, best = math.inf, x.mean(axis=0)
    while c.sum() > n - 2 * f:
        mu = (c[:, None] * x).sum(axis=0) / c.sum()
        dev = x - mu
        cov = (c[:, None, None] * np.einsum("ni,nj->nij", dev, dev)).sum(axis=0) / c.sum()
        value, v = np_top_eig(cov)
        if value < best_value:
            best_value, best = value, mu
        tau = (dev @ v) ** 2
        tau_max = tau[c > 0].max()
        if tau_max == 0:
            break
        c = np.clip(c * (1 - tau / tau_max), 0, None)
    return best


def np_smea(x, f):
    n = len(x)
    best_value, best = math.inf, None
    for left_out in itertools.combinations(range(n), f):
        s = x[[i for i in range(n) if i not in left_out]]
        dev = s - s.mean(axis=0)
        value = np_top_eig(dev.T @ dev / len(s))[0]
        if value < best_value - 1e-12 * max(abs(value), 1.0):
            best_value, best = value, s.mean(axis=0)
    return best


def np_dnc_keep(sub, removed):
    dev = sub - sub.mean(axis=0)
    v = np.linalg.svd(dev, full_matrices=False)[2][0]  # top right singular vector
    scores = (dev @ v) ** 2
    return set(np.argsort(scores, kind="stable")[: len(sub) - removed].tolist())


# ================================================================================ cge


def test_cge_hand():
    x = col([0.0, 1.0, 2.0, 3.0, 100.0])
    assert A.build("cge", f=1)(x).tolist() == [1.5]
    assert A.build("cge", f=1, reduce="sum")(x).tolist() == [6.0]
    # norms 5, 1, 10, 1: the row of norm 10 goes
    x = t([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [1.0, 0.0]])
    torch.testing.assert_close(A.build("cge", f=1)(x), t([4 / 3, 5 / 3]), rtol=0, atol=1e-15)
    # equal norms: the later row goes first
    x = t([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert A.build("cge", f=1)(x).tolist() == [0.5, 0.5]
    assert A.build("cge", f=1).kept(x, 1).tolist() == [0, 1]


# ================================================================================ monna


def test_monna_hand():
    x = col([0.0, 1.0, 2.0, 3.0, 100.0])
    assert A.build("monna", f=1)(x).tolist() == [1.5]
    # the 4 rows nearest to 100: 100, 3, 2, 1
    assert A.build("monna", f=1, pivot=4)(x).tolist() == [26.5]
    assert A.build("monna", f=2, pivot=2)(x).tolist() == [2.0]  # 2, 1, 3
    x = t([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0], [4.0, 4.0]])
    assert A.build("monna", f=2)(x).tolist() == [0.5, 0.0]
    # the pivot is its own first neighbour even next to a copy of itself
    x = col([1.0, 1.0, 7.0])
    assert A.build("monna", f=2, pivot=1).neighbours(x, 2).tolist() == [1]


def test_monna_pivot_precondition():
    agg = A.build("monna", f=1, pivot=5)
    agg.check(6)
    with pytest.raises(ValueError, match="pivot row 5 must be < n = 5"):
        agg.check(5)
    with pytest.raises(ValueError, match="n=5 rows and f=1"):
        agg(torch.randn(5, 2))


# ================================================================================ smea


def test_smea_hand():
    # subsets of 3 of {0, 1, 3, 10}: {0, 1, 3} has the smallest variance (42/27)
    out = A.build("smea", f=1)(col([0.0, 1.0, 3.0, 10.0]))
    torch.testing.assert_close(out, col([4 / 3])[0], rtol=0, atol=1e-15)
    # ByzFL's example: {0, 1} and {1, 2} tie (top eigenvalue 6.75, {0, 2}: 27); the first
    # subset in left-out order ({0} left out) wins
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    assert A.build("smea", f=1).best_subset(x, 1).tolist() == [1, 2]
    assert A.build("smea", f=1)(x).tolist() == [5.5, 6.5, 7.5]
    # 2-D: the outlier along y is left out although its x is central
    x = t([[0.0, 0.0], [2.0, 0.0], [1.0, 9.0], [1.0, 0.5]])
    assert A.build("smea", f=1).best_subset(x, 1).tolist() == [0, 1, 3]


def test_smea_limit():
    with pytest.raises(ValueError, match=r"C\(n, f\) = 252 subsets, more than limit=100"):
        A.build("smea", f=5, limit=100).check(10)
    A.build("smea", f=5, limit=252).check(10)


@pytest.mark.parametrize("seed", range(4))
def test_smea_and_caf_match_explicit_covariance(seed):
    g = np.random.default_rng(seed)
    n, d, f = 9, 5, 2
    x = g.normal(size=(n, d)) * g.uniform(0.5, 3, size=d) + g.normal(size=d) * 10
    x[:f] += g.normal(size=d) * 4  # two shifted rows
    tx = torch.from_numpy(x)
    np.testing.assert_allclose(A.build("smea", f=f)(tx).numpy(), np_smea(x, f), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(A.build("caf", f=f)(tx).numpy(), np_caf(x, f), rtol=1e-9,
                               atol=1e-9)


def test_smea_batches_give_the_same_subset(monkeypatch):
    g = np.random.default_rng(3)
    x = torch.from_numpy(g.normal(size=(12, 4)))
    ref = A.build("smea", f=3)(x)  # C(12, 3) = 220 subsets
    from byzps.aggregators import smea as smea_module

    monkeypatch.setattr(smea_module, "_BATCH_ENTRIES", 9 * 9 * 7)  # 7 subsets per batch
    assert torch.equal(A.build("smea", f=3)(x), ref)


# ================================================================================ caf


def test_caf_hand():
    # n = 5, f = 1, loop while the total weight exceeds 3. Iteration 1: mean 21.2, the
    # covariance's top direction is the line itself, tau_i = (x_i - 21.2)^2, tau_max =
    # 78.8^2 (the row 100) -> c_i = 1 - (x_i - 21.2)^2 / 78.8^2, c_4 = 0 (total 3.749 > 3).
    # Iteration 2 has the smaller variance, so its weighted mean is the result (its update
    # brings the total below 3).
    x = [0.0, 1.0, 2.0, 3.0]
    c = [1 - (v - 21.2) ** 2 / 78.8**2 for v in x]
    expected = sum(ci * v for ci, v in zip(c, x)) / sum(c)
    out = A.build("caf", f=1)(col(x + [100.0]))
    assert out.item() == pytest.approx(expected, rel=1e-13)
    assert abs(expected - 1.5085) < 1e-4
    # f = 0: the loop never runs: the mean
    assert A.build("caf")(col([0.0, 1.0, 5.0])).tolist() == [2.0]


def test_caf_identical_weighted_rows_stop():
    # after the outlier's weight drops to 0 the other rows coincide: lambda = 0, stop there
    out = A.build("caf", f=2)(col([4.0, 4.0, 4.0, 4.0, 4.0, 9.0]))
    assert out.tolist() == [4.0]


# ================================================================================ dnc


def test_dnc_hand():
    x = col([0.0, 1.0, 2.0, 3.0, 100.0])
    assert A.build("dnc", f=1)(x).tolist() == [1.5]
    # c = 2: two rows go per subsample: 100 and then the largest |x - mean| of the rest, 0
    # ((0 - 21.2)^2 > (3 - 21.2)^2): mean of 1, 2, 3
    assert A.build("dnc", f=1, c=2.0)(x).tolist() == [2.0]


def test_dnc_keeps_a_far_row_with_a_small_projection():
    # why dnc warns that it has no worst-case guarantee: the mean (about 6.8e37) sits between
    # the Byzantine rows 1e30 and 3.4e38, so the row 1e30 is nearer to it than the honest rows
    # are; the two largest scores are 3.4e38 and the honest -5.4, and 1e30 is averaged
    x = col([1e30, 3.4e38, 6.4, 1.0, -5.4])
    out = A.build("dnc", f=2)(x)
    assert out.item() == pytest.approx((1e30 + 6.4 + 1.0) / 3, rel=1e-12)


def test_dnc_subsamples_hand():
    # the outlier row 4 is far in every coordinate, so every subsample removes it
    x = t([[0.0, 1.0, 0.0, 2.0], [1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 2.0, 1.0],
           [2.0, 1.0, 0.0, 0.0], [50.0, 60.0, 70.0, 80.0]])
    agg = A.build("dnc", f=1, b=2, niters=3, seed=7)
    sets = agg.coordinates(0, 4)
    assert len(sets) == 3 and all(s.numel() == 2 and bool((s[1:] > s[:-1]).all()) for s in sets)
    assert agg(x).tolist() == [0.75, 0.5, 0.75, 0.75]
    assert agg.calls == 1


def test_dnc_matches_svd_reference():
    g = np.random.default_rng(5)
    n, d, f = 10, 40, 2
    x = g.normal(size=(n, d))
    x[[3, 7]] += g.normal(size=d) * 2
    agg = A.build("dnc", f=f, b=12, niters=4, seed=3)
    good = set(range(n))
    for cols in agg.coordinates(0, d):
        good &= np_dnc_keep(x[:, cols.numpy()], f)
    expected = x[sorted(good)].mean(axis=0)
    np.testing.assert_allclose(agg(torch.from_numpy(x)).numpy(), expected, rtol=1e-12)


def test_dnc_empty_intersection_falls_back_to_most_kept():
    # n = 3, c = 2 -> one row kept per subsample; coordinate 0 keeps row 1, coordinate 1 keeps
    # row 2 (the value closest to the mean)
    x = t([[0.0, 0.0], [1.0, 5.0], [5.0, 1.0]])
    agg = A.build("dnc", f=1, c=2.0, b=1, niters=2, seed=0)
    picks = [int(s) for s in agg.coordinates(0, 2)]
    kept = [1 if p == 0 else 2 for p in picks]
    rows = sorted(set(kept))
    assert agg(x).tolist() == x[rows].mean(dim=0).tolist()


def test_dnc_seeded_and_resumable():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(9, 30, generator=g, dtype=torch.float64) for _ in range(4)]
    for x in xs:
        x[0] += 3.0 * torch.randn(30, generator=g, dtype=torch.float64)
    a = A.build("dnc", f=2, b=5, niters=2, seed=11)
    outs = [a(x) for x in xs]
    assert a.state_dict() == {"calls": 4}
    # the same seed replays the same sequence; a resumed copy continues it
    b = A.build("dnc", f=2, b=5, niters=2, seed=11)
    assert torch.equal(b(xs[0]), outs[0])
    state = b.state_dict()
    c = A.build("dnc", f=2, b=5, niters=2, seed=11)
    c.load_state_dict(state)
    assert [torch.equal(c(x), o) for x, o in zip(xs[1:], outs[1:])] == [True] * 3
    # different calls draw different coordinates
    assert not all(torch.equal(p, q) for p, q in zip(a.coordinates(0, 30), a.coordinates(1, 30)))
    # the state travels through the pipeline's checkpoint state
    pipe = RobustPipeline([], A.build("dnc", f=2, b=5, niters=2, seed=11))
    pipe.load_state_dict({"pre": [], "aggregator": {"calls": 2}})
    assert torch.equal(pipe(xs[2]), outs[2])


@pytest.mark.parametrize("state, match", [
    ({}, "exactly the key 'calls'"),
    ({"calls": -1}, "integer >= 0"),
    ({"calls": 1.5}, "integer >= 0"),
    ({"calls": 1, "x": 2}, "exactly the key 'calls'"),
])
def test_dnc_bad_state(state, match):
    with pytest.raises(ValueError, match=match):
        A.build("dnc").load_state_dict(state)


def test_dnc_counts_only_successful_calls():
    agg = A.build("dnc", f=2)
    with pytest.raises(ValueError, match="n=2 rows and f=2"):
        agg(torch.randn(2, 3))
    assert agg.calls == 0


def test_rules_refuse_bad_parameters():
    with pytest.raises(ValueError, match="'reduce' must be one of 'mean', 'sum'"):
        A.build("cge", reduce="median")
    with pytest.raises(ValueError, match="'c' must be a finite number > 0"):
        A.build("dnc", c=0.0)
    with pytest.raises(ValueError, match="'b' must be an integer >= 1"):
        A.build("dnc", b=0)
    with pytest.raises(ValueError, match="'pivot' must be an integer >= 0"):
        A.build("monna", pivot=-1)
    with pytest.raises(ValueError, match="n=4 rows and f=2"):
        A.build("caf", f=2).check(4)


@pytest.mark.parametrize("name", ["dnc", "caf", "smea"])
def test_float64_rows_whose_squares_overflow(name):
    # a Byzantine float64 row near the float64 maximum: distances overflow, the rules compare
    # the distances of the rows scaled down by a power of two instead
    honest = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    x = torch.cat([honest, torch.tensor([[1.7e308, -1.7e308]], dtype=torch.float64)])
    out = A.build(name, f=1)(x)
    assert torch.isfinite(out).all()
    assert bool((out >= 0).all() and (out <= 1).all()), out


def test_dnc_state_survives_a_checkpoint(tmp_path, base_config):
    # the PS writes the pipeline's state into its checkpoint (torch.save, read back with
    # weights_only=True); a resumed dnc continues the coordinate sequence
    from byzps import checkpoint
    from byzps.job import build_robust, parse_config

    base_config["aggregation"] = {"method": "dnc", "f": 1, "params": {"b": 4, "niters": 2}}
    cfg = parse_config(base_config)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 10, generator=g) for _ in range(3)]
    first = build_robust(cfg)
    first(xs[0])
    first(xs[1])
    ckpt = checkpoint.Checkpoint(2, torch.zeros(2, 7), first.state_dict(), torch.get_rng_state(),
                                 checkpoint.fingerprint(cfg))
    checkpoint.save(tmp_path, ckpt)
    resumed = build_robust(cfg)
    resumed.load_state_dict(checkpoint.load(tmp_path, cfg, 7).aggregator_state)
    assert resumed.state_dict() == {"pre": [], "aggregator": {"calls": 2}}
    assert torch.equal(resumed(xs[2]), first(xs[2]))
