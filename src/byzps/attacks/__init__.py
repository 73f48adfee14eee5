"""Byzantine behaviours (attacks), by config name.

An attack turns what a Byzantine worker can see into the vector it sends. In a real TCP
deployment a Byzantine worker sees only the model and its own shard; :class:`AttackContext`
holds exactly that (see :mod:`byzps.attacks.base` for the threat model and what collusion
means here).

Public API::

    atk = attacks.build("sign_flip", scale=-1.0)
    g_sent = atk(AttackContext(round=r, honest_gradient=g))     # (d,) float32
    attacks.names()            # ['alie', 'gaussian', 'inf', 'ipm', ...]
    attacks.params("alie")     # {'z': None, 'estimate_batches': 5, 'collude_seed': None}
    atk.needs                  # frozenset of AttackContext fields the attack reads

Attacks: ``sign_flip``, ``gaussian``, ``alie``, ``ipm``, ``label_flip``, ``mimic``, ``inf``,
``nan``, ``zero``, ``large``, ``minmax``, ``minsum``, ``fang``, ``opt_alie``, ``opt_ipm``
(one module each, the three constant faults share ``constant``; each with definition,
parameters and source).
"""

from __future__ import annotations

import inspect
from typing import Any

from byzps.attacks.alie import Alie, alie_z
from byzps.attacks.base import CONTEXT_FIELDS, Attack, AttackContext
from byzps.attacks.constant import Inf, Nan, Zero
from byzps.attacks.fang import Fang
from byzps.attacks.gaussian import Gaussian
from byzps.attacks.ipm import Ipm
from byzps.attacks.label_flip import LabelFlip
from byzps.attacks.large import Large
from byzps.attacks.mimic import Mimic
from byzps.attacks.minmax import MinMax
from byzps.attacks.minsum import MinSum
from byzps.attacks.opt_alie import OptAlie
from byzps.attacks.opt_ipm import OptIpm
from byzps.attacks.sign_flip import SignFlip

_REGISTRY: dict[str, type[Attack]] = {
    cls.name: cls for cls in (SignFlip, Gaussian, Alie, Ipm, LabelFlip, Mimic, Inf, Nan, Zero,
                              Large, MinMax, MinSum, Fang, OptAlie, OptIpm)
}


def names() -> list[str]:
    """Sorted config names of the available attacks."""
    return sorted(_REGISTRY)


def _lookup(name: Any) -> type[Attack]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown attack {name!r}; valid choices: {', '.join(names())}")
    return _REGISTRY[name]


def params(name: str) -> dict[str, Any]:
    """The parameters of attack ``name`` and their defaults, in signature order.

    Raises:
        ValueError: unknown name (listing the valid ones).
    """
    sig = inspect.signature(_lookup(name).__init__)
    return {p.name: p.default for p in list(sig.parameters.values())[1:]}


def build(name: str, /, **params_: Any) -> Attack:
    """Build an attack by config name.

    Args:
        name: one of :func:`names`.
        **params_: the attack's parameters (see :func:`params`); omitted ones take defaults.

    Raises:
        ValueError: unknown name (listing the valid ones), unknown parameter (listing the
            attack's parameters) or a bad parameter value.
    """
    cls = _lookup(name)
    valid = params(name)
    unknown = sorted(set(params_) - set(valid))
    if unknown:
        raise ValueError(f"attack {name!r}: unknown parameter(s) {', '.join(unknown)}; "
                         f"expected {', '.join(valid) or 'no parameters'}")
    try:
        return cls(**params_)
    except ValueError as e:
        raise ValueError(f"attack {name!r}: {e}") from None


__all__ = ["Attack", "AttackContext", "CONTEXT_FIELDS", "alie_z", "build", "names", "params"]
