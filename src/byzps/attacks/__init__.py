"""Byzantine behaviours (attacks), by config name.

An attack turns what a Byzantine worker can see into the vector it sends. In a real TCP
deployment a Byzantine worker sees only the model and its own shard; :class:`AttackContext`
holds exactly that.

Public API::

    atk = attacks.build("sign_flip", scale=-1.0)
    g_sent = atk(AttackContext(round=r, honest_gradient=g))     # (d,) float32
    attacks.names()
"""

from __future__ import annotations

from byzps.attacks.base import Attack, AttackContext
from byzps.attacks.sign_flip import SignFlip

_REGISTRY: dict[str, type[Attack]] = {"sign_flip": SignFlip}


def names() -> list[str]:
    """Sorted config names of the available attacks."""
    return sorted(_REGISTRY)


def build(name: str, **params) -> Attack:
    """Build an attack by config name.

    Raises:
        ValueError: unknown name (listing the valid ones) or a bad parameter.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(names())}")
    try:
        return _REGISTRY[name](**params)
    except TypeError as e:
        raise ValueError(f"attack {name!r}: {e}") from None


__all__ = ["Attack", "AttackContext", "build", "names"]
