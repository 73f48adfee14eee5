"""The worker: connect (with retry), compute gradients on its shard, apply updates, resync.

The per-message logic is :class:`byzps.protocol.WorkerRounds`; this module does the I/O. A
worker keeps retrying its connection with exponential backoff until
``server.connect_timeout`` seconds have passed, so it may start before the PS, and it
reconnects the same way when the connection drops before the PS said STOP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

import numpy as np
import torch

from byzps import attacks
from byzps.config import Config
from byzps.data import iid_shards, load_mnist, to_tensors
from byzps.protocol import WorkerRounds
from byzps.training import Replica
from byzps.transport import PeerClosed, read_message, write_message
from byzps.wire import FrameError, Hello, Limits, MsgType, Refuse

log = logging.getLogger(__name__)


class WorkerFailed(RuntimeError):
    """The worker cannot go on (refused by the PS, PS unreachable); the message says why."""


class ShardSampler:
    """Endless minibatches from one shard: a seeded reshuffle each epoch, last partial batch
    dropped (or the whole shard as one batch when it is smaller than ``batch_size``).

    Args:
        x: ``(m, 1, 28, 28)`` float32 shard inputs.
        y: ``(m,)`` int64 labels.
        batch_size: B.
        seed: sampling seed (same seed, same sequence).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        self.x, self.y = x, y
        self.batch_size = min(batch_size, len(y))
        self.gen = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.int64)
        self._pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(B, 1, 28, 28)`` inputs and ``(B,)`` labels."""
        if self._pos + self.batch_size > len(self._order):
            self._order = torch.randperm(len(self.y), generator=self.gen)
            self._pos = 0
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.x[idx], self.y[idx]


def shard_tensors(cfg: Config, worker_id: int, data_root: str) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """Load MNIST and return this worker's iid shard as tensors.

    Raises:
        byzps.data.DatasetNotFound: no MNIST copy found.
    """
    mnist = load_mnist(data_root)
    shards = iid_shards(len(mnist.train_labels), cfg.n, cfg.training.seed,
                        cfg.training.train_limit)
    idx = shards[cfg.shard_of(worker_id)]
    return to_tensors(mnist.train_images[idx], mnist.train_labels[idx])


class Worker:
    """One worker process.

    Args:
        cfg: validated config.
        worker_id: must be one of the config's worker ids.
        worker_type: ``honest`` or ``byzantine`` (overrides the config's type), or None.
        data_root: MNIST folder.

    Raises:
        KeyError: unknown worker id.
        byzps.data.DatasetNotFound: no MNIST copy found.
    """

    def __init__(self, cfg: Config, worker_id: int, worker_type: Optional[str],
                 data_root: str):
        self.cfg = cfg
        self.id = worker_id
        wcfg = cfg.worker(worker_id)
        self.type = worker_type or wcfg.type
        t = cfg.training
        x, y = shard_tensors(cfg, worker_id, data_root)
        self.sampler = ShardSampler(x, y, t.batch_size, seed=t.seed * 1_000_003 + worker_id)
        self.replica = Replica(t.model, t.seed, t.learning_rate, t.momentum)
        self.attack = attacks.build("sign_flip", scale=wcfg.attack_scale) \
            if self.type == "byzantine" else None
        self.machine = WorkerRounds(worker_id, self.replica, self._compute)
        self.limits = Limits(self.replica.d, frozenset({MsgType.STATE, MsgType.ROUND,
                                                        MsgType.UPDATE, MsgType.STOP,
                                                        MsgType.REFUSE}))

    def _compute(self, round_: int) -> tuple[torch.Tensor, float]:
        x, y = self.sampler.next()
        grad, loss = self.replica.gradient(x, y)
        if self.attack is not None:
            grad = self.attack(attacks.AttackContext(round_, grad))
        return grad, loss

    async def _connect(self, deadline: float) -> tuple[asyncio.StreamReader,
                                                       asyncio.StreamWriter]:
        s = self.cfg.server
        delay = 0.1
        while True:
            try:
                return await asyncio.wait_for(asyncio.open_connection(s.host, s.port), 10.0)
            except (OSError, asyncio.TimeoutError, TimeoutError) as e:
                if time.monotonic() + delay > deadline:
                    raise WorkerFailed(
                        f"worker {self.id}: cannot reach the PS at {s.host}:{s.port} within "
                        f"server.connect_timeout={s.connect_timeout:g} s ({e}); is the server "
                        f"running and the address right?") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def run(self) -> int:
        """Work until the PS says STOP.

        Returns:
            number of rounds whose update this worker applied.

        Raises:
            WorkerFailed: refused, PS unreachable, or the PS aborted training.
        """
        timeout = self.cfg.server.connect_timeout
        while True:
            reader, writer = await self._connect(time.monotonic() + timeout)
            try:
                await write_message(writer, Hello(self.id), 30.0)
                log.info("worker %d (%s) connected to the PS", self.id, self.type)
                while self.machine.stopped is None:
                    msg = await read_message(reader, self.limits, None)
                    if isinstance(msg, Refuse):
                        raise WorkerFailed(f"worker {self.id}: the PS refused us: {msg.reason}")
                    for reply in self.machine.on_message(msg):
                        await write_message(writer, reply, 60.0)
            except (PeerClosed, ConnectionError, OSError, FrameError, ValueError,
                    asyncio.TimeoutError, TimeoutError) as e:
                log.warning("worker %d: connection to the PS lost (%s); reconnecting", self.id,
                            e or type(e).__name__)
                await asyncio.sleep(0.2)
                continue
            finally:
                writer.close()
            stop = self.machine.stopped
            if not stop.ok:
                raise WorkerFailed(f"worker {self.id}: the PS aborted: {stop.reason}")
            log.info("worker %d: %s (%d rounds applied, replica digest %s)", self.id,
                     stop.reason, self.machine.rounds_done, self.replica.digest())
            return self.machine.rounds_done
