"""Property tests (hypothesis) for the aggregators.

Properties: permutation invariance, translation and positive-scale equivariance, identical
rows give that row, agreement with pure-Python definitions under ties, and robustness: with up
to f rows replaced by arbitrary (huge, NaN, Inf) vectors the output is finite and, for the
coordinate-wise rules, inside the honest rows' per-coordinate range.

Selection-based rules (Krum family, Bulyan, MDA, geometric median, centered clipping) are fed
generic data (normal samples from a seed drawn by hypothesis) where exact ties between
different rows have probability zero, so an invariance cannot be broken by an index-based
tie-break; coordinate-wise rules get hypothesis' own floats, duplicates and all.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from byzps import aggregators as A
from byzps.aggregators._sorting import window_mean_around_median

SETTINGS = settings(
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

COORDINATE_WISE = ["coordinate_wise_median", "trimmed_mean", "meamed", "mean"]
SELECTION = ["krum", "multi_krum", "bulyan", "mda", "geometric_median", "centered_clipping",
             "dnc", "caf", "smea", "cge", "monna"]
ALL = COORDINATE_WISE + SELECTION
#: monna averages the neighbours of one row chosen by position (``pivot``)
PERMUTATION_INVARIANT = [n for n in ALL if n != "monna"]
#: cge ranks rows by their norm, i.e. their distance to the origin
TRANSLATION_EQUIVARIANT = [n for n in ALL if n != "cge"]

# extra parameters used by the property tests
EXTRA = {
    "geometric_median": {"tol": 1e-12, "max_iter": 300},
    "centered_clipping": {"tau": 1.0, "iterations": 3},
}


def max_f(name: str, n: int) -> int:
    """Largest f for which the rule's guarantee holds with n rows (-1: no valid f)."""
    if name in ("krum", "multi_krum"):
        return (n - 3) // 2
    if name == "bulyan":
        return (n - 3) // 4
    if name == "mean":
        return 0
    return (n - 1) // 2


def min_n(name: str) -> int:
    return {"krum": 3, "multi_krum": 3, "bulyan": 3}.get(name, 1)


def build(name: str, f: int):
    return A.build(name, f=f, **EXTRA.get(name, {}))


@st.composite
def generic_case(draw, names=ALL, max_n=11):
    """(name, f, x float64 (n, d) of generic values)."""
    name = draw(st.sampled_from(names))
    n = draw(st.integers(min_n(name), max_n))
    d = draw(st.integers(1, 4))
    f = draw(st.integers(0, max(max_f(name, n), 0)))
    seed = draw(st.integers(0, 2**32 - 1))
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d)) * g.uniform(0.1, 10.0) + g.normal(size=d) * 5
    return name, f, torch.from_numpy(x)


finite_values = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def float_matrix(draw, n_min=1, n_max=9, d_max=4, elements=finite_values):
    n = draw(st.integers(n_min, n_max))
    d = draw(st.integers(1, d_max))
    rows = draw(st.lists(st.lists(elements, min_size=d, max_size=d), min_size=n, max_size=n))
    return torch.tensor(rows, dtype=torch.float64)


def close(a, b, scale=1.0, rtol=1e-9):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(scale, 1.0))


# ---------------------------------------------------------------------------- invariances


@SETTINGS
@given(generic_case(names=PERMUTATION_INVARIANT), st.randoms(use_true_random=False))
def test_permutation_invariance_generic(case, rnd):
    name, f, x = case
    perm = list(range(x.shape[0]))
    rnd.shuffle(perm)
    # the geometric median is an iterative approximation: rounding differences from the row
    # order move its stopping point slightly
    rtol = 1e-6 if name == "geometric_median" else 1e-9
    close(build(name, f)(x[perm]), build(name, f)(x), x.abs().max().item(), rtol=rtol)


@SETTINGS
@given(st.sampled_from(COORDINATE_WISE), float_matrix(), st.randoms(use_true_random=False))
def test_permutation_invariance_coordinate_wise_with_ties(name, x, rnd):
    n = x.shape[0]
    f = max(max_f(name, n), 0)
    perm = list(range(n))
    rnd.shuffle(perm)
    out, ref = build(name, f)(x[perm]), build(name, f)(x)
    if name == "mean":
        close(out, ref, x.abs().max().item())
    else:  # sorting makes these exactly order-free
        assert torch.equal(out, ref)


@SETTINGS
@given(generic_case(names=TRANSLATION_EQUIVARIANT), st.integers(-10**6, 10**6),
       st.integers(0, 2**32 - 1))
def test_translation_equivariance(case, offset_scale, seed):
    name, f, x = case
    v = torch.from_numpy(np.random.default_rng(seed).normal(size=x.shape[1])) * offset_scale
    out = build(name, f)(x + v)
    ref = build(name, f)(x) + v
    spread = (x.max(0).values - x.min(0).values).max().item()
    # float64 rounding of x + v is about 1e-16 * |v|; a selection change would be O(spread)
    tol = 1e-9 * (spread + 1) + 1e-12 * abs(offset_scale)
    if name == "geometric_median":
        tol += 1e-6 * spread  # stopping point of the iteration moves a little
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)


@SETTINGS
@given(generic_case(names=[n for n in ALL if n != "centered_clipping"]),
       st.integers(-12, 12))
def test_positive_scale_equivariance(case, exponent):
    name, f, x = case
    c = 2.0**exponent  # a power of two scales floats exactly
    out = build(name, f)(c * x)
    ref = c * build(name, f)(x)
    scale = c * x.abs().max().item()
    tol = 1e-6 if name == "geometric_median" else 1e-12
    # GM's smoothing eps (1e-8) is an absolute distance: where the iterate converges to a data
    # row it stops within about eps of it, at every scale, so allow eps on top
    atol = tol * scale + (2e-8 if name == "geometric_median" else 0.0)
    torch.testing.assert_close(out, ref, rtol=tol, atol=atol)


@SETTINGS
@given(generic_case(names=["centered_clipping"]), st.integers(-12, 12))
def test_centered_clipping_scales_with_tau(case, exponent):
    _, f, x = case
    c = 2.0**exponent
    out = A.build("centered_clipping", f=f, tau=c * 1.5, iterations=2)(c * x)
    ref = c * A.build("centered_clipping", f=f, tau=1.5, iterations=2)(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12 * c * x.abs().max().item())


@SETTINGS
@given(st.sampled_from(ALL), st.integers(1, 11), st.lists(finite_values, min_size=1,
                                                          max_size=5))
def test_identical_rows_give_that_row(name, n, row):
    n = max(n, min_n(name))
    f = max(max_f(name, n), 0)
    for dtype in (torch.float32, torch.float64):
        r = torch.tensor(row, dtype=dtype)
        out = build(name, f)(r.repeat(n, 1))
        if dtype == torch.float32:
            assert torch.equal(out, r), (name, out, r)  # float64 accumulation is exact here
        else:
            torch.testing.assert_close(out, r, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------- definitions


@SETTINGS
@given(float_matrix(elements=st.integers(-5, 5).map(float)), st.data())
def test_window_mean_equals_sort_by_distance_with_ties(x, data):
    # integer values: many equal distances to the median
    n = x.shape[0]
    k = data.draw(st.integers(1, n))
    s, _ = torch.sort(x.T.contiguous(), dim=1)
    out = window_mean_around_median(s, k)
    for j in range(x.shape[1]):
        vals = x[:, j].tolist()
        med = float(np.median(vals))
        chosen = sorted(vals, key=lambda v: (abs(v - med), v))[:k]
        assert out[j].item() == pytest.approx(sum(chosen) / k, abs=1e-12)


@SETTINGS
@given(float_matrix(n_max=12))
def test_median_and_trimmed_mean_match_numpy(x):
    n = x.shape[0]
    np.testing.assert_array_equal(A.build("coordinate_wise_median")(x).numpy(),
                                  np.median(x.numpy(), axis=0))
    f = (n - 1) // 2
    ref = np.sort(x.numpy(), axis=0)[f : n - f].mean(axis=0)
    np.testing.assert_allclose(A.build("trimmed_mean", f=f)(x).numpy(), ref, rtol=1e-12,
                               atol=1e-9)


# ---------------------------------------------------------------------------- robustness

BAD_ROWS = st.sampled_from(["nan", "inf", "-inf", "huge", "-huge", "max", "mixed", "any"])
ANY_FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


def byzantine_row(kind: str, d: int, dtype, data) -> torch.Tensor:
    big = torch.finfo(dtype).max
    if kind == "any":
        return torch.tensor(data.draw(st.lists(ANY_FLOAT32, min_size=d, max_size=d)),
                            dtype=dtype)
    value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": 1e30,
             "-huge": -1e30, "max": big}.get(kind)
    if kind == "mixed":
        row = torch.full((d,), 1e30, dtype=dtype)
        row[::2] = -big
        return row
    return torch.full((d,), value, dtype=dtype)


@SETTINGS
@given(st.sampled_from(ALL), st.sampled_from([torch.float32, torch.float64]), st.data())
def test_up_to_f_byzantine_rows(name, dtype, data):
    n = data.draw(st.integers(max(min_n(name), 3), 11))
    f = max_f(name, n)
    if f < 1:
        f = 0
    d = data.draw(st.integers(1, 4))
    seed = data.draw(st.integers(0, 2**32 - 1))
    g = np.random.default_rng(seed)
    honest = torch.from_numpy(g.normal(size=(n, d)) * 10).to(dtype)
    b = data.draw(st.integers(0, f))
    kinds = [data.draw(BAD_ROWS) for _ in range(b)]
    x = honest.clone()
    slots = data.draw(st.permutations(list(range(n))))[:b]
    for slot, kind in zip(slots, kinds):
        x[slot] = byzantine_row(kind, d, dtype, data)
    good = [i for i in range(n) if i not in slots]
    out = build(name, f)(x)
    assert out.shape == (d,) and out.dtype == dtype
    assert torch.isfinite(out).all(), (name, x, out)
    lo = honest[good].min(0).values
    hi = honest[good].max(0).values
    inside = bool(((out >= lo) & (out <= hi)).all())
    if name in ("coordinate_wise_median", "trimmed_mean"):
        assert inside, (name, x, out)
    # far-away Byzantine rows (NaN, Inf, +-1e30, float max) are never selected by the
    # Krum family, Bulyan, MDA or the filters caf, smea, cge, so their output is an average of
    # honest values (dnc has no such guarantee: test_filter_rules shows a far row it keeps)
    if name in ("krum", "multi_krum", "bulyan", "mda", "caf", "smea",
                "cge") and "any" not in kinds:
        eps = 1e-5 * (hi - lo).abs().max().item() if dtype == torch.float32 else 1e-12
        assert bool(((out >= lo - eps) & (out <= hi + eps)).all()), (name, x, out)


@SETTINGS
@given(st.sampled_from(ALL), st.integers(1, 6), st.data())
def test_more_than_f_nonfinite_rows(name, extra, data):
    # more non-finite rows than f: f drops to 0, the rule runs on the rest or raises ValueError
    n = 9
    f = max(max_f(name, n), 0)
    x = torch.randn(n, 3, dtype=torch.float64)
    k = min(n, f + extra)
    x[:k] = math.nan
    try:
        out = build(name, f)(x)
    except ValueError as err:
        assert "n=" in str(err) or "NaN or Inf" in str(err)
    else:
        assert torch.isfinite(out).all()
