"""Breakdown property of every registered aggregator and pre-aggregator (issue 10).

For random honest rows and b <= f Byzantine rows placed anywhere a float32 can reach (up to
1e30 and the float32 maximum: identical, spread over many scales, colluding around a point,
copying an honest row, or placed where the mean of all rows lands on one of them), each rule
run within its paper's guarantee (``check(n)`` passes, ``warning(n)`` is None) must keep the
bound it declares as its ``BREAKDOWN`` class attribute (``byzps.aggregators.Breakdown``):
the honest rows' bounding box per coordinate for coordinate-wise rules, within a multiple of
the honest diameter of the honest rows for the Krum family, MDA and NNM, a constant times the
honest spread for the geometric median, and so on. The bound is stated in honest quantities
only, so a rule that lets Byzantine rows move it by their size fails here.

The list of rules comes from the registry, so a rule added later is tested automatically, and
a rule without a declared bound fails. Examples per rule: hypothesis' current profile
(``HYPOTHESIS_PROFILE=full`` gives 1,000, see conftest.py; the default profile, 100, keeps
the file well under a minute).
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from byzps import aggregators as A
from byzps.aggregators._distances import pairwise_sq_dists
from byzps.aggregators._reduce import sums_less

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                         HealthCheck.data_too_large])

F32_MAX = float(torch.finfo(torch.float32).max)
MAX_N = 15
MAX_F = 3

#: where the Byzantine rows go (see ``byzantine_rows``)
PLACEMENTS = ["identical", "spread", "colluding", "copy_honest", "mean_trap", "float32_max"]


def runs_within_guarantee(rule, n: int) -> bool:
    """Whether ``rule`` accepts n rows and its paper's guarantee holds there."""
    try:
        rule.check(n)
    except ValueError:
        return False
    return rule.warning(n) is None


def draw_setting(data, build):
    """(rule, n, f, b): f the rule's tolerance, n rows within its guarantee, b <= f rows
    Byzantine. ``build(f)`` builds the rule."""
    f = data.draw(st.integers(0, MAX_F), label="f")
    rule = build(f)
    ns = [n for n in range(1, MAX_N + 1) if runs_within_guarantee(rule, n)]
    if not ns:  # e.g. the mean, whose guarantee needs f = 0
        f, rule = 0, build(0)
        ns = [n for n in range(1, MAX_N + 1) if runs_within_guarantee(rule, n)]
    n = data.draw(st.sampled_from(ns), label="n")
    b = data.draw(st.integers(0, min(f, n - 1)), label="b")
    return rule, n, f, b


def honest_rows(data, h: int, d: int) -> np.ndarray:
    """h honest rows (h, d): normal samples at a random scale and offset, sometimes with exact
    duplicates (workers that computed the same gradient)."""
    g = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    scale = 10.0 ** g.uniform(-3, 3)
    offset = g.normal(size=d) * 10.0 ** g.uniform(-3, 3)
    x = g.normal(size=(h, d)) * scale + offset
    if h > 1 and data.draw(st.booleans(), label="duplicates"):
        x[g.integers(0, h, size=h // 2)] = x[0]
    return x


def byzantine_rows(data, honest: np.ndarray, b: int) -> np.ndarray:
    """b Byzantine rows (b, d), finite and within the float32 range."""
    h, d = honest.shape
    if b == 0:
        return np.zeros((0, d))
    g = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="byz seed"))
    kind = data.draw(st.sampled_from(PLACEMENTS), label="placement")
    exponent = data.draw(st.integers(0, 30), label="exponent")

    def direction(k: int) -> np.ndarray:
        u = g.normal(size=(k, d))
        return u / np.linalg.norm(u, axis=1, keepdims=True)

    if kind == "identical":
        rows = np.repeat(direction(1) * 10.0**exponent, b, axis=0)
    elif kind == "spread":
        rows = direction(b) * 10.0 ** g.integers(0, 31, size=(b, 1))
    elif kind == "colluding":  # a tight cluster far from the honest rows
        centre = honest.mean(axis=0) + direction(1)[0] * 10.0**exponent
        rows = centre + g.normal(size=(b, d)) * 10.0 ** g.uniform(-6, 0)
    elif kind == "copy_honest":  # copies of honest rows (mimic), one of them pushed far
        rows = honest[g.integers(0, h, size=b)].copy()
        rows[0] += direction(1)[0] * 10.0**exponent
    elif kind == "mean_trap":  # the mean of all rows lands exactly on Byzantine row 0
        rows = direction(b) * 10.0**exponent
        n = h + b
        rows[0] = (honest.sum(axis=0) + rows[1:].sum(axis=0)) / (n - 1)
    else:  # the largest finite float32 values, signs at random
        rows = np.sign(g.normal(size=(b, d))) * F32_MAX
    return np.clip(rows, -F32_MAX, F32_MAX)


def allowed(bound, k: float, margin: float, honest: np.ndarray, out: np.ndarray,
            rel: float) -> np.ndarray:
    """Boolean per output row (out: (m, d)): whether it meets ``bound`` with spread multiple k
    and absolute margin, relative to the honest rows (float64), with rounding slack ``rel``."""
    pts = np.vstack([honest, np.zeros((1, honest.shape[1]))]) if bound.origin else honest
    if bound.region == "box":
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        w = hi - lo
        slack = rel * (np.abs(lo) + np.abs(hi) + w + margin) + 1e-300
        return ((out >= lo - k * w - margin - slack) & (out <= hi + k * w + margin + slack)
                ).all(axis=1)
    c = pts.mean(axis=0)
    radius = np.linalg.norm(pts - c, axis=1).max()
    diameter = max(np.linalg.norm(pts - p, axis=1).max() for p in pts)
    limit = radius + k * diameter + margin
    slack = rel * (np.linalg.norm(c) + radius + diameter + margin) + 1e-300
    return np.linalg.norm(out - c, axis=1) <= limit + slack


def run_case(data, build, pre: bool) -> None:
    rule, n, f, b = draw_setting(data, build)
    bound = rule.BREAKDOWN
    assert bound is not None, (
        f"{rule.name} declares no BREAKDOWN bound: add one next to the rule "
        f"(byzps.aggregators.Breakdown)")
    d = data.draw(st.integers(1, 5), label="d")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    honest = honest_rows(data, n - b, d)
    byz = byzantine_rows(data, honest, b)
    x = np.vstack([honest, byz])
    perm = data.draw(st.permutations(list(range(n))), label="row order")
    tx = torch.from_numpy(x[perm]).to(dtype)
    # the rule sees the honest rows as rounded to dtype: state the bound for those
    seen = torch.from_numpy(honest).to(dtype).double().numpy()
    out = rule(tx)
    assert torch.isfinite(out).all(), (rule, tx, out)
    out = out.double().numpy().reshape(-1, d)
    # rounding slack: output rounding (float32) or float64 sums; the geometric median is an
    # iterative approximation that stops at tol (1e-6) times the median distance
    rel = 1e-6 if dtype == torch.float32 else 1e-12
    if rule.name == "geometric_median":
        rel = max(rel, 1e-5)
    ok = allowed(bound, bound.k(n, f), bound.extra(rule), seen, out, rel)
    need = out.shape[0] - b if pre else 1
    assert int(ok.sum()) >= need, (
        f"{rule.name} (n={n}, f={f}, {b} Byzantine rows) leaves its declared bound "
        f"{bound}: {int(ok.sum())} of {out.shape[0]} output row(s) within it, {need} needed; "
        f"input {tx.tolist()}, output {out.tolist()}")


@pytest.mark.parametrize("name", A.names())
@SETTINGS
@given(data=st.data())
def test_aggregator_keeps_its_breakdown_bound(name, data):
    run_case(data, lambda f: A.build(name, f=f), pre=False)


@pytest.mark.parametrize("name", A.pre_names())
@SETTINGS
@given(data=st.data())
def test_pre_aggregator_keeps_its_breakdown_bound(name, data):
    run_case(data, lambda f: A.build_pre(name, f=f), pre=True)


def test_every_registered_rule_declares_a_bound():
    for name in A.names():
        bound = A.build(name).BREAKDOWN
        assert isinstance(bound, A.Breakdown), name
        assert math.isfinite(bound.k(7, 1)) and bound.k(7, 1) >= 0, name
    for name in A.pre_names():
        assert isinstance(A.build_pre(name).BREAKDOWN, A.Breakdown), name


# ============================================================ issue 10: the table, row by row
# (inputs exactly as in the issue: float32 tensors as ``torch.tensor`` makes them)


def np_weiszfeld(x: np.ndarray, iterations: int = 20000) -> np.ndarray:
    """Independent float64 reference of the geometric median: plain Weiszfeld from the
    coordinate-wise median of the rows, many iterations (the inputs below never put an iterate
    on a data row)."""
    z = np.median(x, axis=0)
    for _ in range(iterations):
        w = 1.0 / np.linalg.norm(x - z, axis=1)
        z = (w[:, None] * x).sum(axis=0) / w.sum()
    return z


def test_issue10_geometric_median_1d_is_the_median():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [1e30]])
    assert A.build("geometric_median", f=1)(x).tolist() == [2.0]


def test_issue10_geometric_median_two_identical_far_rows():
    torch.manual_seed(0)
    honest = torch.randn(8, 5)
    x = torch.cat([honest, torch.full((2, 5), 1e30)])
    out = A.build("geometric_median", f=2)(x)
    # within the honest rows' spread: inside their bounding box here, and at the optimum
    assert bool(((out >= honest.min(0).values) & (out <= honest.max(0).values)).all()), out
    ref = np_weiszfeld(x.double().numpy())
    np.testing.assert_allclose(out.double().numpy(), ref, atol=1e-5)


def test_issue10_geometric_median_2d_reaches_the_optimum():
    x = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1], [.5, .2], [1e30, 1e30]])
    out = A.build("geometric_median", f=1)(x)
    np.testing.assert_allclose(out.numpy(), [0.603, 0.426], atol=1e-3)
    np.testing.assert_allclose(out.double().numpy(), np_weiszfeld(x.double().numpy()),
                               atol=1e-5)


def test_issue10_nnm_row_0_mixes_with_its_nearest_neighbour():
    x = torch.tensor([[0.0], [5.0], [1.0], [1e9], [1e9], [1e9]])
    assert A.build_pre("nnm", f=4)(x)[0].tolist() == [0.5]


def test_issue10_mda_smallest_diameter_pair():
    x = torch.tensor([[1e30], [2e30], [3e30], [4e30], [0.0], [1.0], [5.0]])
    assert A.build("mda", f=5)(x).tolist() == [0.5]


def test_issue10_multi_krum_score_zero_rows_are_the_identical_ones():
    x = torch.tensor([[1e24], [1e24], [1.0], [2.0], [4.0], [1e24]])
    out = A.build("multi_krum", f=3, q=3)(x)
    assert out.tolist() == [torch.tensor(1e24).item()]  # the float32 1e24, exactly


def test_issue10_meamed_window_decided_exactly():
    x = torch.tensor([[-2.0], [0.0], [1e17], [1e17]])
    big = torch.tensor(1e17).double()  # 1e17 as float32 holds it
    expected = torch.tensor([(0.0 + 2 * big.item()) / 3], dtype=torch.float64).float()
    assert torch.equal(A.build("meamed", f=1)(x), expected)
    assert A.build("meamed", f=1)(x).item() == pytest.approx(6.67e16, rel=1e-3)


# ==================================================================== the causes, one by one


@SETTINGS
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=4,
                max_size=4))
def test_sums_less_is_exact(values):
    p, q, r, t = (Fraction(v) for v in values)
    got = bool(sums_less(*(torch.tensor([v], dtype=torch.float64) for v in values)))
    assert got == (p + q < r + t)


def test_sums_less_exact_where_rounding_ties():
    def v(*a):
        return torch.tensor(a, dtype=torch.float64)

    assert sums_less(v(-2.0), v(1e17), v(0.0), v(1e17)).tolist() == [True]
    assert sums_less(v(0.0), v(1e17), v(-2.0), v(1e17)).tolist() == [False]
    assert sums_less(v(1.0), v(1e17), v(1.0), v(1e17)).tolist() == [False]
    # beyond the float64 overflow threshold the halved values decide
    assert sums_less(v(1e308), v(1e308), v(1e308), v(1.5e308)).tolist() == [True]


def test_distances_next_to_identical_far_rows():
    """Half the rows far and identical used to centre the distances on a far row, where every
    other distance cancelled to 0; now every entry keeps its accuracy."""
    g = np.random.default_rng(1)
    for far in (1e9, 1e20, 1e30):
        honest = g.normal(size=(4, 7))
        x = np.vstack([np.full((4, 7), far), honest])
        got = pairwise_sq_dists(torch.from_numpy(x).float()).numpy()
        x32 = torch.from_numpy(x).float().double().numpy()
        ref = ((x32[:, None, :] - x32[None, :, :]) ** 2).sum(axis=2)
        np.testing.assert_allclose(got[4:, 4:], ref[4:, 4:], rtol=1e-9)
        assert (got[:4, :4] == 0).all()  # identical rows: exactly 0
        np.testing.assert_allclose(got[:4, 4:], ref[:4, 4:], rtol=1e-9)


def test_identical_rows_have_bit_identical_distances():
    g = np.random.default_rng(2)
    x = torch.from_numpy(g.normal(size=(7, 300)))
    x[3] = x[0]
    x[5] = x[0]
    x[6] = x[2]
    dist = pairwise_sq_dists(x)
    assert torch.equal(dist[0], dist[3][[3, 1, 2, 0, 4, 5, 6]])
    for a, b in ((0, 3), (0, 5), (2, 6)):
        assert dist[a, b] == 0 and dist[b, a] == 0
        others = [i for i in range(7) if i not in (0, 2, 3, 5, 6)]
        assert torch.equal(dist[a, others], dist[b, others])
    assert torch.equal(dist, dist.T)
    assert (dist[0, [1, 2, 4, 6]] > 0).all()


def mda_reference(x: torch.Tensor, f: int) -> list[int]:
    """The kept rows by MDA's documented rule: smallest diameter, then smallest spread, then
    the first in the enumeration of left-out sets; distances from explicit float64
    differences, spreads summed exactly (math.fsum)."""
    v = x.double().numpy()
    n = len(v)
    dist = ((v[:, None, :] - v[None, :, :]) ** 2).sum(axis=2)
    best = None
    for left_out in itertools.combinations(range(n), f):
        keep = [i for i in range(n) if i not in left_out]
        sub = dist[np.ix_(keep, keep)]
        key = (sub.max(), math.fsum(sub.flatten().tolist()))
        if best is None or key < best[0]:
            best = (key, keep)
    return best[1]


@pytest.mark.parametrize("seed", [141, 328, 597, 843, 0, 1, 2, 3])
def test_mda_tie_rule_with_duplicated_rows(seed):
    """Diameters equal through a duplicated row must tie exactly, so the documented tie rule
    (spread, then enumeration order) decides, not a last-bit difference of the Gram matrix.
    (The first four seeds gave a different subset than the rule before issue 10.)"""
    g = np.random.default_rng(seed)
    n = int(g.integers(4, 8))
    d = int(g.choice([3, 50, 700]))
    x = (g.normal(size=(n, d)) * 10.0 ** g.uniform(-2, 2)
         + g.normal(size=d) * 10.0 ** g.uniform(0, 3))
    x = torch.from_numpy(x).float()
    for _ in range(int(g.integers(1, 3))):
        x[g.integers(0, n)] = x[g.integers(0, n)]
    f = int(g.integers(1, (n - 1) // 2 + 1))
    keep = A.build("mda", f=f).select(x, f)
    assert torch.nonzero(keep).flatten().tolist() == mda_reference(x, f)


def test_geometric_median_escapes_a_byzantine_row_at_the_mean():
    """Two Byzantine rows: one far away pulls the mean, the other sits exactly on the mean
    (the start of the iteration). The median start and the Vardi-Zhang step avoid both."""
    g = np.random.default_rng(7)
    honest = g.normal(size=(5, 3))
    far = np.full(3, 1e6)
    trap = (honest.sum(axis=0) + far) / 6  # the mean of all 7 rows is this row
    x = np.vstack([honest, far, trap])
    out = A.build("geometric_median", f=2)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, np_weiszfeld(x), atol=1e-6)
    assert np.linalg.norm(out - honest.mean(axis=0)) < 3
