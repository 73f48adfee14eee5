"""Bucketing (Karimireddy, He, Jaggi 2022), pre-aggregator."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ._base import F_PARAM, Param, PreAggregator, _as_count
from ._common import as_matrix, column_chunks, nonfinite_rows

_MASK64 = (1 << 64) - 1


def _mix_seed(seed: int, call: int) -> int:
    """SplitMix64 of (seed, call): a well-spread 64-bit seed for call number ``call``."""
    z = (seed * 0x9E3779B97F4A7C15 + call * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class Bucketing(PreAggregator):
    """``bucketing``: shuffle the rows, split them into buckets of s, output the bucket means.

    Definition: for call number t (0, 1, 2, ... counted by the object), draw a permutation
    pi_t of the n rows with a ``torch.Generator`` seeded from (seed, t); bucket b holds rows
    pi_t(b s), ..., pi_t(b s + s - 1) (the last bucket holds the n mod s rest when s does not
    divide n) and becomes the mean of its rows. The permutation depends only on (seed, t, n),
    so a run is reproducible; the call counter is state: ``state_dict()`` ->
    ``{"calls": t}``, restored by ``load_state_dict``, so a resumed run continues the same
    sequence. ``permutation(t, n)`` returns pi_t without advancing the counter.

    Parameters: ``s`` (int >= 1, default 2: bucket size), ``seed`` (int, default 0), ``f``
    (int >= 0, default 0; not used: at most f buckets can hold a Byzantine row, so the
    aggregator that follows keeps the same f on m = ceil(n/s) rows).

    Precondition: n >= 1. Output rows: m = ceil(n / s) (see ``output_rows``); the aggregator
    after it must accept m rows with the same f.

    Complexity: O(n d) time, one float64 chunk of extra memory besides the (m, d) output.

    Source: S. P. Karimireddy, L. He, M. Jaggi, "Byzantine-Robust Learning on Heterogeneous
    Datasets via Bucketing", ICLR 2022.

    A bucket holding a row with NaN/Inf comes out all-NaN, so the aggregator drops it and lowers
    its f by one per such bucket (each holds at least one faulty row).
    Shapes and dtypes: (n, d) float32/float64 -> (ceil(n/s), d) same dtype/device.
    Errors: TypeError for a non-tensor or a non-float32/64 dtype; ValueError for a bad shape or
    when every row holds NaN/Inf.
    """

    name = "bucketing"
    PARAMS = {
        "f": F_PARAM,
        "s": Param("int", 2, "bucket size", minimum=1),
        "seed": Param("int", 0, "seed of the per-call permutations"),
    }

    s: int
    seed: int
    calls: int

    def _post_init(self) -> None:
        self.calls = 0

    def output_rows(self, n: int) -> int:
        return math.ceil(_as_count(n, self.name) / self.s)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"calls"}:
            raise ValueError(
                f"{self.name}: state must have exactly the key 'calls', got {sorted(state)}"
            )
        calls = state["calls"]
        if isinstance(calls, torch.Tensor) and calls.numel() == 1:
            calls = calls.item()
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"{self.name}: state 'calls' must be an integer >= 0, got {calls!r}")
        self.calls = calls

    def permutation(self, call: int, n: int) -> torch.Tensor:
        """The permutation (CPU, int64) used at call number ``call`` for n rows."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(_mix_seed(self.seed, call))
        return torch.randperm(n, generator=gen)

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = as_matrix(grads, self.name)
            n, d = x.shape
            bad = nonfinite_rows(x)
            dropped = int(bad.sum())
            self._require_at_call(n - dropped, max(self.f - dropped, 0), dropped)
            perm = self.permutation(self.calls, n).to(x.device)
            self.calls += 1
            m = self.output_rows(n)
            bucket_of = torch.empty(n, dtype=torch.long, device=x.device)
            bucket_of[perm] = torch.arange(n, device=x.device) // self.s
            sizes = torch.bincount(bucket_of, minlength=m).to(torch.float64)
            good = torch.nonzero(~bad).flatten()
            member = torch.zeros(m, good.numel(), dtype=torch.float64, device=x.device)
            member[bucket_of[good], torch.arange(good.numel(), device=x.device)] = 1.0
            out = torch.empty(m, d, dtype=x.dtype, device=x.device)
            xs = x if not dropped else None
            for start, stop in column_chunks(n, d):
                block = xs[:, start:stop] if xs is not None else x[good, start:stop]
                out[:, start:stop].copy_(
                    torch.mm(member, block.to(torch.float64)).div_(sizes[:, None])
                )
            if dropped:
                out[torch.unique(bucket_of[bad])] = math.nan
            return out
