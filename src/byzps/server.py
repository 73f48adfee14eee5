"""The parameter server: connections, registration, the round loop, deadlines, evaluation.

The round logic itself is :class:`byzps.protocol.ServerRounds`; this module reads validated
messages from sockets, hands them to it, and carries out the actions it returns. A peer that
sends a bad frame, an unknown id or a duplicate registration is refused or disconnected with a
logged reason; nothing a peer sends stops the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch

from byzps import aggregators
from byzps.config import Config
from byzps.data import load_mnist, to_tensors
from byzps.metrics import JsonlWriter
from byzps.protocol import Action, Broadcast, RoundClosed, RoundFailed, Send, \
    ServerRounds
from byzps.training import Replica
from byzps.transport import PeerClosed, read_message, write_message
from byzps.wire import FrameError, Hello, Limits, MsgType, Refuse, Stop, encode

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0   # seconds a new connection has to introduce itself
WRITE_TIMEOUT = 30.0   # seconds a worker has to take one frame before it is dropped


class TrainingFailed(RuntimeError):
    """Training could not go on (no quorum, too few workers registered); message says why."""


@dataclass(frozen=True)
class ServerResult:
    """What a finished run reports.

    Attributes:
        rounds: rounds completed.
        test_accuracy: final accuracy on the evaluation set, in [0, 1].
        test_loss: final mean cross-entropy.
        seconds: wall seconds from the first round to the end.
    """

    rounds: int
    test_accuracy: float
    test_loss: float
    seconds: float


def min_rows(agg, n: int) -> int:
    """The fewest rows (1..n) the aggregator accepts, by its own ``check``."""
    for m in range(1, n + 1):
        try:
            agg.check(m)
            return m
        except ValueError:
            continue
    return n


class ParameterServer:
    """Runs one training job as the PS.

    Args:
        cfg: validated config.
        data_root: MNIST folder (see :func:`byzps.data.locate_mnist`).
        rounds: total rounds R (defaults to ``cfg.training.rounds``).

    Raises:
        byzps.data.DatasetNotFound: no MNIST copy found (raised by the constructor).
    """

    def __init__(self, cfg: Config, data_root: str, rounds: Optional[int] = None):
        self.cfg = cfg
        t = cfg.training
        self.rounds = rounds if rounds is not None else t.rounds
        mnist = load_mnist(data_root, parts=("t10k",))
        limit = t.test_limit or len(mnist.test_labels)
        self.test_x, self.test_y = to_tensors(mnist.test_images[:limit],
                                              mnist.test_labels[:limit])
        self.replica = Replica(t.model, t.seed, t.learning_rate, t.momentum)
        self.aggregator = aggregators.build(cfg.aggregation.method, **cfg.aggregator_params())
        warning = getattr(self.aggregator, "warning", lambda n: None)(cfg.n)
        if warning:
            log.warning("%s", warning)
        quorum = max(cfg.n - cfg.f, min_rows(self.aggregator, cfg.n))
        self.machine = ServerRounds([w.id for w in cfg.workers], self.replica, self.aggregator,
                                    self.rounds, quorum)
        self.limits_hello = Limits(self.replica.d, frozenset({MsgType.HELLO}))
        self.limits = Limits(self.replica.d, frozenset({MsgType.GRADIENT, MsgType.RESYNC}))
        self.writers: dict[int, asyncio.StreamWriter] = {}
        self.events: asyncio.Queue = asyncio.Queue()
        self.metrics = JsonlWriter(t.metrics_file)
        self.port: Optional[int] = None
        self._all_connected = asyncio.Event()
        self._handlers: set[asyncio.Task] = set()
        self._closing = False

    # -- connections --------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        wid: Optional[int] = None
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            hello = await read_message(reader, self.limits_hello, HELLO_TIMEOUT)
            assert isinstance(hello, Hello)
            wid = hello.worker_id
            if wid not in self.machine.worker_ids:
                raise _Refused(f"unknown worker id {wid}; configured ids are "
                               f"{self.machine.worker_ids}")
            if wid in self.writers:
                raise _Refused(f"worker {wid} is already connected")
            self.writers[wid] = writer
            log.info("worker %d registered from %s", wid, peer)
            await self._execute(self.machine.connect(wid))
            if set(self.writers) == set(self.machine.worker_ids):
                self._all_connected.set()
            while True:
                msg = await read_message(reader, self.limits, None)
                await self._execute(self.machine.on_message(wid, msg))
        except _Refused as e:
            log.warning("refused connection from %s: %s", peer, e)
            await _try_send(writer, Refuse(str(e)))
            wid = None  # never registered
        except PeerClosed:
            log.info("worker %s (%s) closed the connection", wid, peer)
        except FrameError as e:
            log.warning("worker %s (%s): bad frame, connection closed: %s", wid, peer, e)
        except (asyncio.TimeoutError, TimeoutError):
            log.warning("peer %s sent no complete HELLO within %.0f s; closed", peer,
                        HELLO_TIMEOUT)
        except (ConnectionError, OSError) as e:
            log.info("worker %s (%s): connection lost: %s", wid, peer, e)
        except asyncio.CancelledError:
            pass  # server shutdown; asyncio would otherwise log the cancellation as an error
        finally:
            self._handlers.discard(task)
            writer.close()
            if wid is not None and self.writers.get(wid) is writer:
                del self.writers[wid]
                if not self._closing:
                    await self._execute(self.machine.disconnect(wid))

    async def _send(self, wid: int, buffers: list) -> None:
        writer = self.writers.get(wid)
        if writer is None:
            return
        try:
            await write_message(writer, buffers, WRITE_TIMEOUT)
        except (asyncio.TimeoutError, TimeoutError, ConnectionError, OSError) as e:
            log.warning("worker %d: send failed (%s); dropping it", wid, e or type(e).__name__)
            writer.close()
            if self.writers.get(wid) is writer:
                del self.writers[wid]
                await self._execute(self.machine.disconnect(wid))

    async def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                await self._send(action.worker_id, encode(action.message))
            elif isinstance(action, Broadcast):
                buffers = encode(action.message)
                await asyncio.gather(*(self._send(w, buffers) for w in list(self.writers)))
            else:
                self.events.put_nowait(action)

    # -- the run ------------------------------------------------------------------------------

    async def run(self) -> ServerResult:
        """Listen, wait for workers, run every round, evaluate, stop the workers.

        Raises:
            TrainingFailed: too few workers registered in time, or a round without a quorum.
            OSError: the port cannot be bound.
        """
        s = self.cfg.server
        server = await asyncio.start_server(self._handle, s.listen_host, s.port,
                                            limit=1 << 20)
        self.port = server.sockets[0].getsockname()[1]
        log.info("PS listening on %s:%d; n=%d workers, f=%d, aggregator %s, %d rounds, d=%d",
                 s.listen_host, self.port, self.cfg.n, self.cfg.f, self.cfg.aggregation.method,
                 self.rounds, self.replica.d)
        log.warning("no worker authentication is configured: any process that reaches %s:%d can "
                    "act as a worker", s.listen_host, self.port)
        try:
            return await self._train()
        finally:
            await self._shutdown(server)

    async def _shutdown(self, server: asyncio.Server) -> None:
        """Tell every worker to stop, give them a moment to hang up, then close everything."""
        if not self.machine.finished:
            await self._execute([Broadcast(Stop("server shutting down", ok=False))])
        self._closing = True
        server.close()
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=5.0)
        for w in list(self.writers.values()):
            w.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        self.metrics.close()

    async def _wait_for_workers(self) -> None:
        try:
            await asyncio.wait_for(self._all_connected.wait(), self.cfg.server.connect_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            missing = sorted(set(self.machine.worker_ids) - set(self.writers))
            if len(self.writers) < self.machine.quorum:
                raise TrainingFailed(
                    f"only {len(self.writers)} of {self.cfg.n} workers registered within "
                    f"server.connect_timeout={self.cfg.server.connect_timeout:g} s (quorum "
                    f"{self.machine.quorum}); missing worker ids: {missing}") from None
            log.warning("starting without workers %s (not registered within %g s)", missing,
                        self.cfg.server.connect_timeout)

    async def _train(self) -> ServerResult:
        t = self.cfg.training
        await self._wait_for_workers()
        start = time.perf_counter()
        first_round = self.machine.round
        test_loss, test_acc = float("nan"), float("nan")
        while not self.machine.finished:
            r = self.machine.round
            round_start = time.perf_counter()
            await self._execute(self.machine.begin_round())
            closed = await self._await_close(r, t.round_timeout)
            record = {"round": r, "seconds_round": time.perf_counter() - round_start,
                      "seconds_aggregate": closed.seconds_aggregate,
                      "accepted": list(closed.accepted), "rejected": closed.rejected,
                      "missing": list(closed.missing),
                      "reported_loss": (sum(closed.losses.values()) / len(closed.losses)
                                        if closed.losses else None)}
            if (r + 1) % t.eval_every == 0 or self.machine.finished:
                test_loss, test_acc = self.replica.evaluate(self.test_x, self.test_y)
                record.update(test_loss=test_loss, test_accuracy=test_acc)
                log.info("round %d/%d: test accuracy %.4f, test loss %.4f, %.3f s/round, "
                         "accepted %s%s", r + 1, self.rounds, test_acc, test_loss,
                         (time.perf_counter() - start) / (r + 1 - first_round),
                         list(closed.accepted),
                         f", rejected {closed.rejected}" if closed.rejected else "")
            self.metrics.write(record)
        log.info("training finished; PS replica digest %s", self.replica.digest())
        return ServerResult(self.rounds, test_acc, test_loss, time.perf_counter() - start)

    async def _await_close(self, r: int, timeout: float) -> RoundClosed:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                event = await asyncio.wait_for(self.events.get(), max(remaining, 0.0))
            except (asyncio.TimeoutError, TimeoutError):
                await self._execute(self.machine.on_deadline())
                event = self.events.get_nowait() if not self.events.empty() else None
                if event is None:
                    raise TrainingFailed(f"round {r}: no usable gradients by the deadline "
                                         f"(training.round_timeout={timeout:g} s)") from None
            if isinstance(event, RoundFailed):
                raise TrainingFailed(f"round {event.round}: {event.reason}")
            if isinstance(event, RoundClosed):
                return event
            # Finished needs no handling here: the caller's loop checks machine.finished


class _Refused(Exception):
    pass


async def _try_send(writer: asyncio.StreamWriter, msg) -> None:
    try:
        await write_message(writer, msg, 5.0)
    except (asyncio.TimeoutError, TimeoutError, ConnectionError, OSError):
        pass
