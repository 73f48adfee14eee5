"""Aggregators: hand-computed values, independent numpy references, registry and errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from byzps import aggregators as A

ALL = A.names()


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def col(values, dtype=torch.float64):
    """1-D points as an (n, 1) matrix."""
    return torch.tensor([[v] for v in values], dtype=dtype)


# =============================================================================== references
# Independent numpy / pure-Python implementations, written from the papers' definitions.


def np_sqdist(x):
    diff = x[:, None, :] - x[None, :, :]
    return (diff**2).sum(axis=2)


def np_krum_order(dist, f):
    n = dist.shape[0]
    k = max(n - f - 2, 0)
    keys = []
    for i in range(n):
        others = sorted(dist[i, j] for j in range(n) if j != i)
        keys.append((sum(others[:k]), dist[i].sum(), i))
    return [key[2] for key in sorted(keys)]


def np_multi_krum(x, f, q=None):
    n = x.shape[0]
    q = n - f if q is None else q
    order = np_krum_order(np_sqdist(x), f)
    return x[sorted(order[:q])].mean(axis=0)


def np_mean_around_median(values, k):
    med = float(np.median(values))
    chosen = sorted(values, key=lambda v: (abs(v - med), v))[:k]
    return sum(chosen) / k


def np_meamed(x, f):
    n, d = x.shape
    return np.array([np_mean_around_median(list(x[:, j]), n - f) for j in range(d)])


def np_bulyan(x, f):
    n, d = x.shape
    dist = np_sqdist(x)
    remaining = list(range(n))
    chosen = []
    for _ in range(n - 2 * f):
        sub = dist[np.ix_(remaining, remaining)]
        pick = remaining[np_krum_order(sub, f)[0]]
        chosen.append(pick)
        remaining.remove(pick)
    sel = x[sorted(chosen)]
    beta = n - 4 * f
    return np.array([np_mean_around_median(list(sel[:, j]), beta) for j in range(d)])


def np_mda(x, f):
    # smallest diameter; ties -> smallest sum of squared pairwise distances in the subset
    n = x.shape[0]
    sq = np_sqdist(x)
    best, best_set = (math.inf, math.inf), None
    for keep in itertools.combinations(range(n), n - f):
        sub = sq[np.ix_(keep, keep)]
        key = (math.sqrt(sub.max()), sub.sum())
        if key < best:
            best, best_set = key, keep
    return x[list(best_set)].mean(axis=0)


def np_trimmed(x, f):
    s = np.sort(x, axis=0)
    return s[f : x.shape[0] - f].mean(axis=0)


def np_geomed_objective(x, z):
    return np.linalg.norm(x - z[None, :], axis=1).sum()


def np_weiszfeld(x, iters=5000):
    z = x.mean(axis=0)
    for _ in range(iters):
        w = 1.0 / np.maximum(np.linalg.norm(x - z, axis=1), 1e-12)
        z = (w[:, None] * x).sum(axis=0) / w.sum()
    return z


def np_centered_clipping(x, v, tau, iters):
    n = x.shape[0]
    for _ in range(iters):
        diff = x - v
        norms = np.linalg.norm(diff, axis=1)
        scale = np.minimum(1.0, tau / np.maximum(norms, 1e-300))
        v = v + (diff * scale[:, None]).sum(axis=0) / n
    return v


# =============================================================================== hand values


def test_mean_hand():
    # [1,2],[3,4],[5,9] -> [(1+3+5)/3, (2+4+9)/3] = [3, 5]
    out = A.build("mean")(t([[1, 2], [3, 4], [5, 9]]))
    assert out.tolist() == [3.0, 5.0]


def test_median_odd_and_even_hand():
    # odd: column 0 sorted 1,2,3 -> 2 ; column 1 sorted 1,4,5 -> 4
    agg = A.build("coordinate_wise_median")
    assert agg(t([[1, 5], [3, 1], [2, 4]])).tolist() == [2.0, 4.0]
    # even: column 0 sorted 1,2,4,8 -> (2+4)/2 = 3 ; column 1 sorted 0,3,5,10 -> (3+5)/2 = 4
    assert agg(t([[1, 10], [4, 0], [2, 3], [8, 5]])).tolist() == [3.0, 4.0]
    # two rows: mean of the two; one row: that row
    assert agg(t([[1, -3], [2, 5]])).tolist() == [1.5, 1.0]
    assert agg(t([[7, 8]])).tolist() == [7.0, 8.0]


def test_trimmed_mean_hand():
    agg = A.build("trimmed_mean", f=1)
    # [1,2,3,100]: drop 1 and 100 -> (2+3)/2 = 2.5
    assert agg(col([1, 2, 3, 100])).tolist() == [2.5]
    # column 0 sorted 1,2,3,4,100 -> (2+3+4)/3 = 3 ; column 1 sorted -5,0,1,2,3 -> (0+1+2)/3 = 1
    assert agg(t([[1, -5], [2, 0], [3, 1], [100, 2], [4, 3]])).tolist() == [3.0, 1.0]


def test_meamed_hand():
    # n=4, f=1, [0,1,2,10]: median (1+2)/2 = 1.5, distances 1.5,.5,.5,8.5 -> {0,1,2} -> 1
    assert A.build("meamed", f=1)(col([0, 1, 2, 10])).tolist() == [1.0]
    # n=5, f=2, [0,1,2,3,100]: median 2, the 3 closest are 1,2,3 -> 2
    assert A.build("meamed", f=2)(col([0, 1, 2, 3, 100])).tolist() == [2.0]
    # tie: [0,1,2,3], f=1: median 1.5, 0 and 3 both at 1.5 -> lower value wins -> {0,1,2} -> 1
    assert A.build("meamed", f=1)(col([3, 2, 1, 0])).tolist() == [1.0]
    # f=0: all values -> the mean
    assert A.build("meamed", f=0)(col([0, 1, 5])).tolist() == [2.0]


def test_krum_and_multi_krum_hand():
    # points 0,1,2,3,100, f=1 -> n-f-2 = 2 neighbours; squared distances:
    #   0: 1+4 = 5    1: 1+1 = 2    2: 1+1 = 2    3: 1+4 = 5    100: 97^2+98^2 = 19013
    # 1 and 2 tie (2); totals: row 1: 1+0+1+4+99^2 = 9807, row 2: 4+1+0+1+98^2 = 9610 -> row 2
    x = col([0, 1, 2, 3, 100])
    assert A.build("krum", f=1)(x).tolist() == [2.0]
    # q defaults to n - f = 4: rows 2,1 then 0/3 (score 5; totals 10014 vs 9423 -> 3 first), 0
    assert A.build("multi_krum", f=1)(x).tolist() == [1.5]  # (0+1+2+3)/4
    assert A.build("multi_krum", f=1, q=2)(x).tolist() == [1.5]  # (1+2)/2
    assert A.build("multi_krum", f=1, q=3)(x).tolist() == [2.0]  # (1+2+3)/3
    # without the tie: points 0, 1, 1.5, 9, f=1, n=4 -> one neighbour: 0:1, 1:0.25, 1.5:0.25,
    # 9:56.25; rows 1 and 1.5 tie, totals 1+0.25+64 = 65.25 vs 2.25+0.25+56.25 = 58.75 -> 1.5
    assert A.build("krum", f=1)(col([0, 1, 1.5, 9])).tolist() == [1.5]


def test_bulyan_hand():
    # points 0,1,2,3,4,5,100, f=1: theta = 5 rows chosen by repeated Krum, beta = 3.
    #  7 left, 4 neighbours: scores 0:30 1:15 2:10 3:10 4:15 5:30; tie 2/3, totals 9623 vs
    #    9428 -> 3
    #  6 left (0,1,2,4,5,100), 3 neighbours: 0:21 1:11 2:9 4:14 5:26 -> 2
    #  5 left (0,1,4,5,100), 2 neighbours: 0:17 1:10 4:10 5:17; tie 1/4, totals 9827 vs 9242
    #    -> 4
    #  4 left (0,1,5,100), 1 neighbour: 0:1 1:1 5:16; tie 0/1, totals 10026 vs 9818 -> 1
    #  3 left (0,5,100), 0 neighbours: scores 0; totals 10025, 9050, 19025 -> 5
    # selection {1,2,3,4,5}; the 3 closest to its median 3 are 2,3,4 -> 3
    x = col([0, 1, 2, 3, 4, 5, 100])
    agg = A.build("bulyan", f=1)
    assert agg.select(x).tolist() == [1, 2, 3, 4, 5]
    assert agg(x).tolist() == [3.0]


def test_mda_hand():
    # [0,1,3,10], f=1, subsets of 3: {0,1,3} diam 3, {0,1,10} 10, {0,3,10} 10, {1,3,10} 9
    # -> {0,1,3}, mean 4/3
    out = A.build("mda", f=1)(col([0, 1, 3, 10]))
    assert out.item() == pytest.approx(4 / 3, abs=1e-15)
    # f = 0: the mean
    assert A.build("mda", f=0)(col([0, 1, 5])).tolist() == [2.0]


def test_geometric_median_hand():
    # corners of a square: the centre (1, 1) (also the start: coordinate medians (0+2)/2)
    agg = A.build("geometric_median")
    assert agg(t([[0, 0], [2, 0], [0, 2], [2, 2]])).tolist() == [1.0, 1.0]
    # equilateral triangle: the Fermat point is the centroid (2, 2/sqrt(3))
    tri = t([[0, 0], [4, 0], [2, 2 * math.sqrt(3)]])
    out = A.build("geometric_median", tol=1e-12, max_iter=1000)(tri)
    assert out.tolist() == pytest.approx([2.0, 2 / math.sqrt(3)], abs=1e-6)
    # 1-D, odd count: the geometric median is the median (start point, 0 is optimal)
    assert agg(col([0, 1, 1000])).tolist() == [1.0]
    # 1-D, even count: any point of [1, 2] is optimal
    v = agg(col([0, 1, 2, 1000])).item()
    assert 1.0 <= v <= 2.0


def test_centered_clipping_hand_and_state():
    x = col([0, 1, 1.5, 100])
    agg = A.build("centered_clipping", tau=1.0, init="zero")
    # centre 0: differences 0,1,1.5,100 -> clipped 0,1,1,1 -> v = 0 + 3/4 = 0.75
    assert agg(x).tolist() == [0.75]
    assert agg.state_dict()["center"].tolist() == [0.75]
    saved = agg.state_dict()
    # centre 0.75: differences -0.75,.25,.75,99.25 -> clipped -.75,.25,.75,1 -> sum 1.25
    # -> v = 0.75 + 1.25/4 = 1.0625
    assert agg(x).tolist() == [1.0625]
    # a fresh object restored from the checkpoint continues identically
    other = A.build("centered_clipping", tau=1.0, init="zero")
    other.load_state_dict(saved)
    assert other(x).tolist() == [1.0625]
    # two iterations in one call from 0 = the two calls above
    two = A.build("centered_clipping", tau=1.0, iterations=2, init="zero")
    assert two(x).tolist() == [1.0625]
    # median init: centre (1+1.5)/2 = 1.25; differences -1.25,-.25,.25,98.75
    # -> clipped -1,-.25,.25,1 -> sum 0 -> 1.25
    med = A.build("centered_clipping", tau=1.0)
    assert med.state_dict() == {"center": None}
    assert med(x).tolist() == [1.25]
    med.reset()
    assert med.state_dict() == {"center": None}


def test_centered_clipping_state_errors():
    agg = A.build("centered_clipping")
    agg(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="d=5"):
        agg(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="center"):
        agg.load_state_dict({"centre": torch.zeros(4)})
    with pytest.raises(ValueError, match="finite"):
        agg.load_state_dict({"center": torch.tensor([math.nan])})
    agg.load_state_dict({"center": None})
    assert agg.center is None


def test_stateless_state_dict():
    for name in ALL:
        agg = A.build(name)
        if name in ("centered_clipping", "dnc"):  # state tested with the rule
            continue
        assert agg.state_dict() == {}
        agg.load_state_dict({})
        with pytest.raises(ValueError, match="stateless"):
            agg.load_state_dict({"x": 1})


# =============================================================================== references


def _random(seed, n, d, dtype=torch.float64):
    g = np.random.default_rng(seed)
    return g.normal(size=(n, d)) * g.uniform(0.5, 3.0) + g.normal(size=d)


@pytest.mark.parametrize("seed", range(6))
def test_against_numpy_references(seed):
    g = np.random.default_rng(100 + seed)
    n = int(g.integers(7, 13))
    d = int(g.integers(1, 9))
    x = _random(seed, n, d)
    f = int(g.integers(0, (n - 3) // 4 + 1))  # valid for every rule, bulyan included
    tx = torch.from_numpy(x)

    def run(name, **kw):
        return A.build(name, f=f, **kw)(tx).numpy()

    np.testing.assert_allclose(run("mean"), x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(run("coordinate_wise_median"), np.median(x, axis=0),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(run("trimmed_mean"), np_trimmed(x, f), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(run("meamed"), np_meamed(x, f), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(run("krum"), np_multi_krum(x, f, 1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(run("multi_krum"), np_multi_krum(x, f), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(run("multi_krum", q=2), np_multi_krum(x, f, 2), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(run("bulyan"), np_bulyan(x, f), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(run("mda"), np_mda(x, f), rtol=1e-12, atol=1e-12)
    # geometric median: compare the objective with a long plain Weiszfeld run
    gm = run("geometric_median", tol=1e-12, max_iter=2000)
    ref = np_weiszfeld(x)
    assert np_geomed_objective(x, gm) <= np_geomed_objective(x, ref) * (1 + 1e-9)
    np.testing.assert_allclose(gm, ref, atol=1e-5)
    # centered clipping from the median with 3 iterations
    tau = float(np.median(np.linalg.norm(x - np.median(x, axis=0), axis=1)))
    cc = run("centered_clipping", tau=tau, iterations=3)
    np.testing.assert_allclose(cc, np_centered_clipping(x, np.median(x, axis=0), tau, 3),
                               rtol=1e-12, atol=1e-12)


def test_float32_matches_float64_reference():
    x = _random(7, 15, 40)
    tx = torch.from_numpy(x).float()
    x32 = tx.double().numpy()
    for name, ref in [
        ("coordinate_wise_median", np.median(x32, axis=0)),
        ("trimmed_mean", np_trimmed(x32, 3)),
        ("meamed", np_meamed(x32, 3)),
        ("multi_krum", np_multi_krum(x32, 3)),
        ("bulyan", np_bulyan(x32, 3)),
    ]:
        out = A.build(name, f=3)(tx)
        assert out.dtype == torch.float32
        np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-6, atol=1e-6)


def test_chunked_paths_match_unchunked(monkeypatch):
    """Force tiny column chunks: every rule must give the same result."""
    from byzps.aggregators import _chunks

    x = torch.from_numpy(_random(3, 11, 37))
    expected = {name: A.build(name, f=2)(x) for name in ALL}
    monkeypatch.setattr(_chunks, "CHUNK_ELEMENTS", 16)
    assert _chunks.chunk_columns(11, 37) == 1
    for name in ALL:
        torch.testing.assert_close(A.build(name, f=2)(x), expected[name], rtol=1e-12,
                                   atol=1e-12)


def test_distances_translation_and_float32_precision():
    from byzps.aggregators._distances import pairwise_sq_dists

    g = np.random.default_rng(0)
    small = g.normal(size=(6, 1000))
    # a common offset 1e4 times larger than the spread: the uncentred Gram trick in float32
    # would lose every digit of the honest distances
    shifted = torch.from_numpy(small + 1e4 * g.normal(size=1000)).float()
    ref = np_sqdist(shifted.double().numpy())
    np.testing.assert_allclose(pairwise_sq_dists(shifted).numpy(), ref, rtol=1e-9)
    # row 0 a huge outlier (a Byzantine 1e30 row): the distances are recomputed around a
    # central row, so the honest block keeps its precision
    outlier = shifted.clone()
    outlier[0] = 1e30
    got = pairwise_sq_dists(outlier).numpy()
    np.testing.assert_allclose(got[1:, 1:], ref[1:, 1:], rtol=1e-9)
    assert (got[0, 1:] > 1e59).all()
    # integer data: a translation changes nothing at all
    ints = torch.from_numpy(g.integers(-50, 50, size=(7, 30)).astype(np.float64))
    v = torch.from_numpy(g.integers(-10**6, 10**6, size=30).astype(np.float64))
    assert torch.equal(pairwise_sq_dists(ints), pairwise_sq_dists(ints + v))


def test_huge_float64_rows_distances_finite():
    from byzps.aggregators._distances import pairwise_sq_dists

    x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1e300, -1e300], [0.5, 0.5]], dtype=torch.float64)
    dist = pairwise_sq_dists(x)
    assert torch.isfinite(dist).all()
    # the huge row stays the farthest from everybody
    assert int(torch.argmax(dist[0])) == 2
    out = A.build("krum", f=1)(x)
    assert torch.isfinite(out).all() and out.abs().max() <= 1


# =============================================================================== non-finite rows


@pytest.mark.parametrize("name", ALL)
def test_nonfinite_rows_are_dropped(name):
    g = np.random.default_rng(1)
    honest = torch.from_numpy(g.normal(size=(9, 5)))
    bad = torch.full((2, 5), 1.0, dtype=torch.float64)
    bad[0, 3] = math.nan
    bad[1, 0] = -math.inf
    x = torch.cat([honest[:4], bad, honest[4:]])
    # f=2 with 2 dropped rows -> the rule runs on the honest rows with f=0
    out = A.build(name, f=2)(x)
    ref = A.build(name, f=0)(honest)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("name", ALL)
def test_all_rows_nonfinite_raise(name):
    x = torch.full((5, 3), math.nan)
    with pytest.raises(ValueError, match="NaN or Inf"):
        A.build(name)(x)


def test_dropping_more_rows_than_f_floors_f_at_zero():
    x = torch.tensor([[0.0], [1.0], [2.0], [math.inf], [math.nan]])
    assert A.build("trimmed_mean", f=1)(x).tolist() == [1.0]  # f -> 0: mean of 0,1,2
    with pytest.raises(ValueError, match="after dropping 2"):
        A.build("krum", f=1)(torch.tensor([[0.0], [1.0], [math.inf], [math.nan]]))


# =============================================================================== misc behaviour


@pytest.mark.parametrize("name", ALL)
def test_shape_dtype_preserved_and_no_grad(name):
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(9, 6, dtype=dtype, requires_grad=True)
        out = A.build(name, f=1)(x)
        assert out.shape == (6,) and out.dtype == dtype and not out.requires_grad


def test_input_validation():
    agg = A.build("mean")
    with pytest.raises(TypeError, match="torch.Tensor"):
        agg([[1.0, 2.0]])
    with pytest.raises(TypeError, match="float32 or float64"):
        agg(torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="float32 or float64"):
        agg(torch.ones(3, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="2-D"):
        agg(torch.ones(3))
    with pytest.raises(ValueError, match="no gradients"):
        agg(torch.ones(0, 3))
    with pytest.raises(ValueError, match="no coordinates"):
        agg(torch.ones(3, 0))


def test_krum_returns_a_copy():
    x = torch.randn(6, 3)
    before = x.clone()
    A.build("krum", f=1)(x).zero_()
    assert torch.equal(x, before)


def test_inputs_not_modified():
    x = torch.randn(11, 7, dtype=torch.float64)
    before = x.clone()
    for name in ALL:
        A.build(name, f=2)(x)
        assert torch.equal(x, before), name


# =============================================================================== registry


def test_names_and_params():
    assert ALL == sorted(ALL)
    assert set(ALL) == {
        "mean", "coordinate_wise_median", "trimmed_mean", "geometric_median", "krum",
        "multi_krum", "bulyan", "centered_clipping", "meamed", "mda", "dnc", "caf", "smea",
        "monna", "cge",
    }
    assert A.params("multi_krum") == {"f": 0, "q": None}
    assert A.params("krum") == {"f": 0}
    assert A.params("geometric_median") == {"f": 0, "tol": 1e-6, "max_iter": 100, "eps": 1e-8}
    assert A.params("centered_clipping") == {"f": 0, "tau": 10.0, "iterations": 1,
                                             "init": "median"}
    assert A.params("mda") == {"f": 0, "limit": 100000}
    assert A.params("smea") == {"f": 0, "limit": 100000}
    assert A.params("dnc") == {"f": 0, "niters": 5, "b": 10000, "c": 1.0, "seed": 0}
    assert A.params("caf") == {"f": 0}
    assert A.params("monna") == {"f": 0, "pivot": 0}
    assert A.params("cge") == {"f": 0, "reduce": "mean"}
    for name in ALL:
        agg = A.build(name)
        assert agg.name == name and agg.f == 0
        assert set(agg.params) == set(A.params(name))
        assert name in repr(agg) or type(agg).__name__ in repr(agg)


def test_build_example_from_brief():
    agg = A.build("multi_krum", f=1, q=3)
    assert (agg.name, agg.f, agg.q) == ("multi_krum", 1, 3)
    assert agg(torch.randn(5, 4)).shape == (4,)


def test_unknown_name():
    with pytest.raises(ValueError, match="valid choices: bulyan, caf, centered_clipping"):
        A.build("krumm")
    with pytest.raises(ValueError, match="unknown aggregator"):
        A.params("nope")
    with pytest.raises(ValueError, match="unknown aggregator"):
        A.build("nnm")  # a pre-aggregator, not an aggregator


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("krum", {"f": -1}, "'f' must be an integer >= 0"),
        ("krum", {"f": 1.5}, "'f' must be an integer"),
        ("krum", {"f": True}, "'f' must be an integer"),
        ("krum", {"f": "1"}, "'f' must be an integer"),
        ("krum", {"q": 2}, "unknown parameter"),
        ("multi_krum", {"q": 0}, "'q' must be an integer >= 1 or None"),
        ("multi_krum", {"m": 3}, "valid parameters: f, q"),
        ("geometric_median", {"tol": 0}, "'tol' must be a finite number > 0"),
        ("geometric_median", {"eps": math.nan}, "'eps'"),
        ("geometric_median", {"max_iter": 0}, "'max_iter' must be an integer >= 1"),
        ("centered_clipping", {"tau": -1.0}, "'tau'"),
        ("centered_clipping", {"init": "mean"}, "one of 'median', 'zero'"),
        ("centered_clipping", {"iterations": 2.0}, "'iterations' must be an integer"),
        ("mda", {"limit": 0}, "'limit'"),
        ("mean", {"tau": 1.0}, "unknown parameter"),
    ],
)
def test_bad_parameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        A.build(name, **kwargs)


def test_numpy_integers_accepted():
    agg = A.build("multi_krum", f=np.int64(1), q=np.int32(2))
    assert agg.f == 1 and agg.q == 2 and type(agg.f) is int
    assert A.build("centered_clipping", tau=3).tau == 3.0


# =============================================================================== preconditions


@pytest.mark.parametrize(
    "name, f, smallest_n",
    [
        ("trimmed_mean", 2, 5),  # n > 2f
        ("krum", 2, 5),  # n >= f + 3
        ("multi_krum", 2, 5),
        ("bulyan", 2, 11),  # n >= 4f + 3
        ("meamed", 2, 3),  # n > f
        ("mda", 2, 3),  # n > f
        ("mean", 2, 1),
        ("coordinate_wise_median", 2, 1),
        ("geometric_median", 2, 1),
        ("centered_clipping", 2, 1),
        ("dnc", 2, 3),  # n > ceil(c f)
        ("caf", 2, 5),  # n > 2f
        ("smea", 2, 3),  # n > f
        ("monna", 2, 3),  # n > f
        ("cge", 2, 3),  # n > f
    ],
)
def test_check_preconditions(name, f, smallest_n):
    agg = A.build(name, f=f)
    agg.check(smallest_n)
    agg(torch.randn(smallest_n, 3))
    if smallest_n > 1:
        with pytest.raises(ValueError) as info:
            agg.check(smallest_n - 1)
        msg = str(info.value)
        assert f"n={smallest_n - 1}" in msg and f"f={f}" in msg and name in msg
        with pytest.raises(ValueError, match=f"n={smallest_n - 1}"):
            agg(torch.randn(smallest_n - 1, 3))
    with pytest.raises(ValueError):
        agg.check(-1)


def test_krum_warning_band():
    agg = A.build("krum", f=1)
    # the seed's example: 4 workers, f = 1 -> runs (f + 3 = 4) but below 2f + 3 = 5
    agg.check(4)
    msg = agg.warning(4)
    assert msg is not None and "2f + 3" in msg and "n=4" in msg and "f=1" in msg
    assert agg.warning(5) is None
    assert agg.warning(3) is None  # check raises instead
    with pytest.raises(ValueError, match="f \\+ 3"):
        agg.check(3)
    assert A.build("multi_krum", f=2).warning(6) is not None
    assert A.build("multi_krum", f=2).warning(7) is None


def test_warnings_of_other_rules():
    assert A.build("mean").warning(5) is None
    assert "not robust" in A.build("mean", f=1).warning(5)
    for name in ("coordinate_wise_median", "geometric_median", "centered_clipping", "meamed",
                 "mda", "smea", "cge"):
        assert A.build(name, f=2).warning(4) is not None, name
        assert A.build(name, f=2).warning(5) is None, name
    assert A.build("bulyan", f=1).warning(7) is None
    # no worst-case guarantee at all (dnc) / one the PS cannot check (monna's honest pivot)
    assert "no worst-case guarantee" in A.build("dnc", f=1).warning(9)
    assert "pivot row (position 0)" in A.build("monna", f=1).warning(9)
    assert A.build("dnc").warning(3) is None and A.build("monna").warning(3) is None
    assert A.build("trimmed_mean", f=1).warning(3) is None


def test_multi_krum_q_range():
    agg = A.build("multi_krum", f=1, q=4)
    agg.check(5)
    with pytest.raises(ValueError, match="q=4 must be <= n - f = 3"):
        agg.check(4)
    # at call time with dropped rows q is capped at n' - f'
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [math.nan]])
    # 4 finite rows, f' = 0 -> q capped at 4 -> mean of all
    assert agg(x).tolist() == [1.5]


def test_mda_limit():
    agg = A.build("mda", f=5, limit=100)
    with pytest.raises(ValueError, match=r"C\(n, f\) = 252 subsets, more than limit=100"):
        agg.check(10)
    A.build("mda", f=5, limit=252).check(10)
    with pytest.raises(ValueError, match="limit"):
        A.build("mda", f=10)(torch.randn(40, 2))  # C(40, 10) ~ 8.5e8 > 100000


def test_mda_batches_many_subsets():
    x = torch.from_numpy(_random(11, 14, 3))
    out = A.build("mda", f=4)(x)  # C(14, 4) = 1001 subsets, one batch
    np.testing.assert_allclose(out.numpy(), np_mda(x.numpy(), 4), rtol=1e-12)
    from byzps.aggregators import mda as mda_module

    old = mda_module._BATCH_ENTRIES
    try:
        mda_module._BATCH_ENTRIES = 14 * 14 * 7  # 7 subsets per batch -> 143 batches
        out2 = A.build("mda", f=4)(x)
    finally:
        mda_module._BATCH_ENTRIES = old
    assert torch.equal(out, out2)


def test_mda_ignores_huge_float64_rows_regression():
    """Found by hypothesis: with a float64 row near the float max next to a 1e30 row, a common
    rescaling flushed all small distances to zero and MDA averaged the 1e30 row in."""
    x = torch.tensor([[float("nan")], [-1.321], [1e30], [1.7976931348623157e308], [-5.3567],
                      [3.616], [13.04]], dtype=torch.float64)
    out = A.build("mda", f=3)(x)
    # NaN row dropped -> n' = 6, f' = 2: the 4-subset of least diameter is the 4 small values
    assert torch.allclose(out, torch.tensor([(-1.321 - 5.3567 + 3.616 + 13.04) / 4],
                                            dtype=torch.float64))


# ======================================================== fast path: NaN/Inf found without a scan


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [8, 11, 16])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_nonfinite_entry_found_by_fast_path(monkeypatch, name, n, value, dtype):
    """Rules first run on the unscanned rows and detect NaN/Inf as a by-product (sorting-network
    extremes, float64 sums, Gram matrix, norms); one bad entry anywhere, in any column block
    (tiny blocks forced) and with or without the +inf padding of the sorting network (n not a
    power of two), must give the rule on the other rows with f lowered by one."""
    from byzps.aggregators import _chunks

    monkeypatch.setattr(_chunks, "CHUNK_ELEMENTS", 64)
    g = np.random.default_rng(n)
    honest = torch.from_numpy(_random(n, n - 1, 23)).to(dtype)
    f = 2 if name != "bulyan" else max(0, (n - 1 - 3) // 4)
    f = 1 if name == "mean" else f
    for row, col_ in [(0, 0), (n - 1, 22), (int(g.integers(n)), int(g.integers(23)))]:
        x = torch.cat([honest[:row], torch.zeros(1, 23, dtype=dtype), honest[row:]])
        x[row, col_] = value
        out = A.build(name, f=f)(x)
        ref = A.build(name, f=f - 1)(honest)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_fast_path_result_equals_scanned_path():
    """Without NaN/Inf the fast path is the careful path: same numbers (random rules/shapes)."""
    from byzps.aggregators import _base

    x = torch.from_numpy(_random(5, 13, 40))
    for name in ALL:
        fast = A.build(name, f=2)(x)
        slow = A.build(name, f=2)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(type(slow), "_fast_path", False)
            assert torch.equal(slow(x), fast), name
    assert _base.Aggregator._fast_path is False


def test_float64_overflow_goes_down_the_careful_path():
    # finite float64 rows whose float64 sums overflow: the fast path must give way, and the
    # careful path keeps the old overflow handling (mean as the sum of row / n)
    x = torch.tensor([[1e308, -1e308], [1e308, -1e308], [1e308, -1e308]], dtype=torch.float64)
    assert A.build("mean")(x).tolist() == [1e308, -1e308]
    assert A.build("geometric_median")(x).tolist() == [1e308, -1e308]


# ======================================================================== sorting network


@pytest.mark.parametrize("n", list(range(1, 20)) + [31, 32, 33, 63, 64, 65])
def test_sorting_network_sorts_columns(monkeypatch, n):
    from byzps.aggregators import _chunks, _sorting

    monkeypatch.setattr(_chunks, "CHUNK_ELEMENTS", 256)  # several column blocks
    g = np.random.default_rng(n)
    for dtype in (torch.float32, torch.float64):
        # integers (many ties), signed zeros and huge values
        x = torch.from_numpy(g.integers(-4, 5, size=(n, 29)).astype(np.float64)).to(dtype)
        x[0, :3] = torch.tensor([-0.0, 3e38, -3e38], dtype=dtype)
        ref = torch.sort(x, dim=0).values
        got = torch.cat([s.clone() for _, _, s in _sorting.sorted_column_chunks(x)], dim=1)
        assert torch.equal(got, ref)
        rows = torch.tensor(sorted(g.choice(n, size=max(1, n // 2), replace=False).tolist()))
        got = torch.cat([s.clone() for _, _, s in _sorting.sorted_column_chunks(x, rows)], dim=1)
        assert torch.equal(got, torch.sort(x[rows], dim=0).values)
        med = _sorting.coordinate_median(x)
        np.testing.assert_array_equal(med.double().numpy(),
                                      np.median(x.double().numpy(), axis=0).astype(
                                          np.float32 if dtype == torch.float32 else np.float64))


def test_bitonic_select_ranks():
    from byzps.aggregators._sorting import bitonic_select

    g = np.random.default_rng(0)
    for big in (2, 4, 8, 16, 32):
        v = torch.from_numpy(g.normal(size=(big, 7)))
        h = big // 2
        bitonic = torch.cat([torch.sort(v[:h], 0).values,
                             torch.sort(v[h:], 0, descending=True).values])
        ref = torch.sort(v, 0).values
        for k in range(1, big + 1):
            lo, hi = bitonic_select(bitonic.clone(), torch.empty_like(v), k, min(k + 1, big))
            assert torch.equal(lo, ref[k - 1])
            assert torch.equal(hi, ref[min(k, big - 1)])


def test_helpers_all_finite_and_empty_output():
    from byzps.aggregators._chunks import empty_output
    from byzps.aggregators._finite import all_finite

    assert all_finite(torch.zeros(0))
    assert all_finite(torch.tensor([1.0, -3e38]))
    assert not all_finite(torch.tensor([1.0, math.nan]))
    assert not all_finite(torch.tensor([-math.inf, 1.0], dtype=torch.float64))
    like = torch.zeros(1, dtype=torch.float64)
    big = empty_output((3, 1 << 20), like)  # 24 MiB: huge-page advice path
    assert big.shape == (3, 1 << 20) and big.dtype == torch.float64
    big.fill_(2.0)
    assert float(big.sum()) == 6.0 * (1 << 20)


# ================================================================ geometric median: data points


def test_geometric_median_at_a_data_row_is_exact():
    # the optimum is a data row: Weiszfeld only creeps towards it; the optimality test of
    # Vardi & Zhang returns the row itself. [1, 1]: 3 copies of it outweigh the 2 others
    x = t([[1, 1], [1, 1], [1, 1], [5, 1], [1, 9]])
    assert A.build("geometric_median")(x).tolist() == [1.0, 1.0]
    x32 = x.float()
    assert A.build("geometric_median")(x32).tolist() == [1.0, 1.0]
    # square corners plus (1, 1.5): the unit vectors from (1, 1.5) to the corners sum to
    # (0, -0.77), of norm <= 1, so that row is the geometric median, returned exactly
    sq = t([[0, 0], [2, 0], [0, 2], [2, 2], [1, 1.5]])
    assert A.build("geometric_median")(sq).tolist() == [1.0, 1.5]
    # (1, 3) instead: the unit vectors sum to norm > 1, the median is not a data row
    far = t([[0, 0], [2, 0], [0, 2], [2, 2], [1, 3]])
    out = A.build("geometric_median", tol=1e-12, max_iter=1000)(far)
    assert out.tolist() not in far.tolist()
    from byzps.aggregators.geometric_median import row_is_geometric_median

    assert row_is_geometric_median(x, 0) and row_is_geometric_median(sq, 4)
    assert not row_is_geometric_median(x, 3) and not row_is_geometric_median(far, 4)


def test_geometric_median_outlier_uses_median_start():
    # a 1e30 row would pull the mean start far away: the median start keeps few iterations
    g = np.random.default_rng(3)
    honest = g.normal(size=(9, 50))
    x = torch.from_numpy(np.vstack([honest, np.full((1, 50), 1e30)]))
    out = A.build("geometric_median", max_iter=20)(x)
    assert float(out.abs().max()) < 10
