"""Seeded per-call randomness for the randomised rules (bucketing, dnc).

A randomised rule draws its randomness at call number t (0, 1, 2, ... counted by the object)
from a ``torch.Generator`` seeded with ``mix_seed(seed, t)``: a run is reproducible from the
config's seed, and the call counter is the rule's only state, so a resumed run continues the
same sequence once the counter is restored from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, call: int) -> int:
    """SplitMix64 of (seed, call): a well-spread 64-bit seed for call number ``call``."""
    z = (seed * 0x9E3779B97F4A7C15 + call * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def call_generator(seed: int, call: int) -> torch.Generator:
    """A CPU generator seeded with ``mix_seed(seed, call)``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(mix_seed(seed, call))
    return gen


class CallCounter:
    """Mixin for a rule whose state is its call counter: ``calls`` starts at 0,
    ``state_dict()`` -> ``{"calls": t}``, ``load_state_dict`` restores it.

    Raises (``load_state_dict``): ValueError when the state is not exactly ``{"calls": t}``
    with t an integer >= 0 (a one-element tensor is accepted).
    """

    name: ClassVar[str]
    calls: int

    def _post_init(self) -> None:
        self.calls = 0

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
