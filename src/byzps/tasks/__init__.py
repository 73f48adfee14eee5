"""Built-in tasks, by name (``task: {ref: <name>, params: {...}}`` in a config).

| name | data | models (``params.model``) |
|---|---|---|
| ``mnist`` | MNIST (LeCun et al. 1998), :mod:`byzps.data` | ``cnn_mnist`` (default), ``small_cnn``, ``mlp``, ``logreg`` |
| ``fashion_mnist`` | Fashion-MNIST (Xiao et al. 2017), same format as MNIST | the MNIST models |
| ``cifar10`` | CIFAR-10 (Krizhevsky 2009), binary version | ``resnet20`` (default; He et al. 2016), ``cnn_cifar`` |
| ``synthetic`` | Gaussian classes generated from a seed (tests, demos) | ``mlp`` (default), ``mlp_bn`` (BatchNorm), ``logreg`` |

Each task module is imported only when its task is used.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

#: name -> "module:class" of the built-in tasks.
_BUILTINS = {
    "mnist": "byzps.tasks.mnist:MnistTask",
    "fashion_mnist": "byzps.tasks.mnist:FashionMnistTask",
    "cifar10": "byzps.tasks.cifar10:Cifar10Task",
    "synthetic": "byzps.tasks.synthetic:SyntheticTask",
}


def names() -> list[str]:
    """Names of the built-in tasks, sorted."""
    return sorted(_BUILTINS)


def factory(name: str) -> type[Any]:
    """The class of built-in task ``name`` (call it with the task's params).

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    if name not in _BUILTINS:
        raise KeyError(f"unknown built-in task {name!r}; expected one of {', '.join(names())}")
    module, _, attr = _BUILTINS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def params(name: str) -> dict[str, Any]:
    """Parameter name -> default of built-in task ``name`` (for ``byzps list``).

    Raises:
        KeyError: unknown name.
    """
    sig = inspect.signature(factory(name))
    return {k: p.default for k, p in sig.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def models(name: str) -> list[str]:
    """Model names built-in task ``name`` accepts as ``params.model`` (its ``MODELS``).

    Raises:
        KeyError: unknown name.
    """
    return sorted(factory(name).MODELS)
