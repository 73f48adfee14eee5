"""Pre-aggregators: hand values, numpy references, NaN handling, state, registry, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from byzps import aggregators as A
from byzps.aggregators.arc import arc_clipped_count

SETTINGS = settings(deadline=None, max_examples=40,
                    suppress_health_check=[HealthCheck.too_slow])


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def rand(seed, n, d):
    g = np.random.default_rng(seed)
    return g.normal(size=(n, d)) * g.uniform(0.5, 5) + g.normal(size=d)


# ============================================================================ references


def np_clip(x, c):
    norms = np.linalg.norm(x, axis=1)
    return x * np.minimum(1.0, c / np.maximum(norms, 1e-300))[:, None]


def np_arc(x, f):
    n = x.shape[0]
    k = int(math.floor(2 * (f / n) * (n - f)))
    norms = np.linalg.norm(x, axis=1)
    c = sorted(norms, reverse=True)[k]
    return np_clip(x, c) if k > 0 else x.copy()


def np_nnm(x, f):
    n = x.shape[0]
    out = np.empty_like(x)
    for i in range(n):
        dist = [(0.0 if j == i else float(((x[i] - x[j]) ** 2).sum()), j != i, j)
                for j in range(n)]
        near = [j for _, _, j in sorted(dist)[: n - f]]
        out[i] = x[near].mean(axis=0)
    return out


# ============================================================================ hand values


def test_clipping_hand():
    # norms 5 (kept: not above the threshold), 10 (-> scaled by 5/10), 0 (kept)
    out = A.build_pre("clipping", threshold=5.0)(t([[3, 4], [6, 8], [0, 0]]))
    assert out.tolist() == [[3.0, 4.0], [3.0, 4.0], [0.0, 0.0]]


def test_arc_count_table():
    # k = floor(2 (f/n) (n - f))
    assert arc_clipped_count(4, 1) == 1  # 2*1*3/4 = 1.5
    assert arc_clipped_count(5, 2) == 2  # 2*2*3/5 = 2.4
    assert arc_clipped_count(3, 1) == 1  # 2*1*2/3 = 1.33
    assert arc_clipped_count(10, 3) == 4  # 2*3*7/10 = 4.2
    assert arc_clipped_count(7, 3) == 3  # 24/7 = 3.43
    assert arc_clipped_count(10, 0) == 0
    assert arc_clipped_count(4, 2) == 2  # 2*2*2/4 = 2 (f = n/2)
    assert arc_clipped_count(4, 4) == 0  # n - f = 0
    assert arc_clipped_count(0, 0) == 0


def test_arc_hand():
    # n=4, f=1 -> k=1; norms 1, 2, 5, 50 -> C = second largest = 5; [30,40] -> [3,4]
    x = t([[1, 0], [0, 2], [3, 4], [30, 40]])
    assert A.build_pre("arc", f=1)(x).tolist() == [[1, 0], [0, 2], [3, 4], [3, 4]]
    # n=5, f=2 -> k=2; norms 1, 2, 3, 4, 5 -> C = 3; rows of norm 4, 5 scaled to norm 3
    y = t([[1, 0], [0, 2], [3, 0], [0, 4], [5, 0]])
    assert A.build_pre("arc", f=2)(y).tolist() == [[1, 0], [0, 2], [3, 0], [0, 3], [3, 0]]
    # f = 0: unchanged
    assert torch.equal(A.build_pre("arc")(x), x)


def test_nnm_hand():
    # 1-D [0, 1, 3, 10], f=1 -> 3 nearest including itself:
    #   0 -> {0,1,3} ; 1 -> {1,0,3} ; 3 -> {3,1,0} (2, 3 < 7) ; 10 -> {10,3,1} (7, 9 < 10)
    out = A.build_pre("nnm", f=1)(t([[0], [1], [3], [10]]))
    assert out[:, 0].tolist() == pytest.approx([4 / 3, 4 / 3, 4 / 3, 14 / 3], abs=1e-15)
    # f = 0: every row becomes the mean
    assert A.build_pre("nnm")(t([[0], [1], [5]])).tolist() == [[2.0], [2.0], [2.0]]


def test_bucketing_hand():
    x = t([[0], [10], [20], [30], [40]])
    pre = A.build_pre("bucketing", s=2, seed=7)
    perm = pre.permutation(0, 5).tolist()
    out = pre(x)
    # buckets: perm[0:2], perm[2:4], perm[4:5]; means of the values 10 * index
    expected = [[10 * (perm[0] + perm[1]) / 2], [10 * (perm[2] + perm[3]) / 2], [10 * perm[4]]]
    assert out.tolist() == expected
    assert sorted(perm) == [0, 1, 2, 3, 4]
    assert pre.state_dict() == {"calls": 1}
    # s >= n: one bucket, the mean
    assert A.build_pre("bucketing", s=8)(x).tolist() == [[20.0]]


# ============================================================================ references


@pytest.mark.parametrize("seed", range(5))
def test_against_numpy_references(seed):
    g = np.random.default_rng(seed)
    n = int(g.integers(3, 12))
    x = rand(seed, n, int(g.integers(1, 7)))
    f = int(g.integers(0, (n - 1) // 2 + 1))
    tx = torch.from_numpy(x)
    c = float(np.median(np.linalg.norm(x, axis=1)))
    np.testing.assert_allclose(A.build_pre("clipping", threshold=c)(tx).numpy(), np_clip(x, c),
                               rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(A.build_pre("arc", f=f)(tx).numpy(), np_arc(x, f),
                               rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(A.build_pre("nnm", f=f)(tx).numpy(), np_nnm(x, f),
                               rtol=1e-12, atol=1e-12)


def test_float32_supported():
    x = torch.from_numpy(rand(1, 9, 20)).float()
    for name in A.pre_names():
        out = A.build_pre(name, f=2)(x)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ============================================================================ bucketing state


def test_bucketing_deterministic_per_call_index():
    x = torch.from_numpy(rand(2, 10, 3))
    a = A.build_pre("bucketing", s=3, seed=11)
    b = A.build_pre("bucketing", s=3, seed=11)
    outs_a = [a(x) for _ in range(4)]
    outs_b = [b(x) for _ in range(4)]
    for u, v in zip(outs_a, outs_b):
        assert torch.equal(u, v)
    # different call indices give different permutations (for 10 rows, almost surely)
    perms = {tuple(a.permutation(i, 10).tolist()) for i in range(20)}
    assert len(perms) > 15
    # different seeds differ
    assert a.permutation(0, 10).tolist() != A.build_pre("bucketing", seed=12).permutation(
        0, 10).tolist()
    # resuming from a checkpoint continues the sequence
    c = A.build_pre("bucketing", s=3, seed=11)
    c.load_state_dict({"calls": 2})
    assert torch.equal(c(x), outs_a[2])
    assert c.state_dict() == {"calls": 3}


def test_bucketing_state_errors_and_rows():
    pre = A.build_pre("bucketing", s=3)
    with pytest.raises(ValueError, match="calls"):
        pre.load_state_dict({"call": 1})
    with pytest.raises(ValueError, match="calls"):
        pre.load_state_dict({"calls": -1})
    pre.load_state_dict({"calls": torch.tensor(5)})
    assert pre.calls == 5
    assert [pre.output_rows(n) for n in (1, 2, 3, 4, 7, 9)] == [1, 1, 1, 2, 3, 3]
    assert A.build_pre("nnm", f=1).output_rows(7) == 7


def test_bucketing_negative_and_huge_seed():
    for seed in (-5, 2**70):
        out = A.build_pre("bucketing", seed=seed)(torch.randn(5, 2))
        assert out.shape == (3, 2)


# ============================================================================ non-finite rows


@pytest.mark.parametrize("name", ["clipping", "nnm", "arc"])
def test_nonfinite_rows_become_nan_rows(name):
    honest = torch.from_numpy(rand(3, 7, 4))
    x = honest.clone()
    x[2, 1] = math.nan
    x[5, 0] = math.inf
    out = A.build_pre(name, f=2)(x)
    assert out.shape == x.shape
    assert torch.isnan(out[[2, 5]]).all()
    keep = [0, 1, 3, 4, 6]
    ref = A.build_pre(name, f=0)(honest[keep])  # f lowered by the 2 dropped rows
    torch.testing.assert_close(out[keep], ref)


def test_bucketing_nonfinite_bucket_is_nan():
    x = torch.from_numpy(rand(4, 6, 2))
    x[4] = math.inf
    pre = A.build_pre("bucketing", s=2, seed=3)
    perm = pre.permutation(0, 6).tolist()
    out = pre(x)
    bad_bucket = perm.index(4) // 2
    assert torch.isnan(out[bad_bucket]).all()
    assert torch.isfinite(out[[b for b in range(3) if b != bad_bucket]]).all()


@pytest.mark.parametrize("name", ["clipping", "nnm", "arc", "bucketing"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_nonfinite_entry_found_by_fast_path(name, value, dtype):
    """Pre-aggregators first run on unscanned rows and detect NaN/Inf from their own norms,
    distances or float64 bucket sums; one bad entry anywhere gives the careful path's result
    (its row, or its bucket, all-NaN; the rest as on the finite rows with f lowered)."""
    honest = torch.from_numpy(rand(6, 9, 300)).to(dtype)
    for row, col in [(0, 0), (8, 299), (4, 137)]:
        x = honest.clone()
        x[row, col] = value
        if name == "bucketing":
            pre = A.build_pre(name, s=2, seed=1)
            out = pre(x)
            bucket = pre.permutation(0, 9).tolist().index(row) // 2
            assert torch.isnan(out[bucket]).all()
            ref = A.build_pre(name, s=2, seed=1)(honest)
            others = [b for b in range(out.shape[0]) if b != bucket]
            torch.testing.assert_close(out[others], ref[others])
            continue
        out = A.build_pre(name, f=2)(x)
        assert torch.isnan(out[row]).all()
        keep = [i for i in range(9) if i != row]
        ref = A.build_pre(name, f=1)(honest[keep])
        torch.testing.assert_close(out[keep], ref, rtol=1e-6 if dtype == torch.float32 else 1e-12,
                                   atol=1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("name", ["clipping", "nnm", "arc", "bucketing"])
def test_all_nonfinite_raise(name):
    with pytest.raises(ValueError, match="NaN or Inf"):
        A.build_pre(name)(torch.full((3, 2), math.nan))


@pytest.mark.parametrize("pre_name", ["clipping", "nnm", "arc", "bucketing"])
@pytest.mark.parametrize("agg_name", ["krum", "coordinate_wise_median", "trimmed_mean",
                                      "geometric_median", "centered_clipping"])
def test_pipeline_with_byzantine_rows_is_finite(pre_name, agg_name):
    n, f = 12, 2
    x = torch.from_numpy(rand(5, n, 6)).float()
    x[3] = math.nan
    x[8] = 3e38
    kw = {"s": 2} if pre_name == "bucketing" else {}
    pre = A.build_pre(pre_name, f=f, **kw)
    agg = A.build(agg_name, f=f)
    agg.check(pre.output_rows(n))
    out = agg(pre(x))
    assert out.shape == (6,) and torch.isfinite(out).all()


# ============================================================================ registry


def test_pre_registry():
    assert A.pre_names() == ["arc", "bucketing", "clipping", "nnm"]
    assert A.pre_params("clipping") == {"f": 0, "threshold": 1.0}
    assert A.pre_params("nnm") == {"f": 0}
    assert A.pre_params("arc") == {"f": 0}
    assert A.pre_params("bucketing") == {"f": 0, "s": 2, "seed": 0}
    with pytest.raises(ValueError, match="valid choices: arc, bucketing, clipping, nnm"):
        A.build_pre("krum")
    with pytest.raises(ValueError, match="unknown pre-aggregator"):
        A.pre_params("median")
    for name in A.pre_names():
        pre = A.build_pre(name)
        assert pre.name == name and pre.f == 0


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("clipping", {"threshold": 0}, "'threshold' must be a finite number > 0"),
        ("clipping", {"threshold": math.inf}, "'threshold'"),
        ("clipping", {"c": 1.0}, "unknown parameter"),
        ("bucketing", {"s": 0}, "'s' must be an integer >= 1"),
        ("bucketing", {"seed": 1.5}, "'seed' must be an integer"),
        ("nnm", {"f": -2}, "'f' must be an integer >= 0"),
        ("arc", {"f": None}, "'f'"),
    ],
)
def test_bad_pre_parameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        A.build_pre(name, **kwargs)


def test_pre_checks_and_warnings():
    nnm = A.build_pre("nnm", f=3)
    nnm.check(4)
    with pytest.raises(ValueError, match="n=3 rows and f=3"):
        nnm.check(3)
    assert nnm.warning(6) is not None and nnm.warning(7) is None
    assert A.build_pre("arc", f=2).warning(4) is not None
    assert A.build_pre("arc", f=2).warning(5) is None
    assert A.build_pre("clipping").warning(1) is None
    for name in ("clipping", "nnm", "arc"):
        assert A.build_pre(name).state_dict() == {}


def test_inputs_not_modified():
    x = torch.from_numpy(rand(8, 9, 5))
    before = x.clone()
    for name in A.pre_names():
        A.build_pre(name, f=2)(x)
        assert torch.equal(x, before)


# ============================================================================ properties


@st.composite
def generic(draw, max_n=10):
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, 4))
    f = draw(st.integers(0, (n - 1) // 2))
    x = rand(draw(st.integers(0, 2**32 - 1)), n, d)
    return f, torch.from_numpy(x)


@SETTINGS
@given(generic(), st.randoms(use_true_random=False))
def test_row_wise_rules_are_permutation_equivariant(case, rnd):
    f, x = case
    perm = list(range(x.shape[0]))
    rnd.shuffle(perm)
    for name in ("clipping", "nnm", "arc"):
        pre = A.build_pre(name, f=f)
        torch.testing.assert_close(pre(x[perm]), pre(x)[perm], rtol=1e-12, atol=1e-12)


@SETTINGS
@given(generic(), st.floats(-1e4, 1e4))
def test_nnm_translation_equivariant(case, shift):
    f, x = case
    v = torch.linspace(-1, 1, x.shape[1], dtype=torch.float64) * shift
    pre = A.build_pre("nnm", f=f)
    torch.testing.assert_close(pre(x + v), pre(x) + v, rtol=0,
                               atol=1e-9 * (1 + abs(shift)))


@SETTINGS
@given(generic(), st.floats(0.01, 100))
def test_clipping_bounds_norms(case, threshold):
    _, x = case
    out = A.build_pre("clipping", threshold=threshold)(x)
    norms_in = torch.linalg.vector_norm(x, dim=1)
    norms_out = torch.linalg.vector_norm(out, dim=1)
    assert (norms_out <= threshold * (1 + 1e-12)).all()
    small = norms_in <= threshold
    assert torch.equal(out[small], x[small])


@SETTINGS
@given(generic())
def test_arc_clips_exactly_k_largest(case):
    f, x = case
    n = x.shape[0]
    out = A.build_pre("arc", f=f)(x)
    k = arc_clipped_count(n, f)
    norms = torch.linalg.vector_norm(x, dim=1)
    c = torch.sort(norms, descending=True).values[k]
    changed = (out != x).any(dim=1)
    assert int(changed.sum()) <= k
    assert (torch.linalg.vector_norm(out, dim=1) <= c * (1 + 1e-12)).all()
    # directions are preserved
    cos = (out * x).sum(1) / (torch.linalg.vector_norm(out, dim=1) * norms).clamp(min=1e-300)
    assert ((cos > 1 - 1e-9) | (norms == 0)).all()


@SETTINGS
@given(generic(), st.integers(1, 5), st.integers(0, 1000))
def test_bucketing_partitions_rows(case, s, seed):
    _, x = case
    n = x.shape[0]
    pre = A.build_pre("bucketing", s=s, seed=seed)
    perm = pre.permutation(0, n)
    out = pre(x)
    m = math.ceil(n / s)
    assert out.shape == (m, x.shape[1])
    sizes = torch.tensor([len(perm[b * s:(b + 1) * s]) for b in range(m)], dtype=torch.float64)
    # bucket means weighted by bucket sizes add up to the total sum
    torch.testing.assert_close((out * sizes[:, None]).sum(0), x.sum(0), rtol=1e-12,
                               atol=1e-12)
    for b in range(m):
        torch.testing.assert_close(out[b], x[perm[b * s:(b + 1) * s]].mean(0))


@SETTINGS
@given(st.sampled_from(["clipping", "nnm", "arc", "bucketing"]), st.integers(1, 8),
       st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=4))
def test_identical_rows(name, n, row):
    r = torch.tensor(row, dtype=torch.float32)
    out = A.build_pre(name, f=(n - 1) // 2)(r.repeat(n, 1))
    if name == "clipping":
        return
    # float64 accumulation: averaging identical float32 rows is exact
    assert torch.equal(out, r.repeat(out.shape[0], 1))


def test_clipping_extreme_float32_rows():
    x = torch.zeros(3, 1000, dtype=torch.float32)
    x[0] = 3e38  # float32 squares overflow: norm redone in float64, factor ~1e-40 (subnormal)
    x[1] = 1e-30  # float32 squares underflow to 0: norm redone in float64
    x[2, 0] = 2.0
    out = A.build_pre("clipping", threshold=1e-30)(x)
    norms = torch.linalg.vector_norm(out.double(), dim=1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(norms, torch.full((3,), 1e-30, dtype=torch.float64), rtol=1e-5,
                               atol=0)
    out = A.build_pre("clipping", threshold=1.0)(x)
    torch.testing.assert_close(torch.linalg.vector_norm(out.double(), dim=1),
                               torch.tensor([1.0, 1e-30 * math.sqrt(1000), 1.0],
                                            dtype=torch.float64), rtol=1e-5, atol=0)
    assert torch.equal(out[1], x[1])
