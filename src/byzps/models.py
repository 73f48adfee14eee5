"""Models by name, all for ``(B, 1, 28, 28)`` float32 MNIST inputs and 10 logits.

| name | layers | parameters d |
|---|---|---|
| ``cnn_mnist`` | conv 20@5x5, pool, conv 50@5x5, pool, fc 500, fc 10 (the common benchmark CNN, as in LeCun et al. 1998 / Caffe's LeNet) | 431,080 |
| ``small_cnn`` | conv 8@5x5, pool, conv 16@5x5, pool, fc 10 | 5,994 |
| ``mlp`` | fc 200, fc 10 | 159,010 |
| ``logreg`` | fc 10 | 7,850 |
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _cnn_mnist() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
    )


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 10),
    )


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 10))


def _logreg() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


_BUILDERS = {"cnn_mnist": _cnn_mnist, "small_cnn": _small_cnn, "mlp": _mlp, "logreg": _logreg}


def model_names() -> list[str]:
    """Sorted names accepted by :func:`build_model`."""
    return sorted(_BUILDERS)


def builder(name: str) -> Callable[[], nn.Module]:
    """The constructor of model ``name``: a function of no arguments that draws the initial
    weights from torch's global RNG (seed it, or use :func:`seeded`).

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(model_names())}")
    return _BUILDERS[name]


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Call ``build()`` with torch's global RNG seeded by ``torch.manual_seed(seed)``, and put
    the CPU RNG state back afterwards (so building a model changes no other random stream).

    Args:
        build: returns a freshly initialised ``nn.Module``.
        seed: the same seed gives bit-identical initial weights on every machine.

    Returns:
        what ``build()`` returned.
    """
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return build()
    finally:
        torch.random.set_rng_state(gen_state)


def build_model(name: str, seed: int) -> nn.Module:
    """Build a model with PyTorch's default initialisation, seeded.

    Args:
        name: one of :func:`model_names`.
        seed: the same seed gives bit-identical initial weights on every machine.

    Returns:
        a float32 ``nn.Module`` mapping ``(B, 1, 28, 28)`` to ``(B, 10)`` logits.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    return seeded(builder(name), seed)
