"""Base classes and parameter validation for aggregators and pre-aggregators.

An aggregator maps a gradient matrix ``(n, d)`` to one vector ``(d,)``; a pre-aggregator maps
it to another matrix ``(m, d)`` that an aggregator then reduces. Both are small objects built
from keyword parameters that are checked on construction (type, range, unknown names).

Common behaviour of every aggregator call (``Aggregator.__call__``):

1. ``grads`` must be a torch.Tensor of shape (n, d) with n, d >= 1 and dtype float32 or float64
   (TypeError / ValueError otherwise); it may live on any device; autograd is not recorded.
2. Rows holding NaN or +-Inf are certainly faulty: they are dropped and the rule runs on the
   remaining n' rows with f' = max(f - dropped, 0). If every row is non-finite, or the rule's
   precondition fails for (n', f'), a ValueError names n, f and the precondition.
3. The result has shape (d,), the input's dtype and device, and is finite (a ValueError is
   raised rather than returning a non-finite vector, which no rule here produces from finite
   rows).

Fast path: scanning every row for NaN/Inf first costs a full pass over the input (about as
long as ``torch.mean``). Every rule implements one hook, ``_compute(x, f, check)``: with
``check=False`` it runs on finite rows (step 2 done); a rule that sets ``_fast_path = True``
is also called with ``check=True`` first, on all n rows with the configured f, and then raises
``NonFiniteInput`` (before changing any state) when its own passes meet a non-finite value
(e.g. a non-finite float64 sum, Gram matrix, norm, or sorting-network extreme). Only then are
the rows scanned and step 2 runs as above, so the result is the same either way.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import torch

from ._finite import NonFiniteInput, all_finite, as_matrix, drop_nonfinite, nonfinite_rows

__all__ = ["Breakdown", "Param", "Rule", "Aggregator", "PreAggregator", "F_PARAM"]


@dataclass(frozen=True)
class Param:
    """Specification of one keyword parameter of a rule.

    kind: "int", "float" or "choice"; minimum: lower bound (inclusive unless ``strict``);
    maximum: upper bound (inclusive); allow_none: None is accepted (meaning "rule default").
    """

    kind: str
    default: Any
    help: str = ""
    minimum: float | None = None
    strict: bool = False
    maximum: float | None = None
    allow_none: bool = False
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = "an integer" if self.kind == "int" else "a finite number"
            if self.minimum is not None:
                text += f" {'>' if self.strict else '>='} {self.minimum:g}"
            if self.maximum is not None:
                text += f" and <= {self.maximum:g}"
        if self.allow_none:
            text += " or None"
        return text

    def validate(self, rule: str, name: str, value: Any) -> Any:
        def bad() -> ValueError:
            return ValueError(
                f"{rule}: parameter {name!r} must be {self.describe()}, got {value!r}"
            )

        if value is None:
            if self.allow_none:
                return None
            raise bad()
        if self.kind == "choice":
            if isinstance(value, str) and value in self.choices:
                return value
            raise bad()
        if isinstance(value, bool):
            raise bad()
        if self.kind == "int":
            if not isinstance(value, numbers.Integral):
                raise bad()
            value = int(value)
        else:
            if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                raise bad()
            value = float(value)
        if self.minimum is not None:
            if value < self.minimum or (self.strict and value == self.minimum):
                raise bad()
        if self.maximum is not None and value > self.maximum:
            raise bad()
        return value


@dataclass(frozen=True)
class Breakdown:
    """The bound a rule keeps when up to f of its n rows are Byzantine and placed anywhere
    (finite values up to the float32 maximum), declared next to the rule as its class
    attribute ``BREAKDOWN`` and checked for every registered rule by tests/test_breakdown.py.

    The bound holds whenever the rule runs within its paper's guarantee (``check(n)`` passes
    and ``warning(n)`` is None); it is stated in terms of the honest rows H (the n - b rows that
    are not Byzantine, b <= f) only, never in terms of the Byzantine values:

    * ``region="box"``: every coordinate j of the output lies in
      ``[lo_j - k w_j - margin, hi_j + k w_j + margin]``, where lo_j, hi_j are the smallest and
      largest honest values of coordinate j and ``w_j = hi_j - lo_j``;
    * ``region="ball"``: ``||out - c|| <= R + k Delta + margin``, where c is the mean of the
      honest rows, R the largest distance of an honest row to c and Delta the honest diameter
      (largest distance between two honest rows); e.g. "within k Delta of the honest rows'
      convex hull" implies it.

    k is ``spread`` (a number, or a function of (n, f) for bounds that depend on them) and
    ``margin`` an absolute term in the gradients' units, a function of the rule object (e.g.
    centered clipping's ``iterations * tau``; default none). With ``origin=True`` the zero
    vector counts as one more honest row (rules that shrink rows towards 0, e.g. clipping).
    For a pre-aggregator, which maps n rows to m, the bound applies to at least m - b output
    rows (the others may carry a Byzantine row's influence; the aggregator after it tolerates
    them as its f).

    Example: ``BREAKDOWN = Breakdown("box")`` (coordinate-wise median: Yin et al. 2018);
    ``Breakdown("ball", spread=lambda n, f: n / (n - 2 * f))`` (geometric median).
    """

    region: str
    spread: Union[float, Callable[[int, int], float]] = 0.0
    margin: Callable[[Any], float] | None = None
    origin: bool = False

    def __post_init__(self) -> None:
        if self.region not in ("box", "ball"):
            raise ValueError(f"Breakdown.region must be 'box' or 'ball', got {self.region!r}")

    def k(self, n: int, f: int) -> float:
        """The multiple k of the honest spread allowed with n rows and tolerance f."""
        return float(self.spread(n, f) if callable(self.spread) else self.spread)

    def extra(self, rule: Any) -> float:
        """The absolute margin of ``rule`` (0 when none is declared)."""
        return 0.0 if self.margin is None else float(self.margin(rule))


#: The number of Byzantine rows a rule must tolerate; every rule accepts it.
F_PARAM = Param("int", 0, "number of Byzantine workers to tolerate", minimum=0)


def _as_count(n: Any, rule: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"{rule}: the number of rows n must be a non-negative integer, got {n!r}")
    return int(n)


class Rule:
    """Shared machinery: keyword parameters, preconditions, warnings, state."""

    #: config name of the rule
    name: ClassVar[str] = ""
    #: keyword parameters: name -> Param (always includes "f")
    PARAMS: ClassVar[Mapping[str, Param]] = {"f": F_PARAM}
    #: the bound the rule keeps with up to f Byzantine rows (see ``Breakdown``); every
    #: registered rule declares one (tests/test_breakdown.py fails for a rule without)
    BREAKDOWN: ClassVar[Breakdown | None] = None

    f: int

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            raise ValueError(
                f"{self.name}: unknown parameter(s) {', '.join(map(repr, unknown))}; valid "
                f"parameters: {', '.join(self.PARAMS) or 'none'}"
            )
        for pname, spec in self.PARAMS.items():
            value = params.get(pname, spec.default)
            setattr(self, pname, spec.validate(self.name, pname, value))
        self._post_init()

    def _post_init(self) -> None:
        """Hook for subclasses: cross-parameter checks and state initialisation."""

    @property
    def params(self) -> dict[str, Any]:
        """The parameters this object was built with (defaults filled in)."""
        return {k: getattr(self, k) for k in self.PARAMS}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    # -- preconditions -------------------------------------------------------------------

    def _requirement(self, n: int, f: int) -> str | None:
        """Return a description of the violated precondition for (n, f), or None if it holds."""
        if n < 1:
            return "n >= 1 (at least one gradient)"
        return None

    def _guarantee(self, n: int, f: int) -> str | None:
        """Return why the paper's robustness guarantee does not hold at (n, f), or None."""
        return None

    def check(self, n: int) -> None:
        """Raise ValueError naming n, f and the precondition if the rule cannot run on n rows."""
        n = _as_count(n, self.name)
        problem = self._requirement(n, self.f)
        if problem is not None:
            raise ValueError(f"{self.name} cannot run with n={n} rows and f={self.f}: {problem}")

    def warning(self, n: int) -> str | None:
        """A message when the rule runs with n rows but its paper's guarantee needs more, else
        None. Callers log it once at start-up (it is never emitted per round)."""
        n = _as_count(n, self.name)
        if self._requirement(n, self.f) is not None:
            return None  # check(n) raises; nothing to warn about
        why = self._guarantee(n, self.f)
        if why is None:
            return None
        return f"{self.name} with n={n}, f={self.f}: {why}"

    def _require_at_call(self, n: int, f: int, dropped: int) -> None:
        if n == 0:
            raise ValueError(
                f"{self.name}: all {dropped} gradients hold NaN or Inf; nothing to aggregate"
            )
        problem = self._requirement(n, f)
        if problem is not None:
            note = (
                f" (after dropping {dropped} row(s) holding NaN/Inf, f lowered from {self.f})"
                if dropped
                else ""
            )
            raise ValueError(
                f"{self.name} cannot run with n={n} rows and f={f}{note}: {problem}"
            )

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """State carried between calls (tensors and plain values); {} for stateless rules."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned. Stateless rules accept only {}."""
        if state:
            raise ValueError(
                f"{self.name} is stateless; unexpected state keys {sorted(state)}"
            )

    #: whether :meth:`_compute` may be called with ``check=True`` on unscanned rows
    _fast_path: ClassVar[bool] = False

    def _compute(self, x: torch.Tensor, f: int, check: bool) -> torch.Tensor:  # pragma: no cover
        """The rule itself on ``x`` ``(n, d)`` with tolerance f.

        ``check=False``: every row is finite and (n, f) satisfies the precondition.
        ``check=True`` (only when ``_fast_path`` is set): the rows have not been scanned and f
        is the configured one; raise ``NonFiniteInput`` (before changing any state) when the
        rule's own passes meet a NaN or Inf.

        Returns:
            ``(d,)`` for an aggregator, ``(m, d)`` for a pre-aggregator, in x's dtype.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement _compute")


class Aggregator(Rule):
    """An aggregation rule: ``(n, d) -> (d,)``. Subclasses implement
    :meth:`Rule._compute` returning the ``(d,)`` aggregate (see the module docstring)."""

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = as_matrix(grads, self.name)
            out = None
            if self._fast_path and self._requirement(x.shape[0], self.f) is None:
                try:
                    out = self._compute(x, self.f, check=True)
                except NonFiniteInput:
                    out = None
            if out is None:
                x, dropped = drop_nonfinite(x)
                f = max(self.f - dropped, 0)
                self._require_at_call(x.shape[0], f, dropped)
                out = self._compute(x, f, check=False)
            if out.shape != (x.shape[1],) or out.dtype != x.dtype:  # pragma: no cover
                raise AssertionError(f"{self.name}: internal shape/dtype error")
            if not all_finite(out):  # pragma: no cover - defensive
                raise ValueError(f"{self.name}: the aggregate is not finite")
            return out


class PreAggregator(Rule):
    """A pre-aggregation rule: ``(n, d) -> (m, d)``, applied before an aggregator.

    Rows holding NaN/Inf are kept in place but come out as all-NaN rows (for bucketing: the
    bucket holding them comes out all-NaN); the rule itself runs on the finite rows with
    f' = max(f - dropped, 0). The aggregator that follows then drops those rows and lowers its
    own f by their count, so the pipeline's accounting of faulty rows stays right and the
    pipeline's result is finite. Subclasses implement :meth:`Rule._compute` returning the
    ``(m, d)`` output (see the module docstring).
    """

    def output_rows(self, n: int) -> int:
        """Number of rows m produced from n rows (the aggregator must accept m rows)."""
        return _as_count(n, self.name)


    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = as_matrix(grads, self.name)
            if self._fast_path and self._requirement(x.shape[0], self.f) is None:
                try:
                    return self._compute(x, self.f, check=True)
                except NonFiniteInput:
                    pass
            bad = nonfinite_rows(x)
            dropped = int(bad.sum())
            f = max(self.f - dropped, 0)
            self._require_at_call(x.shape[0] - dropped, f, dropped)
            if not dropped:
                return self._compute(x, f, check=False)
            out = torch.full_like(x, math.nan)
            out[~bad] = self._compute(x[~bad], f, check=False)
            return out
