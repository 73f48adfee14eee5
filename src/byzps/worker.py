"""The worker: connect (with retry), compute gradients on its shard, apply updates, resync.

The per-message logic is :class:`byzps.protocol.WorkerRounds`; this module does the I/O. A
worker keeps retrying its connection with exponential backoff until
``server.connect_timeout`` seconds have passed, so it may start before the PS, and it
reconnects the same way when the connection drops before the PS said STOP.

What a worker sends each round (:meth:`Worker._compute`): the minibatch gradient g_t of its
shard, or with ``training.worker_momentum`` beta > 0 its momentum vector
m_t = beta * m_{t-1} + (1 - beta) * g_t (:class:`WorkerMomentum`). A Byzantine worker instead
sends what its attack (``workers[].attack`` + ``attack_params``, default sign_flip with
``attack_scale``) makes of an :class:`byzps.attacks.AttackContext` holding what it can see:
that honest vector, its current minibatch, gradients at the current model, further minibatches
of its own shard, n, f and its seed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Optional

import torch

from byzps import attacks, auth
from byzps.attacks.base import round_generator
from byzps.config import Config
from byzps.data import Mnist, config_shards, load_mnist, to_tensors
from byzps.protocol import WorkerRounds
from byzps.robust import RobustPipeline, build_robust
from byzps.training import Replica
from byzps.transport import FrameStream, PeerClosed, client_ssl_context, set_keepalive
from byzps.wire import Auth, Challenge, FrameError, Hello, Limits, MsgType, Refuse

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
        self.seed = seed
        self._order = torch.empty(0, dtype=torch.int64)
        self._epoch = -1

    def batch(self, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The minibatch of round ``round_``: ``(B, 1, 28, 28)`` inputs and ``(B,)`` labels.

        A pure function of (seed, round): epoch e = round // (m // B) uses the permutation
        seeded by (seed, e), so a worker that reconnects, or a PS resumed from a checkpoint,
        sees exactly the batches an uninterrupted run would.

        Raises:
            ValueError: a negative round.
        """
        if round_ < 0:
            raise ValueError(f"round must be >= 0, got {round_}")
        per_epoch = len(self.y) // self.batch_size
        epoch, pos = divmod(round_, per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self.y), generator=gen)
            self._epoch = epoch
        idx = self._order[pos * self.batch_size:(pos + 1) * self.batch_size]
        return self.x[idx], self.y[idx]


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


def shard_tensors(cfg: Config, worker_id: int, data_root: str, mnist: Optional[Mnist] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """This worker's shard (``training.distribution``) as tensors.

    Args:
        mnist: already loaded MNIST (the simulator loads it once for all workers); None loads
            it from ``data_root``.

    Raises:
        byzps.data.DatasetNotFound: no MNIST copy found.
    """
    if mnist is None:
        mnist = load_mnist(data_root, parts=("train",))
    idx = config_shards(cfg, mnist.train_labels)[cfg.shard_of(worker_id)]
    return to_tensors(mnist.train_images[idx], mnist.train_labels[idx])


class Worker:
    """One worker process.

    Args:
        cfg: validated config.
        worker_id: must be one of the config's worker ids.
        worker_type: ``honest`` or ``byzantine`` (overrides the config's type), or None.
        data_root: MNIST folder.
        mnist: MNIST already loaded (train part), shared by the simulator's workers; None =
            load it from ``data_root``.

    Attributes:
        omniscient_view: ``(h, d)`` float32 honest vectors of the current round, set by the
            simulator before a Byzantine worker with an omniscient attack answers; always None
            over TCP.
        pipeline_state: the PS pipeline's ``state_dict()`` at the start of the current round,
            set by the simulator next to ``omniscient_view``; None (always over TCP) means the
            pipeline's initial state. :meth:`evaluate_pipeline` runs the rule from it.

    Raises:
        KeyError: unknown worker id.
        byzps.data.DatasetNotFound: no MNIST copy found.
        byzps.auth.AuthError: the secrets file is unusable or lacks this worker's key.
    """

    def __init__(self, cfg: Config, worker_id: int, worker_type: Optional[str],
                 data_root: str, mnist: Optional[Mnist] = None):
        self.cfg = cfg
        self.id = worker_id
        wcfg = cfg.worker(worker_id)
        self.type = worker_type or wcfg.type
        t = cfg.training
        x, y = shard_tensors(cfg, worker_id, data_root, mnist)
        self.seed = t.seed * 1_000_003 + worker_id
        self.sampler = ShardSampler(x, y, t.batch_size, seed=self.seed)
        self._shard = (x, y)
        self._estimate_gen = round_generator(self.seed, -1, "sample_batch")
        self.replica = Replica(t.model, t.seed, t.learning_rate, t.momentum)
        self.momentum = WorkerMomentum(t.worker_momentum)
        self.attack: Optional[attacks.Attack] = None
        self.omniscient_view: Optional[torch.Tensor] = None
        self.pipeline_state: Optional[dict] = None
        self._pipeline: Optional[RobustPipeline] = None
        self._pipeline_initial: Optional[dict] = None
        if self.type == "byzantine":
            self.attack = wcfg.build_attack()
            log.info("worker %d is Byzantine: attack %s %s", worker_id, *wcfg.attack_spec())
        # a raw-gradient attack (label_flip, mimic) gets its own momentum, like an honest worker
        self.attack_momentum = WorkerMomentum(t.worker_momentum)
        self.machine = WorkerRounds(worker_id, self.replica, self._compute)
        self.key = self._load_key()
        self.ssl_ctx = client_ssl_context(cfg.server.tls.ca) if cfg.server.tls else None
        d = self.replica.d
        running = frozenset({MsgType.STATE, MsgType.ROUND, MsgType.UPDATE, MsgType.STOP,
                             MsgType.REFUSE})
        self.limits = Limits(d, running)
        self.limits_mac = Limits(d, running, mac=True)
        # without authentication the first frame may be a ROUND or UPDATE when the PS has
        # already sent this model version's STATE to this worker id (one per version)
        self.limits_first = Limits(d, frozenset({MsgType.CHALLENGE, MsgType.STATE,
                                                 MsgType.REFUSE, MsgType.ROUND, MsgType.UPDATE,
                                                 MsgType.STOP}))

    def _gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(d,)`` float32 raw gradient on ``(B, 1, 28, 28)`` / ``(B,)`` data at the replica."""
        return self.replica.gradient(x, y)[0]

    def sample_batch(self, generator: Optional[torch.Generator] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """A further minibatch of this worker's shard, for attacks' estimates.

        B examples (the training batch size, at most the shard size) drawn uniformly without
        replacement, independently of the training sampler's sequence.

        Args:
            generator: source of randomness; None = this worker's own estimation stream.

        Returns:
            ``(B, 1, 28, 28)`` float32 inputs and ``(B,)`` int64 labels.
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
            ValueError: the pipeline cannot run on m rows (its precondition).
        """
        if self._pipeline is None:
            self._pipeline = build_robust(self.cfg)
            self._pipeline_initial = self._pipeline.state_dict()
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
            sample_batch=self.sample_batch, n=self.cfg.n, f=self.cfg.f, seed=self.seed,
            worker_momentum=self.cfg.training.worker_momentum,
            honest_gradients=self.omniscient_view, aggregate=self.evaluate_pipeline)

    def _compute(self, round_: int) -> tuple[torch.Tensor, float]:
        """``round -> ((d,) float32 vector to send, honest minibatch loss)``.

        Raises:
            RuntimeError: the attack returned a vector of the wrong size (a bug in it).
        """
        x, y = self.sampler.batch(round_)
        grad, loss = self.replica.gradient(x, y)
        sent = self.momentum.step(round_, grad)
        if self.attack is not None:
            out = self.attack(self.context(round_, sent, (x, y)))
            if out.numel() != self.replica.d:
                raise RuntimeError(f"attack {self.attack.name!r} returned {out.numel()} values, "
                                   f"expected d = {self.replica.d}")
            out = out.to(torch.float32).reshape(-1).contiguous()
            if self.attack.output_is_gradient:
                out = self.attack_momentum.step(round_, out)
            sent = out
        return sent, loss

    async def _connect(self, deadline: float) -> FrameStream:
        s = self.cfg.server
        delay = 0.1
        while True:
            try:
                _, stream = await asyncio.wait_for(
                    asyncio.get_running_loop().create_connection(
                        FrameStream, s.host, s.port, ssl=self.ssl_ctx,
                        server_hostname=s.host if self.ssl_ctx else None), 10.0)
                return stream
            except ssl.SSLCertVerificationError as e:
                raise WorkerFailed(
                    f"worker {self.id}: the PS at {s.host}:{s.port} failed TLS verification "
                    f"against server.tls.ca={self.cfg.server.tls.ca}: {e.verify_message} "
                    f"(certificate verify failed)") from None
            except (OSError, asyncio.TimeoutError, TimeoutError) as e:
                if time.monotonic() + delay > deadline:
                    raise WorkerFailed(
                        f"worker {self.id}: cannot reach the PS at {s.host}:{s.port} within "
                        f"server.connect_timeout={s.connect_timeout:g} s ({e}); is the server "
                        f"running and the address right?") from None
                if delay == 0.1:
                    log.info("worker %d: PS at %s:%d not reachable yet (%s); retrying for up "
                             "to %.0f s", self.id, s.host, s.port, e,
                             deadline - time.monotonic())
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _load_key(self) -> Optional[bytes]:
        path = auth.secrets_path(self.cfg.server.secrets_file)
        if path is None:
            return None
        keys = auth.load_keys(path)
        if self.id not in keys:
            raise auth.AuthError(f"secrets file {path} has no key for worker {self.id}")
        return keys[self.id]

    async def _handshake(self, stream: FrameStream) -> Optional[auth.MacSession]:
        """Introduce (and authenticate) this worker; returns the MAC session or None."""
        nonce = auth.new_nonce() if self.key is not None else None
        await stream.write_message(Hello(self.id, nonce.hex() if nonce else None), 30.0)
        first = await stream.read_message(self.limits_first, 60.0)
        if isinstance(first, Refuse):
            return self._refused(first)
        if self.key is None:
            if isinstance(first, Challenge):
                raise WorkerFailed(f"worker {self.id}: the PS requires authentication and this "
                                   f"worker has no key: set server.secrets_file or "
                                   f"${auth.ENV_SECRETS} to a file from `byzps keygen`")
            self.machine.on_message(first)
            return None
        if not isinstance(first, Challenge):
            raise WorkerFailed(f"worker {self.id}: the PS at {self.cfg.server.host}:"
                               f"{self.cfg.server.port} does not authenticate but this worker "
                               f"has a key; refusing to talk to it (wrong server or a downgrade)")
        server_nonce = bytes.fromhex(first.nonce)
        tag = auth.auth_tag(self.key, self.id, nonce, server_nonce)
        await stream.write_message(Auth(tag.hex()), 30.0)
        return auth.MacSession(self.key, self.id, nonce, server_nonce, is_server=False)

    def _refused(self, msg: Refuse) -> None:
        if msg.retry:
            raise ConnectionError(f"refused for now: {msg.reason}")
        raise WorkerFailed(f"worker {self.id}: the PS refused us: {msg.reason}")

    async def run(self) -> int:
        """Work until the PS says STOP, reconnecting (with backoff, for up to
        ``server.connect_timeout`` seconds each time) when the connection drops.

        Returns:
            number of rounds whose update this worker applied.

        Raises:
            WorkerFailed: refused, PS unreachable, authentication failure, or the PS aborted.
        """
        if self.attack is not None and self.attack.omniscient:
            raise WorkerFailed(
                f"worker {self.id}: attack {self.attack.name!r} has omniscient: true, which "
                f"needs the honest workers' gradients; a worker over TCP never sees them. "
                f"Run this config with `byzps simulate` or `byzps grid`, or remove "
                f"workers[].attack_params.omniscient")
        timeout = self.cfg.server.connect_timeout
        while True:
            stream = await self._connect(time.monotonic() + timeout)
            set_keepalive(stream.get_extra_info("socket"))
            # a new connection starts from a STATE (now, or after the next close when this
            # worker id already got this model version's); ROUND and UPDATE before it are
            # ignored, even if the replica of the lost connection happens to be current
            self.machine.synced = False
            try:
                session = await self._handshake(stream)
                limits = self.limits if session is None else self.limits_mac
                log.info("worker %d (%s) connected to the PS%s", self.id, self.type,
                         " (authentication sent)" if session else "")
                while self.machine.stopped is None:
                    msg = await stream.read_message(limits, None, session)
                    if isinstance(msg, Refuse):
                        self._refused(msg)
                    for reply in self.machine.on_message(msg):
                        await stream.write_message(reply, 60.0, session)
            except (PeerClosed, ConnectionError, OSError, FrameError, auth.AuthError, ValueError,
                    asyncio.TimeoutError, TimeoutError) as e:
                log.warning("worker %d: connection to the PS lost (%s); reconnecting", self.id,
                            e or type(e).__name__)
                await asyncio.sleep(0.5)
                continue
            finally:
                stream.close()
            stop = self.machine.stopped
            if not stop.ok:
                raise WorkerFailed(f"worker {self.id}: the PS aborted: {stop.reason}")
            log.info("worker %d: %s (%d rounds applied, replica digest %s)", self.id,
                     stop.reason, self.machine.rounds_done, self.replica.digest())
            return self.machine.rounds_done
