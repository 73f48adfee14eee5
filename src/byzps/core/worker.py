"""The worker core: what one worker computes each round, with no I/O.

A :class:`WorkerCore` holds the worker's replica, its shard and minibatch sampler
(:class:`byzps.partition.ShardSampler`, a pure function of (seed, round)), its worker momentum
(:class:`WorkerMomentum`) and, for a Byzantine worker, its attack and the
:class:`byzps.attacks.AttackContext` the attack sees. Its :attr:`WorkerCore.machine` (a
:class:`byzps.core.rounds.WorkerRounds`) turns the PS's messages into replies. Both drivers use
it unchanged: the TCP worker (:mod:`byzps.net.worker`) moves its messages over a socket, the
in-process simulator (:mod:`byzps.simulate`) hands them over in memory.

What a worker sends each round (:meth:`WorkerCore.compute`): the minibatch gradient g_t of its
shard, or with worker momentum beta > 0 its momentum vector m_t = beta * m_{t-1} +
(1 - beta) * g_t (:class:`WorkerMomentum`). A Byzantine worker instead sends what its attack
makes of an :class:`byzps.attacks.AttackContext` holding what it can see: that honest vector,
its current minibatch, gradients at the current model, further minibatches of its own shard,
n, f and its seed (and, in simulation only, the honest vectors of the round for an omniscient
attack: :attr:`WorkerCore.omniscient_view`).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from byzps import attacks
from byzps.attacks.base import round_generator
from byzps.core.rounds import WorkerRounds
from byzps.partition import ShardSampler
from byzps.replica import Replica
from byzps.robust import RobustPipeline

log = logging.getLogger(__name__)


class AttackOutputError(RuntimeError):
    """An attack returned a vector that cannot be sent (wrong size): a bug in the attack.
    A local error: the worker stops with this message instead of reconnecting."""


class WorkerMomentum:
    """Worker-side momentum (Karimireddy et al. 2021; El Mhamdi et al. 2021), explicit state.

    ``m_t = beta * m_{t-1} + (1 - beta) * g_t`` with ``m_0 = 0`` (so ``m_1 = (1 - beta) * g_1``),
    one step per round. With beta = 0 it is the identity (``step`` returns g itself) and keeps
    no state. If the same round is answered twice (the PS re-asks after a reconnect), the second
    call replaces that round's step instead of stepping again, so m_t stays one step per round.

    Args:
        beta: momentum in [0, 1).

    Attributes:
        buffer: ``(d,)`` float32 m after the latest step, or None before the first.

    Raises:
        ValueError: beta outside [0, 1).
    """

    def __init__(self, beta: float):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"worker momentum must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.buffer: Optional[torch.Tensor] = None
        self._before: Optional[torch.Tensor] = None
        self._round: Optional[int] = None

    def step(self, round_: int, g: torch.Tensor) -> torch.Tensor:
        """Fold the round's ``(d,)`` float32 gradient g into m and return m_t (``(d,)`` float32).

        Raises:
            ValueError: g's shape differs from the buffer's.
        """
        if self.beta == 0.0:
            return g
        base = self._before if round_ == self._round else self.buffer
        if base is not None and base.shape != g.shape:
            raise ValueError(f"worker momentum: gradient shape {tuple(g.shape)} differs from "
                             f"the buffer's {tuple(base.shape)}")
        m = g * (1.0 - self.beta) if base is None else base * self.beta + g * (1.0 - self.beta)
        self._before, self.buffer, self._round = base, m, round_
        return m


def worker_seed(training_seed: int, worker_id: int) -> int:
    """The seed of worker ``worker_id``'s own random streams (minibatch order, attack draws):
    distinct per worker, fixed by ``training.seed``."""
    return training_seed * 1_000_003 + worker_id


class WorkerCore:
    """One worker's computation: sampling, worker momentum, the attack, the gradient.

    Args:
        worker_id: the worker's id.
        replica: its model replica (:class:`byzps.replica.Replica`).
        shard: ``(x, y)``: ``(m, *input_shape)`` inputs and ``(m,)`` int64 labels of its shard.
        batch_size: B, examples per minibatch (at most m are used).
        training_seed: ``training.seed``; the worker's own seed is :func:`worker_seed`.
        n: number of workers; f: Byzantine workers the aggregator tolerates (what an attack
            may know).
        worker_momentum: beta in [0, 1) (0 = off).
        attack: the attack when the worker is Byzantine, else None.
        pipeline: the config's robust pipeline (a private copy; the config is public), which
            attacks may run through :meth:`evaluate_pipeline`; None: attacks get no
            ``aggregate``.

    Attributes:
        machine: the worker's round state machine (:class:`byzps.core.rounds.WorkerRounds`).
        omniscient_view: ``(h, d)`` float32 honest vectors of the current round, set by the
            simulator before a Byzantine worker with an omniscient attack answers; None over
            TCP.
        pipeline_state: the PS pipeline's ``state_dict()`` at the start of the current round,
            set by the simulator next to ``omniscient_view``; None (always over TCP) means the
            pipeline's initial state. :meth:`evaluate_pipeline` runs the rule from it.

    Raises:
        ValueError: worker momentum outside [0, 1).
    """

    def __init__(self, worker_id: int, replica: Replica,
                 shard: tuple[torch.Tensor, torch.Tensor], batch_size: int, training_seed: int,
                 n: int, f: int, worker_momentum: float = 0.0,
                 attack: Optional[attacks.Attack] = None,
                 pipeline: Optional[RobustPipeline] = None):
        self.id = worker_id
        self.replica = replica
        self.seed = worker_seed(training_seed, worker_id)
        self.sampler = ShardSampler(shard[0], shard[1], batch_size, seed=self.seed)
        self._shard = shard
        self._estimate_gen = round_generator(self.seed, -1, "sample_batch")
        self.n, self.f = n, f
        self.worker_momentum = worker_momentum
        self.momentum = WorkerMomentum(worker_momentum)
        self.attack = attack
        # a raw-gradient attack (label_flip, mimic) gets its own momentum, like an honest worker
        self.attack_momentum = WorkerMomentum(worker_momentum)
        self.omniscient_view: Optional[torch.Tensor] = None
        self.pipeline_state: Optional[dict] = None
        self._pipeline = pipeline
        self._pipeline_initial = pipeline.state_dict() if pipeline is not None else None
        self.machine = WorkerRounds(worker_id, replica, self.compute)

    @property
    def type(self) -> str:
        """``byzantine`` when the worker runs an attack, else ``honest``."""
        return "honest" if self.attack is None else "byzantine"

    def _gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(d,)`` float32 raw gradient on ``(B, *input_shape)`` / ``(B,)`` data at the replica."""
        return self.replica.gradient(x, y)[0]

    def sample_batch(self, generator: Optional[torch.Generator] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """A further minibatch of this worker's shard, for attacks' estimates.

        B examples (the training batch size, at most the shard size) drawn uniformly without
        replacement, independently of the training sampler's sequence.

        Args:
            generator: source of randomness; None = this worker's own estimation stream.

        Returns:
            ``(B, *input_shape)`` inputs and ``(B,)`` int64 labels.
        """
        x, y = self._shard
        gen = self._estimate_gen if generator is None else generator
        idx = torch.randperm(len(y), generator=gen)[:self.sampler.batch_size]
        return x[idx], y[idx]

    def evaluate_pipeline(self, rows: torch.Tensor) -> torch.Tensor:
        """The config's robust pipeline on ``rows`` ``(m, d)`` -> ``(d,)``, as the PS would run
        it this round, without changing any state: every call starts from
        :attr:`pipeline_state` (or the initial state). What attacks get as
        :attr:`byzps.attacks.AttackContext.aggregate`.

        Raises:
            ValueError: the pipeline cannot run on m rows (its precondition), or this core was
                built without a pipeline.
        """
        if self._pipeline is None or self._pipeline_initial is None:
            raise ValueError(f"worker {self.id} has no copy of the robust pipeline")
        state = self.pipeline_state if self.pipeline_state is not None \
            else self._pipeline_initial
        self._pipeline.load_state_dict(state)
        return self._pipeline(rows)

    def context(self, round_: int, honest: torch.Tensor,
                batch: tuple[torch.Tensor, torch.Tensor]) -> attacks.AttackContext:
        """The :class:`byzps.attacks.AttackContext` of this worker for ``round_``.

        Args:
            round_: the round number.
            honest: ``(d,)`` float32 the honest vector (gradient, or momentum when on).
            batch: the current minibatch ``(x, y)``.
        """
        return attacks.AttackContext(
            round_, honest, batch=batch, gradient=self._gradient,
            sample_batch=self.sample_batch, n=self.n, f=self.f, seed=self.seed,
            worker_momentum=self.worker_momentum, honest_gradients=self.omniscient_view,
            aggregate=self.evaluate_pipeline if self._pipeline is not None else None)

    def compute(self, round_: int) -> tuple[torch.Tensor, float]:
        """``round -> ((d,) float32 vector to send, honest minibatch loss)``.

        Raises:
            AttackOutputError: the attack returned a vector of the wrong size (a bug in it).
            ValueError: an attack's precondition failed on this round's data (e.g. labels
                outside what label_flip accepts); the message says which.
        """
        x, y = self.sampler.batch(round_)
        grad, loss = self.replica.gradient(x, y)
        sent = self.momentum.step(round_, grad)
        if self.attack is not None:
            out = self.attack(self.context(round_, sent, (x, y)))
            if out.numel() != self.replica.d:
                raise AttackOutputError(f"attack {self.attack.name!r} returned {out.numel()} "
                                        f"values, expected d = {self.replica.d}")
            out = out.to(torch.float32).reshape(-1).contiguous()
            if self.attack.output_is_gradient:
                out = self.attack_momentum.step(round_, out)
            sent = out
        return sent, loss
