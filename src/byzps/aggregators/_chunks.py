"""Bounded extra memory: column chunks of an ``(n, d)`` input, and output buffers backed by
huge pages.

Work that needs a float64 copy, a transposed copy or a sort is done on column chunks of about
:data:`CHUNK_ELEMENTS` entries, so the peak extra memory of a rule is one chunk plus
O(n^2 + d) floats, never a second copy of the input (the output of a pre-aggregator is of
course as large as its input). Other modules read ``_chunks.CHUNK_ELEMENTS`` through the module
so that tests can shrink it.

Parallel column work (issue 14). Work whose result for a column (or a row) depends only on
that column's (row's) input -- a trimmed mean's sort and sum, NNM's mixing product, clipping's
per-row scaling -- may be spread over a thread pool with :func:`parallel_chunks`: the caller's
thread and the pool's threads each take a run of consecutive chunks (:func:`for_each_part`),
every chunk computed with exactly the same operations on the same shapes as in one thread, so
the result is bit-identical. Reductions across chunks (row norms, Gram matrices) stay in one
thread, in their order. Without :func:`parallel_chunks` (the default, and every TCP node) all
chunks run in the calling thread, one after the other.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from concurrent.futures import Executor
from typing import Optional, TypeVar, Union

import torch

#: Largest number of matrix entries processed per column chunk (2**18 -> 2 MiB as float64,
#: small enough to stay in a core's L2 cache, which is measurably faster than larger chunks).
CHUNK_ELEMENTS = 1 << 18


_T = TypeVar("_T")

#: the pool (and how many parts to cut the work into) that :func:`for_each_part` spreads work
#: over in this context; None = the calling thread only. A context variable: threads of the
#: pool itself do not see it, so work run there never waits on the pool.
_POOL: contextvars.ContextVar[Optional[tuple[Executor, int]]] = contextvars.ContextVar(
    "byzps_chunk_pool", default=None)


@contextlib.contextmanager
def parallel_chunks(executor: Optional[Executor], threads: int) -> Iterator[None]:
    """Within the block, :func:`for_each_part` in this thread (and context) cuts its work into
    up to ``threads`` parts: one runs in the calling thread, the others on ``executor``, which
    must not be the pool of the calling thread (it would wait on itself). ``executor`` None or
    ``threads`` < 2: everything runs in the calling thread, as outside the block.

    The rules' results do not change (see the module docstring); only the calling thread waits
    less, when the executor has idle threads and the machine free cores.
    """
    token = _POOL.set(None if executor is None or threads < 2 else (executor, threads))
    try:
        yield
    finally:
        _POOL.reset(token)


def for_each_part(items: Sequence[_T], work: Callable[[Sequence[_T]], None]) -> None:
    """Call ``work(part)`` on consecutive parts of ``items`` that together cover it once.

    Outside :func:`parallel_chunks`: one call ``work(items)`` in this thread. Inside: up to its
    ``threads`` parts of nearly equal length, the first in this thread, the others on its
    executor, all at once; returns when every part is done. ``work`` must only write what its
    part owns (e.g. its columns of an output) and keep its own scratch buffers.

    Raises:
        the first part's exception (in part order) once every part has finished.
    """
    pool = _POOL.get()
    if pool is None or len(items) < 2:
        work(items)
        return
    executor, threads = pool
    k = min(threads, len(items))
    cuts = [len(items) * i // k for i in range(k + 1)]
    parts = [items[cuts[i]:cuts[i + 1]] for i in range(k)]
    futures = [executor.submit(work, part) for part in parts[1:]]
    errors: list[BaseException] = []
    try:
        work(parts[0])
    except BaseException as e:  # noqa: BLE001 - re-raised below, after the other parts
        errors.append(e)
    for fut in futures:
        try:
            fut.result()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    if errors:
        raise errors[0]


#: outputs of at least this many bytes are allocated with transparent huge pages (Linux)
_HUGE_OUTPUT_BYTES = 8 << 20


_HUGE_PAGE = 2 << 20


_MADV_HUGEPAGE = 14


#: libc's madvise once looked up; False where it cannot be (non-glibc platforms)
_madvise: Union[Callable[..., int], bool, None] = None


def empty_output(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``torch.empty(shape)`` with ``like``'s dtype and device, for a large result.

    On Linux CPUs a freshly mapped buffer costs a page fault per 4 KiB page on first write
    (measured: writing a new 128 MiB tensor takes 4-5x as long as writing into a reused one).
    For outputs of 8 MiB or more the aligned interior is advised as transparent-huge-page
    memory (``madvise(MADV_HUGEPAGE)``; a 2 MiB page per fault), which removes most of that
    cost. The advice is a hint: where it is unavailable nothing changes.
    """
    global _madvise
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    nbytes = out.numel() * out.element_size()
    if out.device.type != "cpu" or nbytes < _HUGE_OUTPUT_BYTES or not sys.platform.startswith(
        "linux"
    ):
        return out
    if _madvise is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _madvise = fn
        except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
            _madvise = False
    if callable(_madvise):
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        stop = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if stop > start:
            _madvise(start, stop - start, _MADV_HUGEPAGE)
    return out


def chunk_columns(n: int, d: int, elements: int | None = None) -> int:
    """Number of columns per chunk.

    A chunk holds about ``elements`` entries; by default ``min(CHUNK_ELEMENTS, n*d/16)`` (at
    least 65536), so that the few chunk-sized temporaries a rule keeps alive (a float64 copy,
    and what the allocator keeps of previous chunks) stay well below the size of a float32
    input.
    """
    if elements is None:
        elements = min(CHUNK_ELEMENTS, max(n * d // 16, 1 << 16))
    return max(1, min(d, elements // max(n, 1)))


def column_chunks(n: int, d: int, elements: int | None = None) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` column ranges covering ``range(d)`` (see ``chunk_columns``)."""
    step = chunk_columns(n, d, elements)
    for start in range(0, d, step):
        yield start, min(d, start + step)


def chunks64(
    x: torch.Tensor, center: torch.Tensor | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, c)`` with ``c`` a contiguous float64 copy of ``x[:, start:stop]``,
    or of ``x[:, start:stop] - center[start:stop]`` (centre (d,), any float dtype; the
    subtraction is done in float64).

    All chunks are written into one buffer allocated once, so iterative rules that sweep the
    matrix many times allocate nothing per chunk (no allocator churn, no heap fragmentation).
    ``c`` may be modified in place; it is overwritten by the next chunk.

    Inside :func:`parallel_chunks` two buffers take turns: the next chunk is converted on the
    pool while the caller works on this one (the values, and the buffers' alignment, are
    those of the one-buffer path, so whatever the caller computes from them is unchanged).
    """
    n, d = x.shape
    step = chunk_columns(n, d)
    if center is not None:
        center = center.to(torch.float64)  # the subtraction must happen in float64
    ranges = [(start, min(d, start + step)) for start in range(0, d, step)]

    def fill(buf: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        c = buf[: n * (stop - start)].view(n, stop - start)
        c.copy_(x[:, start:stop])
        if center is not None:
            # (torch.sub(x32, center64, out=c) would convert x through a temporary: slower)
            c.sub_(center[start:stop])
        return c

    pool = _POOL.get()
    if pool is None or len(ranges) < 2:
        buf = torch.empty(n * step, dtype=torch.float64, device=x.device)
        for start, stop in ranges:
            yield start, stop, fill(buf, start, stop)
        return
    executor = pool[0]
    bufs = [torch.empty(n * step, dtype=torch.float64, device=x.device) for _ in range(2)]
    ahead = executor.submit(fill, bufs[0], *ranges[0])
    try:
        for k, (start, stop) in enumerate(ranges):
            c = ahead.result()
            if k + 1 < len(ranges):   # into the buffer the caller has finished with
                ahead = executor.submit(fill, bufs[(k + 1) % 2], *ranges[k + 1])
            yield start, stop, c
    finally:
        if not ahead.cancel():
            futures.wait([ahead])   # never leave a write into a buffer running
