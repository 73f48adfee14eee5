"""Re-exports of the rules' numerical helpers, which live in modules by concern:
:mod:`._finite` (dtypes, finiteness checks, dropping non-finite rows), :mod:`._chunks` (column
chunks, huge-page output buffers), :mod:`._sorting` (the sorting network and per-coordinate
order statistics), :mod:`._reduce` (float64 means, norms, exact sum comparison) and
:mod:`._distances` (pairwise distances).

Kept only for branches written against the old single module (new rules and attacks in
flight); import from the modules above. ``CHUNK_ELEMENTS`` is read from :mod:`._chunks`:
set it there.
"""

from __future__ import annotations

from ._chunks import CHUNK_ELEMENTS, chunk_columns, chunks64, column_chunks, empty_output
from ._distances import pairwise_sq_dists
from ._finite import (
    SUPPORTED_DTYPES,
    NonFiniteInput,
    all_finite,
    as_matrix,
    drop_nonfinite,
    nonfinite_rows,
)
from ._reduce import mean_and_distances, mean_rows, row_norms, sums_less
from ._sorting import (
    bitonic_select,
    coordinate_median,
    median_and_distances,
    sorted_column_chunks,
    sum_rows64,
    window_mean_around_median,
    window_sum_sorted,
)

__all__ = [
    "CHUNK_ELEMENTS", "NonFiniteInput", "SUPPORTED_DTYPES", "all_finite", "as_matrix",
    "bitonic_select", "chunk_columns", "chunks64", "column_chunks", "coordinate_median",
    "drop_nonfinite", "empty_output", "mean_and_distances", "mean_rows", "median_and_distances",
    "nonfinite_rows", "pairwise_sq_dists", "row_norms", "sorted_column_chunks", "sum_rows64",
    "sums_less", "window_mean_around_median", "window_sum_sorted",
]
