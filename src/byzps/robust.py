"""The robust aggregation pipeline of a config: pre-aggregators chained before the aggregator.

:func:`build_pipeline` builds it from plain values (the job builder,
:func:`byzps.job.build_robust`, reads them from a config); the PS core hands it to
:class:`byzps.core.rounds.ServerRounds` as its ``aggregate`` callable::

    robust = build_pipeline("trimmed_mean", {"f": 1}, [{"name": "nnm"}], f=1)
    robust.check(n)                       # ValueError if the chain cannot run on n rows
    out = robust(grads)                   # (m, d) float32 -> (d,) float32
    quorum = quorum_for(n, f, None, robust)  # n - f, but never fewer rows than it takes

Each pre-aggregator entry of ``aggregation.pre_aggregators`` is a mapping ``{name: ..., <its
parameters>}``; its ``f`` defaults to the config's f (``Config.f``), like the aggregator's.
With no pre-aggregators the pipeline's result is bit-identical to the bare aggregator's.

This module imports only :mod:`byzps.aggregators`; it reads no config.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch

from byzps import aggregators


def pre_spec(entry: Mapping[str, Any], f: Optional[int] = None) -> tuple[str, dict[str, Any]]:
    """Split one ``pre_aggregators`` entry into ``(name, params)`` for ``build_pre``.

    Args:
        entry: ``{"name": str, **params}``.
        f: filled in as the ``f`` parameter when the entry does not give one (and the
            pre-aggregator has an ``f`` parameter).

    Raises:
        ValueError: the entry is not a mapping or has no string ``name``.
    """
    if not isinstance(entry, Mapping):
        raise ValueError(f"a pre-aggregator entry must be a mapping {{name: ..., params...}}, "
                         f"got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str):
        raise ValueError(f"a pre-aggregator entry needs a string 'name' (one of "
                         f"{', '.join(aggregators.pre_names())}), got {name!r}")
    params = {k: v for k, v in entry.items() if k != "name"}
    if f is not None and "f" in aggregators.pre_params(name):
        params.setdefault("f", f)
    return name, params


class RobustPipeline:
    """Pre-aggregators applied in order, then the aggregator: ``(m, d) -> (d,)``.

    Args:
        pre: pre-aggregator objects (``aggregators.build_pre``), applied first to last.
        aggregator: the aggregator object (``aggregators.build``).

    Attributes:
        name: ``"clipping+nnm>trimmed_mean"`` style label (just the aggregator's name when
            there are no pre-aggregators).
        f: the aggregator's f.
    """

    def __init__(self, pre: Iterable[aggregators.PreAggregator],
                 aggregator: aggregators.Aggregator):
        self.pre = list(pre)
        self.aggregator = aggregator
        self.f = aggregator.f
        self.name = ("+".join(p.name for p in self.pre) + ">" if self.pre else "") + \
            aggregator.name

    def output_rows(self, n: int) -> int:
        """Rows the aggregator receives when the pipeline gets n rows."""
        for p in self.pre:
            n = p.output_rows(n)
        return n

    def check(self, n: int) -> None:
        """Check every stage on the rows it would receive from n input rows.

        Raises:
            ValueError: naming the stage, its n and f, and the violated precondition.
        """
        for p in self.pre:
            p.check(n)
            n = p.output_rows(n)
        self.aggregator.check(n)

    def warning(self, n: int) -> Optional[str]:
        """The stages' warnings (paper guarantee not met) for n input rows, joined; or None."""
        notes = []
        for p in self.pre:
            w = p.warning(n)
            if w:
                notes.append(w)
            n = p.output_rows(n)
        w = self.aggregator.warning(n)
        if w:
            notes.append(w)
        return "; ".join(notes) or None

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        """Aggregate ``(m, d)`` float32/float64 rows into one ``(d,)`` vector of the same dtype.

        Raises:
            ValueError: a stage cannot run on the rows it receives (e.g. too few arrived).
            TypeError: not a float tensor.
        """
        x = grads
        for p in self.pre:
            x = p(x)
        return self.aggregator(x)

    def state_dict(self) -> dict[str, Any]:
        """``{"pre": [state of each pre-aggregator], "aggregator": state}`` (for checkpoints)."""
        return {"pre": [p.state_dict() for p in self.pre],
                "aggregator": self.aggregator.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            ValueError: the number of pre-aggregator states does not match.
        """
        pres = list(state.get("pre", []))
        if len(pres) != len(self.pre):
            raise ValueError(f"state holds {len(pres)} pre-aggregator states, the pipeline has "
                             f"{len(self.pre)}")
        for p, s in zip(self.pre, pres):
            p.load_state_dict(s)
        self.aggregator.load_state_dict(state.get("aggregator", {}))

    def __repr__(self) -> str:
        return f"RobustPipeline({self.pre!r}, {self.aggregator!r})"


def build_pipeline(method: str, params: Mapping[str, Any],
                   pre_aggregators: Iterable[Mapping[str, Any]], f: int) -> RobustPipeline:
    """Build a pipeline from plain values (what :func:`build_robust` reads from a config).

    Args:
        method: aggregator name (``aggregators.names()``).
        params: the aggregator's keyword parameters (``f`` included when it has one).
        pre_aggregators: entries ``{name, **params}``, applied in order.
        f: default ``f`` of every pre-aggregator entry that does not set it.

    Raises:
        ValueError: unknown name or bad parameter (the message names the stage).
    """
    pres = []
    for k, entry in enumerate(pre_aggregators):
        try:
            name, p = pre_spec(entry, f)
            pres.append(aggregators.build_pre(name, **p))
        except ValueError as e:
            raise ValueError(f"pre_aggregators.{k}: {e}") from None
    return RobustPipeline(pres, aggregators.build(method, **params))


def min_rows(rule: Any, n: int) -> int:
    """The fewest rows (1..n) that ``rule.check`` accepts; n when none does."""
    for m in range(1, n + 1):
        try:
            rule.check(m)
            return m
        except ValueError:
            continue
    return n


def quorum_for(n: int, f: int, quorum: Optional[int], rule: Any) -> int:
    """The quorum of a round: ``quorum`` (default n - f), and never fewer than the rule needs
    (:func:`min_rows`); clamped to 1..n.

    Args:
        n: number of workers; f: Byzantine workers tolerated.
        quorum: the configured quorum (``training.quorum``) or None.
        rule: anything with ``check(m)`` raising ValueError below its minimum (a pipeline).
    """
    q = n - f if quorum is None else quorum
    return max(1, min(max(q, min_rows(rule, n)), n))
