"""An example user task for byzps: two interleaved spirals in the plane (a classic hard case
for linear models; Lang & Witbrock 1988), padded with nuisance features, classified by a small
MLP with BatchNorm. Everything byzps needs is in :class:`SpiralsTask`; ``make_task`` is the
factory a config names::

    task:
      ref: "examples/my_task.py:make_task"   # relative to the directory byzps runs in
      params: {hidden: 64, noise: 0.2}

The data are generated from ``data_seed`` with torch's CPU generator, so every process that
loads this file sees the same examples. Inputs are ``(features,)`` float32 rows, labels 0 or 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from byzps import Task
from byzps.task import LabeledTensors


class SpiralsTask(Task):
    """Two spirals, ``train_size`` + ``test_size`` points, label = which spiral.

    Args:
        hidden: width of the MLP's hidden layers.
        noise: standard deviation of the Gaussian jitter added to each point.
        nuisance: extra input features of pure noise (the model must learn to ignore them).
        train_size, test_size: points per split (half per spiral, rounded).
        turns: how many times each spiral winds around the origin.
        data_seed: seed of the generated data (the model's weights come from training.seed).
    """

    def __init__(self, hidden: int = 64, noise: float = 0.2, nuisance: int = 6,
                 train_size: int = 4000, test_size: int = 1000, turns: float = 1.5,
                 data_seed: int = 0):
        if hidden < 1 or nuisance < 0 or train_size < 2 or test_size < 2 or noise < 0:
            raise ValueError("hidden >= 1, nuisance >= 0, noise >= 0 and split sizes >= 2 "
                             "expected")
        self.hidden, self.noise, self.nuisance = hidden, noise, nuisance
        self.turns = turns
        gen = torch.Generator().manual_seed(data_seed)
        self.train = self._points(train_size, gen)
        self.test = self._points(test_size, gen)

    def _points(self, size: int, gen: torch.Generator) -> LabeledTensors:
        y = torch.arange(size) % 2
        t = torch.rand(size, generator=gen) * self.turns * 2 * math.pi + 0.5
        sign = 1.0 - 2.0 * y.to(torch.float32)           # spiral 1 is spiral 0 rotated by pi
        xy = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], dim=1) / (
            self.turns * 2 * math.pi)
        xy = xy + self.noise * torch.randn(size, 2, generator=gen) / 4
        extra = torch.randn(size, self.nuisance, generator=gen)
        return LabeledTensors(torch.cat([xy, extra], dim=1).contiguous(), y)

    def build_model(self) -> nn.Module:
        d_in = 2 + self.nuisance
        return nn.Sequential(
            nn.Linear(d_in, self.hidden), nn.BatchNorm1d(self.hidden), nn.ReLU(),
            nn.Linear(self.hidden, self.hidden), nn.ReLU(),
            nn.Linear(self.hidden, 2))

    def train_data(self) -> LabeledTensors:
        return self.train

    def test_data(self) -> LabeledTensors:
        return self.test


def make_task(**params) -> SpiralsTask:
    """The factory named by the config's ``task.ref``; ``params`` are ``task.params``."""
    return SpiralsTask(**params)
