"""Bounded extra memory: column chunks of an ``(n, d)`` input, and output buffers backed by
huge pages.

Work that needs a float64 copy, a transposed copy or a sort is done on column chunks of about
:data:`CHUNK_ELEMENTS` entries, so the peak extra memory of a rule is one chunk plus
O(n^2 + d) floats, never a second copy of the input (the output of a pre-aggregator is of
course as large as its input). Other modules read ``_chunks.CHUNK_ELEMENTS`` through the module
so that tests can shrink it.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Iterator
from typing import Union

import torch

#: Largest number of matrix entries processed per column chunk (2**18 -> 2 MiB as float64,
#: small enough to stay in a core's L2 cache, which is measurably faster than larger chunks).
CHUNK_ELEMENTS = 1 << 18


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
    """
    n, d = x.shape
    step = chunk_columns(n, d)
    buf = torch.empty(n * step, dtype=torch.float64, device=x.device)
    if center is not None:
        center = center.to(torch.float64)  # the subtraction must happen in float64
    for start in range(0, d, step):
        stop = min(d, start + step)
        c = buf[: n * (stop - start)].view(n, stop - start)
        c.copy_(x[:, start:stop])
        if center is not None:
            # (torch.sub(x32, center64, out=c) would convert x through a temporary: slower)
            c.sub_(center[start:stop])
        yield start, stop, c
