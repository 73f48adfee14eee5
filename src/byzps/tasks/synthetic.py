"""The ``synthetic`` built-in task: a small classification problem generated from a seed, for
tests and demos (no files, no download; the same seed gives the same data on every machine).

Generation (torch's CPU generator seeded with ``seed``): C class centres ``mu_c ~ N(0, I)`` in
``features`` dimensions, scaled by ``separation``; each item draws its label uniformly from
0..C-1 and its input ``x = mu_y + noise * N(0, I)``. The training and test sets come from the
same distribution (one stream: centres, then training items, then test items).

Models: ``mlp`` (linear, ReLU, linear), ``mlp_bn`` (linear, BatchNorm1d, ReLU, linear: a model
with buffers, to test that BatchNorm statistics never make replicas drift) and ``logreg``.
"""

from __future__ import annotations

import torch
from torch import nn

from byzps.task import LabeledTensors, Task

#: Upper bounds that keep a config from making the PS allocate without limit.
MAX_ITEMS = 1_000_000
MAX_FEATURES = 4096
MAX_CLASSES = 1000
MAX_HIDDEN = 4096


def _int_in(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name}: expected an integer in {lo}..{hi}, got {value!r}")
    return value


def _float_in(name: str, value, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{name}: expected a number in [{lo}, {hi}], got {value!r}")
    return float(value)


class SyntheticTask(Task):
    """Gaussian classes generated from a seed (see the module docstring).

    Args:
        model: ``mlp`` (default), ``mlp_bn`` or ``logreg``.
        features: input dimension (1..4096, default 16).
        classes: C (2..1000, default 4).
        train_size, test_size: items (1..1,000,000; defaults 2048 and 512).
        noise: standard deviation of the within-class noise (0..100, default 1.0).
        separation: scale of the class centres (0..100, default 2.0).
        hidden: width of the hidden layer of the MLPs (1..4096, default 32).
        seed: the data's seed (>= 0, default 0); the model's initial weights come from
            ``training.seed`` instead.

    Raises:
        ValueError: unknown model or a parameter out of range (the message names it).
    """

    MODELS = ("logreg", "mlp", "mlp_bn")

    def __init__(self, model: str = "mlp", features: int = 16, classes: int = 4,
                 train_size: int = 2048, test_size: int = 512, noise: float = 1.0,
                 separation: float = 2.0, hidden: int = 32, seed: int = 0):
        if model not in self.MODELS:
            raise ValueError(f"unknown model {model!r} for synthetic; expected one of "
                             f"{', '.join(self.MODELS)}")
        self.model = model
        self.features = _int_in("features", features, 1, MAX_FEATURES)
        self.classes = _int_in("classes", classes, 2, MAX_CLASSES)
        self.train_size = _int_in("train_size", train_size, 1, MAX_ITEMS)
        self.test_size = _int_in("test_size", test_size, 1, MAX_ITEMS)
        self.noise = _float_in("noise", noise, 0.0, 100.0)
        self.separation = _float_in("separation", separation, 0.0, 100.0)
        self.hidden = _int_in("hidden", hidden, 1, MAX_HIDDEN)
        self.seed = _int_in("seed", seed, 0, 2 ** 63 - 1)
        self._data: tuple[LabeledTensors, LabeledTensors] | None = None

    def build_model(self) -> nn.Module:
        """``(B, features)`` -> ``(B, classes)`` logits; weights from torch's global RNG."""
        f, h, c = self.features, self.hidden, self.classes
        if self.model == "logreg":
            return nn.Linear(f, c)
        if self.model == "mlp":
            return nn.Sequential(nn.Linear(f, h), nn.ReLU(), nn.Linear(h, c))
        return nn.Sequential(nn.Linear(f, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, c))

    def _generate(self) -> tuple[LabeledTensors, LabeledTensors]:
        if self._data is None:
            gen = torch.Generator().manual_seed(self.seed)
            centres = torch.randn(self.classes, self.features, generator=gen) * self.separation
            splits = []
            for size in (self.train_size, self.test_size):
                y = torch.randint(0, self.classes, (size,), generator=gen)
                x = centres[y] + self.noise * torch.randn(size, self.features, generator=gen)
                splits.append(LabeledTensors(x.contiguous(), y))
            self._data = (splits[0], splits[1])
        return self._data

    def train_data(self) -> LabeledTensors:
        """``(train_size, features)`` float32 inputs and int64 labels (generated once)."""
        return self._generate()[0]

    def test_data(self) -> LabeledTensors:
        """``(test_size, features)`` float32 inputs and int64 labels."""
        return self._generate()[1]
