"""Column work spread over threads (``aggregators.parallel_chunks``, issue 14): bit-identical to
one thread for every rule that uses it (clipping, NNM, trimmed mean, and the pipeline the
simulator's benchmark cell runs), on seeded matrices with NaN/Inf rows, ties and huge rows."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from byzps import aggregators as A
from byzps.aggregators import _chunks, clipping
from byzps.aggregators._chunks import for_each_part
from byzps.core.rounds import ServerRounds
from byzps.robust import build_pipeline

SETTINGS = settings(deadline=None, max_examples=30,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pool():
    with cf.ThreadPoolExecutor(3) as executor:
        yield executor


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks and row groups small enough that a few hundred columns make many of them."""
    monkeypatch.setattr(_chunks, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(clipping, "_GROUP_BYTES", 256)


def matrix(seed: int, n: int, d: int, dtype: torch.dtype, kind: str) -> torch.Tensor:
    """A seeded (n, d) input: ``plain`` (Gaussian rows, some large), ``ties`` (small integers,
    repeated rows), ``nan`` (plain with a NaN row and an Inf row), ``huge`` (one row at 1e30)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        x = torch.randint(-3, 4, (n, d), generator=g).to(dtype)
        x[n // 2] = x[0]
        return x
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[: n // 3] *= 10.0
    x = x.to(dtype)
    if kind == "nan":
        x[1, d // 3] = float("nan")
        x[n - 1, d - 1] = float("inf")
    elif kind == "huge":
        x[n - 2] = 1e30
    return x


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (NaN == NaN bit for bit)."""
    return t.contiguous().view(torch.int64 if t.dtype == torch.float64 else torch.int32)


RULES = [
    ("clipping", lambda f: A.build_pre("clipping", threshold=3.0, f=f)),
    ("nnm", lambda f: A.build_pre("nnm", f=f)),
    ("trimmed_mean", lambda f: A.build("trimmed_mean", f=f)),
    ("clipping+nnm>trimmed_mean",
     lambda f: build_pipeline("trimmed_mean", {"f": f},
                              [{"name": "clipping", "threshold": 3.0}, {"name": "nnm"}], f)),
]


@pytest.mark.parametrize("name,make", RULES, ids=[r[0] for r in RULES])
@pytest.mark.parametrize("kind", ["plain", "ties", "nan", "huge"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [2, 3])
def test_parallel_equals_serial(pool, small_chunks, name, make, kind, dtype, threads):
    rule = make(2)
    for seed in range(3):
        x = matrix(seed, 9, 301, dtype, kind)
        serial = rule(x)
        with A.parallel_chunks(pool, threads):
            parallel = rule(x)
        assert parallel.dtype == serial.dtype and parallel.shape == serial.shape
        assert torch.equal(bits(parallel), bits(serial)), (name, kind, seed)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(5, 13), d=st.integers(1, 700),
       f=st.integers(0, 2), kind=st.sampled_from(["plain", "ties", "nan", "huge"]),
       threads=st.integers(2, 4))
def test_parallel_equals_serial_property(pool, small_chunks, seed, n, d, f, kind, threads):
    for _, make in RULES:
        rule = make(f)
        x = matrix(seed, n, d, torch.float32, kind)
        serial = rule(x)
        with A.parallel_chunks(pool, threads):
            parallel = rule(x)
        assert torch.equal(bits(parallel), bits(serial))


def test_parallel_equals_serial_at_the_benchmark_size(pool):
    """The simulator's cell: 13 rows of 431,080 float32 coordinates, default chunk sizes."""
    rule = RULES[-1][1](3)
    g = torch.Generator().manual_seed(14)
    x = torch.randn(13, 431_080, generator=g) * 1e-2
    x[10:] *= -4.0
    serial = rule(x)
    with A.parallel_chunks(pool, 2):
        parallel = rule(x)
    assert torch.equal(bits(parallel), bits(serial))


def test_for_each_part_outside_the_block_runs_once_in_this_thread():
    seen = []
    for_each_part([1, 2, 3], lambda part: seen.append((list(part), threading.get_ident())))
    assert seen == [([1, 2, 3], threading.get_ident())]


def test_for_each_part_covers_the_items_in_consecutive_parts(pool):
    seen = []
    lock = threading.Lock()

    def work(part):
        with lock:
            seen.append((list(part), threading.get_ident()))

    with A.parallel_chunks(pool, 3):
        for_each_part(list(range(10)), work)
    parts = sorted(p for p, _ in seen)
    assert parts == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [p for p, t in seen if t == threading.get_ident()] == [[0, 1, 2]]
    with A.parallel_chunks(None, 3):   # no executor: one part, here
        seen.clear()
        for_each_part(list(range(10)), work)
    assert seen == [(list(range(10)), threading.get_ident())]


def test_for_each_part_raises_the_first_error_after_every_part(pool):
    done = []

    def work(part):
        if part[0] in (0, 4):
            raise ValueError(f"part {part[0]}")
        done.append(part[0])

    with A.parallel_chunks(pool, 3), pytest.raises(ValueError, match="part 0"):
        for_each_part(list(range(6)), work)
    assert done == [2]


def test_pool_threads_do_not_see_the_pool(pool):
    """Work running on the pool itself runs its own parts in its thread (never waits on the
    pool it runs on)."""
    def inner(_):
        seen = []
        for_each_part([1, 2], lambda part: seen.append(threading.get_ident()))
        return seen == [threading.get_ident()]

    with A.parallel_chunks(pool, 3):
        assert pool.submit(inner, None).result()


def test_server_distances_in_parallel_equal_serial(pool):
    """The PS's distances of the rows to the aggregate (summed over column blocks in block
    order whichever thread computed a block) are bit-identical with and without the pool."""
    machine = SimpleNamespace(_scratch=None)
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(13, 200_003, generator=g)
    rows[4] *= 1e6
    agg = rows.median(dim=0).values
    serial = ServerRounds._distances(machine, rows, agg)
    with A.parallel_chunks(pool, 3):
        parallel = ServerRounds._distances(machine, rows, agg)
    assert parallel == serial


ALL_RULES = [("agg", name) for name in A.names()] + [("pre", name) for name in A.pre_names()]


@pytest.mark.parametrize("kind,name", ALL_RULES, ids=[f"{k}-{n}" for k, n in ALL_RULES])
def test_every_rule_is_unchanged_inside_parallel_chunks(pool, small_chunks, kind, name):
    """Inside ``parallel_chunks`` the float64 column chunks (``_chunks.chunks64``) are
    converted ahead on the pool; every registered rule (two fresh objects: some carry state)
    gives the same bits as outside."""
    build = A.build if kind == "agg" else A.build_pre
    for seed, sample in enumerate(["plain", "ties", "nan", "huge"]):
        x = matrix(seed, 11, 257, torch.float32, sample)
        serial, parallel = build(name, f=2), build(name, f=2)
        want = serial(x)
        with A.parallel_chunks(pool, 2):
            got = parallel(x)
        assert torch.equal(bits(got), bits(want)), (name, sample)
