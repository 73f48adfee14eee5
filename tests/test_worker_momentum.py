"""Worker momentum m_t = beta m_{t-1} + (1 - beta) g_t, and the worker's attack integration."""

from __future__ import annotations

import pytest
import torch

from byzps import models
from byzps.attacks.gaussian import Gaussian
from byzps.attacks.sign_flip import SignFlip
from byzps.core.worker import WorkerMomentum
from byzps.job import Job, parse_config
from byzps.partition import ShardSampler
from byzps.replica import Replica
from byzps.task import LabeledTensors, Task


def vec(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def test_momentum_recursion_exact():
    m = WorkerMomentum(0.5)
    assert m.buffer is None
    # m1 = 0.5 * 0 + 0.5 * [2, 4] = [1, 2]
    assert torch.equal(m.step(0, vec(2, 4)), vec(1, 2))
    # m2 = 0.5 * [1, 2] + 0.5 * [6, 0] = [3.5, 1]
    assert torch.equal(m.step(1, vec(6, 0)), vec(3.5, 1))
    # m3 = 0.5 * [3.5, 1] + 0.5 * [0, 8] = [1.75, 4.5]
    assert torch.equal(m.step(2, vec(0, 8)), vec(1.75, 4.5))
    assert torch.equal(m.buffer, vec(1.75, 4.5))


def test_momentum_beta_quarter():
    m = WorkerMomentum(0.25)
    # m1 = 0.75 * [4, -8] = [3, -6]; m2 = 0.25 * [3, -6] + 0.75 * [0, 4] = [0.75, 1.5]
    m.step(0, vec(4, -8))
    assert torch.equal(m.step(1, vec(0, 4)), vec(0.75, 1.5))


def test_momentum_zero_is_the_identity():
    m = WorkerMomentum(0.0)
    g = vec(1, 2)
    assert m.step(0, g) is g and m.step(1, g) is g and m.buffer is None


def test_same_round_twice_replaces_the_step():
    m = WorkerMomentum(0.5)
    m.step(0, vec(2, 4))                                     # m1 = [1, 2]
    m.step(1, vec(100, 100))                                 # asked again for round 1 ...
    # ... so round 1's step is redone from m1: 0.5 * [1, 2] + 0.5 * [6, 0] = [3.5, 1]
    assert torch.equal(m.step(1, vec(6, 0)), vec(3.5, 1))
    # and the next round builds on it: 0.5 * [3.5, 1] + 0.5 * [0.5, 1] = [2, 1]
    assert torch.equal(m.step(2, vec(0.5, 1)), vec(2, 1))


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5])
def test_momentum_range(beta):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        WorkerMomentum(beta)


# -- the worker core's compute, on a small in-memory task (no sockets, no MNIST) -------------

X = torch.rand(160, 1, 28, 28, generator=torch.Generator().manual_seed(1))
Y = torch.arange(160) % 10


class TinyTask(Task):
    """160 random 28 x 28 images, labels 0..9 in turn, the logreg model: 40 per worker."""

    def build_model(self):
        return models.builder("logreg")()

    def train_data(self):
        return LabeledTensors(X, Y)

    def test_data(self):
        return LabeledTensors(X[:20], Y[:20])


def make_worker(base_config, beta, worker_id=3, worker_type=None, **wcfg):
    base_config["training"].update(model="logreg", batch_size=8, worker_momentum=beta)
    base_config["workers"][3].update(wcfg)
    return Job(parse_config(base_config), task=TinyTask()).worker_core(worker_id, worker_type)


def honest_sequence(w, rounds: int, cfg_seed: int = 0) -> list[torch.Tensor]:
    """The raw gradients g_0.. worker core ``w`` computes: same shard, same sampler seed, same
    (unchanged) model."""
    sampler = ShardSampler(*w._shard, 8, seed=cfg_seed * 1_000_003 + w.id)
    rep = Replica("logreg", cfg_seed, 0.05, 0.9)
    return [rep.gradient(*sampler.batch(r))[0] for r in range(rounds)]


def test_honest_worker_sends_its_momentum(base_config):
    w = make_worker(base_config, 0.5, worker_id=0)
    assert w.attack is None
    expected, m = [], torch.zeros(w.replica.d)
    for g in honest_sequence(w, 3):
        m = m * 0.5 + g * 0.5
        expected.append(m)
    for r in range(3):
        sent, loss = w.compute(r)
        assert torch.equal(sent, expected[r])
    # round 0: m1 = (1 - beta) g_1 exactly
    assert torch.equal(WorkerMomentum(0.5).step(0, honest_sequence(w, 1)[0]),
                       honest_sequence(w, 1)[0] * 0.5)


def test_honest_worker_without_momentum_sends_raw_gradient(base_config):
    w = make_worker(base_config, 0.0, worker_id=1)
    for r, g in enumerate(honest_sequence(w, 2)):
        assert torch.equal(w.compute(r)[0], g)


def test_byzantine_honest_gradient_is_its_momentum(base_config):
    # sign_flip with attack_scale -2 sends -2 * m_t, m_t the worker's own momentum
    w = make_worker(base_config, 0.5, attack_scale=-2.0)
    assert isinstance(w.attack, SignFlip) and w.attack.scale == -2.0
    m = torch.zeros(w.replica.d)
    for r, g in enumerate(honest_sequence(w, 3)):
        m = m * 0.5 + g * 0.5
        assert torch.equal(w.compute(r)[0], m * -2.0)


def test_label_flip_runs_through_its_own_momentum(base_config):
    del base_config["workers"][3]["attack_scale"]
    w = make_worker(base_config, 0.5, attack="label_flip")
    sampler = ShardSampler(*w._shard, 8, seed=3)
    rep = Replica("logreg", 0, 0.05, 0.9)
    m = torch.zeros(w.replica.d)
    for r in range(3):
        x, y = sampler.batch(r)
        m = m * 0.5 + rep.gradient(x, 9 - y)[0] * 0.5
        assert torch.equal(w.compute(r)[0], m)


def test_context_holds_what_the_worker_sees(base_config):
    w = make_worker(base_config, 0.0)
    x, y = w.sample_batch(torch.Generator().manual_seed(0))
    assert x.shape == (8, 1, 28, 28) and y.shape == (8,)
    x2, y2 = w.sample_batch(torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)          # a pure function of the generator
    ctx = w.context(4, torch.zeros(w.replica.d), (x, y))
    assert (ctx.round, ctx.n, ctx.f, ctx.seed, ctx.worker_momentum) == (4, 4, 1, 3, 0.0)
    assert torch.equal(ctx.gradient(x, y), w.replica.gradient(x, y)[0])


def test_worker_type_override(base_config):
    # an honest config entry run as byzantine: sign flip with its attack_scale (default -1)
    w = make_worker(base_config, 0.0, worker_id=0, worker_type="byzantine")
    assert isinstance(w.attack, SignFlip) and w.attack.scale == -1.0
    # a byzantine entry run as honest: no attack
    w = make_worker(base_config, 0.0, worker_type="honest")
    assert w.attack is None
    # the configured attack is used by the override too
    base_config["workers"][0].update(attack="gaussian", attack_params={"sigma": 3.0})
    w = make_worker(base_config, 0.0, worker_id=0, worker_type="byzantine")
    assert isinstance(w.attack, Gaussian) and w.attack.sigma == 3.0
    sent, _ = w.compute(0)
    assert sent.shape == (w.replica.d,) and sent.dtype == torch.float32
