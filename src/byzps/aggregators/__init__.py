"""Robust aggregation rules and pre-aggregators, and their registry.

Usage::

    from byzps import aggregators
    agg = aggregators.build("multi_krum", f=1, q=3)   # keyword parameters only
    agg.check(n)                                       # ValueError if the rule cannot run
    note = agg.warning(n)                              # str when the paper's guarantee fails
    out = agg(grads)                                   # (n, d) float32/float64 -> (d,)
    pre = aggregators.build_pre("nnm", f=1)            # (n, d) -> (m, d), m = pre.output_rows(n)
    aggregators.names(), aggregators.pre_names()       # sorted config names
    aggregators.params("multi_krum")                   # {"f": 0, "q": None}
    with aggregators.parallel_chunks(pool, 2):         # same results, columns on 2 threads
        out = agg(grads)
    agg.BREAKDOWN                                      # the bound kept with f Byzantine rows

Every rule is a small object with attributes ``name`` and ``f`` (and its other parameters),
``check(n)``, ``warning(n)``, ``state_dict()`` / ``load_state_dict()`` (empty for stateless
rules; centered clipping carries its centre, bucketing and dnc their call counters).
Conventions common to all rules (NaN/Inf rows are dropped and f lowered by their count; results
are finite; memory is bounded by chunking) are described in ``byzps.aggregators._base``,
``._finite``, ``._chunks``, ``._sorting``, ``._reduce`` and ``._distances``.

This package imports nothing else from byzps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from ._base import Aggregator, Breakdown, Param, PreAggregator, Rule
from ._chunks import for_each_part, parallel_chunks
from ._finite import all_finite
from .arc import ARC
from .bucketing import Bucketing
from .bulyan import Bulyan
from .caf import CAF
from .centered_clipping import CenteredClipping
from .cge import CGE
from .clipping import Clipping
from .dnc import DnC
from .geometric_median import GeometricMedian
from .krum import Krum, MultiKrum
from .mda import MDA
from .meamed import MeaMed
from .mean import Mean
from .median import CoordinateWiseMedian
from .monna import MoNNA
from .nnm import NNM
from .smea import SMEA
from .trimmed_mean import TrimmedMean

__all__ = [
    "ARC",
    "Aggregator",
    "Breakdown",
    "Bucketing",
    "Bulyan",
    "CAF",
    "CGE",
    "CenteredClipping",
    "Clipping",
    "CoordinateWiseMedian",
    "DnC",
    "GeometricMedian",
    "Krum",
    "MDA",
    "MeaMed",
    "Mean",
    "MoNNA",
    "MultiKrum",
    "NNM",
    "Param",
    "PreAggregator",
    "SMEA",
    "TrimmedMean",
    "all_finite",
    "build",
    "build_pre",
    "for_each_part",
    "names",
    "parallel_chunks",
    "params",
    "pre_names",
    "pre_params",
]

_AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (
        Mean,
        CoordinateWiseMedian,
        TrimmedMean,
        GeometricMedian,
        Krum,
        MultiKrum,
        Bulyan,
        CenteredClipping,
        MeaMed,
        MDA,
        DnC,
        CAF,
        SMEA,
        MoNNA,
        CGE,
    )
}

_PRE_AGGREGATORS: dict[str, type[PreAggregator]] = {
    cls.name: cls for cls in (Clipping, NNM, Bucketing, ARC)
}


#: a rule class (aggregator or pre-aggregator)
R = TypeVar("R", bound=Rule)


def _lookup(table: Mapping[str, type[R]], name: Any, kind: str) -> type[R]:
    if not isinstance(name, str) or name not in table:
        raise ValueError(
            f"unknown {kind} {name!r}; valid choices: {', '.join(sorted(table))}"
        )
    return table[name]


def names() -> list[str]:
    """Sorted config names of the aggregators."""
    return sorted(_AGGREGATORS)


def pre_names() -> list[str]:
    """Sorted config names of the pre-aggregators."""
    return sorted(_PRE_AGGREGATORS)


def build(name: str, /, **params: Any) -> Aggregator:
    """Build the aggregator ``name`` with keyword ``params``.

    Raises ValueError for an unknown name (listing the valid ones), an unknown keyword, or a
    parameter of the wrong type or out of range (naming it and what was expected).
    """
    return _lookup(_AGGREGATORS, name, "aggregator")(**params)


def build_pre(name: str, /, **params: Any) -> PreAggregator:
    """Build the pre-aggregator ``name`` with keyword ``params`` (errors as for ``build``)."""
    return _lookup(_PRE_AGGREGATORS, name, "pre-aggregator")(**params)


def params(name: str) -> dict[str, Any]:
    """Parameter name -> default value of aggregator ``name`` (ValueError if unknown)."""
    cls = _lookup(_AGGREGATORS, name, "aggregator")
    return {k: p.default for k, p in cls.PARAMS.items()}


def pre_params(name: str) -> dict[str, Any]:
    """Parameter name -> default value of pre-aggregator ``name`` (ValueError if unknown)."""
    cls = _lookup(_PRE_AGGREGATORS, name, "pre-aggregator")
    return {k: p.default for k, p in cls.PARAMS.items()}
