"""The parameter server: connections, authentication, the round loop, deadlines, checkpoints.

The round logic itself is :class:`byzps.protocol.ServerRounds`; this module reads validated
messages from sockets, hands them to it, and carries out the actions it returns. Every worker
connection is a :class:`_Peer` with its own outgoing queue and sender task, so a worker that
reads slowly delays nobody else: it is dropped when its queue backs up or a write takes longer
than ``server.write_timeout``. A peer that sends a bad frame, fails authentication, claims an
unknown or already connected id, or sends a forged or replayed message is refused or
disconnected with a logged reason; nothing a peer sends stops the server.

Each connection is a :class:`byzps.transport.FrameStream`: a worker's GRADIENT payload is
received straight into its row of the round logic's ``(n, d)`` buffer
(:meth:`byzps.protocol.ServerRounds.receive_buffer`), and every frame is sent from the
tensor's own memory, encoded once for all workers. Per round and worker the PS records the
latency (ROUND written to that worker -> its GRADIENT fully arrived) and the frame bytes
received, in ``metrics.jsonl``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from byzps import auth, checkpoint
from byzps.admission import Admission, Ticket, descriptor_budget, \
    raise_nofile_limit, reset_socket
from byzps.config import Config
from byzps.data import load_mnist, to_tensors
from byzps.logutil import RateLimitedLog
from byzps.metrics import JsonlWriter, round_record
from byzps.protocol import Action, Broadcast, Drop, RoundClosed, RoundFailed, Send, \
    ServerRounds
from byzps.robust import build_robust, default_quorum
from byzps.training import Replica
from byzps.transport import FrameStream, PeerClosed, frame_buffers, server_ssl_context, \
    set_keepalive
from byzps.wire import Auth, Challenge, FrameError, Gradient, Hello, Limits, MsgType, Prefix, \
    Refuse, RoundStart, Stop, encode

log = logging.getLogger(__name__)

MAX_PENDING = 8        # frames queued for one worker before it counts as too slow
SHUTDOWN_TIMEOUT = 20.0  # seconds the PS gives its shutdown (STOP to all, hang-ups) at most


class TrainingFailed(RuntimeError):
    """Training could not go on (no quorum, too few workers registered); message says why."""


class ListenError(OSError):
    """The PS cannot listen on ``server.bind_host:server.port``; ``errno`` is the OS's
    (``errno.EADDRINUSE`` when the port is in use) and the message names the fields."""


@dataclass(frozen=True)
class ServerResult:
    """What a finished run reports.

    Attributes:
        rounds: index of the last round completed + 1 (absolute, also after a resume).
        test_accuracy: final accuracy on the evaluation set, in [0, 1].
        test_loss: final mean cross-entropy.
        seconds: wall seconds from the first round of this process to the end.
        digest: the PS replica's final digest.
    """

    rounds: int
    test_accuracy: float
    test_loss: float
    seconds: float
    digest: str


@dataclass(frozen=True)
class PsCore:
    """The PS's I/O-free parts, shared by the TCP server and the in-process simulator.

    Attributes:
        replica: the PS's model replica.
        aggregator: the robust pipeline (pre-aggregators, then the rule).
        machine: the round state machine.
        test_x, test_y: ``(m, 1, 28, 28)`` float32 / ``(m,)`` int64 evaluation set.
    """

    replica: Replica
    aggregator: object
    machine: ServerRounds
    test_x: torch.Tensor
    test_y: torch.Tensor


def build_ps_core(cfg: Config, data_root: str, rounds: int,
                  checkpoint_dir: Optional[str] = None, close_at: Optional[str] = None
                  ) -> PsCore:
    """Build the PS's replica, robust pipeline, round machine and test set.

    Args:
        cfg: validated config.
        data_root: MNIST folder.
        rounds: total rounds R (absolute).
        checkpoint_dir: resume from this folder's latest checkpoint (None: start at round 0).
        close_at: overrides ``training.close_at`` (the simulator, which has no arrival
            times, passes ``"all"``).

    Raises:
        byzps.data.DatasetNotFound: no MNIST copy found.
        byzps.checkpoint.CheckpointError: no usable checkpoint, or one of another config.
    """
    t = cfg.training
    mnist = load_mnist(data_root, parts=("t10k",))
    limit = t.test_limit or len(mnist.test_labels)
    test_x, test_y = to_tensors(mnist.test_images[:limit], mnist.test_labels[:limit])
    replica = Replica(t.model, t.seed, t.learning_rate, t.momentum)
    aggregator = build_robust(cfg)
    warning = aggregator.warning(cfg.n)
    if warning:
        log.warning("%s", warning)
    start_round = 0
    if checkpoint_dir is not None:
        ckpt = checkpoint.load(checkpoint_dir, cfg, replica.d)
        replica.load_state(ckpt.state)
        try:
            aggregator.load_state_dict(ckpt.aggregator_state)
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
            raise checkpoint.CheckpointError(
                f"{checkpoint_dir}/{checkpoint.FILENAME}: field aggregator_state: "
                f"{str(e)[:300]}") from None
        torch.random.set_rng_state(ckpt.rng_state)
        start_round = ckpt.round
        log.info("resumed from %s/%s at round %d", checkpoint_dir, checkpoint.FILENAME,
                 start_round)
    machine = ServerRounds([w.id for w in cfg.workers], replica, aggregator, rounds,
                           default_quorum(cfg, aggregator), start_round=start_round,
                           max_missed=t.max_missed_rounds,
                           close_at=t.close_at if close_at is None else close_at)
    return PsCore(replica, aggregator, machine, test_x, test_y)


@dataclass(eq=False)
class _Peer:
    worker_id: int
    stream: FrameStream
    session: Optional[auth.MacSession]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    sender: Optional[asyncio.Task] = None
    #: (round, time.perf_counter()) of the latest ROUND frame written to this worker
    round_sent: Optional[tuple[int, float]] = None


class _Refused(Exception):
    def __init__(self, reason: str, retry: bool = False):
        super().__init__(reason)
        self.retry = retry


class ParameterServer:
    """Runs one training job as the PS.

    Args:
        cfg: validated config.
        data_root: MNIST folder (see :func:`byzps.data.locate_mnist`).
        rounds: total rounds R (defaults to ``cfg.training.rounds``); absolute, so a resumed
            run stops at the same round as an uninterrupted one.
        resume: continue from ``training.checkpoint_dir``'s latest checkpoint.

    Raises:
        byzps.data.DatasetNotFound: no MNIST copy found.
        byzps.auth.AuthError: the secrets file is unusable or lacks a worker's key.
        byzps.checkpoint.CheckpointError: ``resume`` without a usable, matching checkpoint.
    """

    def __init__(self, cfg: Config, data_root: str, rounds: Optional[int] = None,
                 resume: bool = False):
        self.cfg = cfg
        t = cfg.training
        self.rounds = rounds if rounds is not None else t.rounds
        self.keys = self._load_keys()
        core = build_ps_core(cfg, data_root, self.rounds,
                             t.checkpoint_dir if resume else None)
        self.replica, self.aggregator, self.machine = core.replica, core.aggregator, core.machine
        self.test_x, self.test_y = core.test_x, core.test_y
        d, mac = self.replica.d, self.keys is not None
        self.limits_hello = Limits(d, frozenset({MsgType.HELLO}))
        self.limits_auth = Limits(d, frozenset({MsgType.AUTH}))
        self.limits = Limits(d, frozenset({MsgType.GRADIENT, MsgType.RESYNC}), mac=mac)
        self.peers: dict[int, _Peer] = {}
        self.events: asyncio.Queue = asyncio.Queue()
        self.metrics = JsonlWriter(t.metrics_file)
        self.port: Optional[int] = None
        #: connection caps and descriptor budget (byzps.admission); run() sets it up
        self.admission: Optional[Admission] = None
        #: rate-limited log of refused connections and of strangers' failed handshakes
        self.refusals = RateLimitedLog(log, interval=10.0, burst=5)
        self._all_connected = asyncio.Event()
        self._handlers: set[asyncio.Task] = set()
        self._closing = False
        #: the open round's per-worker latency (s) and bytes received; per closed round,
        #: (latencies, bytes, Unix time of the close) until its metrics record is written
        self._latency: dict[int, float] = {}
        self._bytes: dict[int, int] = {}
        self._round_io: dict[int, tuple[dict[int, float], dict[int, int], float]] = {}
        #: optional HTTP status endpoint (server.metrics_port; see byzps.status); run() starts it
        self.status = None
        if cfg.server.metrics_port is not None:
            from byzps.status import StatusEndpoint
            self.status = StatusEndpoint(cfg.server.metrics_host, cfg.server.metrics_port,
                                         worker_ids=self.machine.worker_ids,
                                         rounds=self.rounds, start_round=self.machine.round,
                                         max_connections=cfg.server.metrics_max_connections)

    def _load_keys(self) -> Optional[dict[int, bytes]]:
        path = auth.secrets_path(self.cfg.server.secrets_file)
        if path is None:
            return None
        keys = auth.load_keys(path)
        missing = sorted(w.id for w in self.cfg.workers if w.id not in keys)
        if missing:
            raise auth.AuthError(f"secrets file {path} has no key for worker(s) {missing}; "
                                 f"regenerate it with `byzps keygen`")
        return keys

    # -- connections --------------------------------------------------------------------------

    async def _handshake(self, stream: FrameStream) -> tuple[int, Optional[auth.MacSession]]:
        timeout = self.cfg.server.hello_timeout
        hello = await stream.read_message(self.limits_hello, timeout)
        assert isinstance(hello, Hello)
        wid = hello.worker_id
        if wid not in self.machine.worker_ids:
            raise _Refused(f"unknown worker id {wid}; configured ids are "
                           f"{self.machine.worker_ids}")
        session = None
        if self.keys is not None:
            if hello.nonce is None:
                raise _Refused(f"worker {wid}: this PS requires authentication; give the worker "
                               f"its key (server.secrets_file or $BYZPS_SECRETS)")
            server_nonce = auth.new_nonce()
            await stream.write_message(Challenge(server_nonce.hex()), timeout)
            answer = await stream.read_message(self.limits_auth, timeout)
            assert isinstance(answer, Auth)
            client_nonce = bytes.fromhex(hello.nonce)
            try:
                auth.check_tag(self.keys[wid], wid, client_nonce, server_nonce,
                               bytes.fromhex(answer.tag))
            except auth.AuthError as e:
                raise _Refused(str(e)) from None
            session = auth.MacSession(self.keys[wid], wid, client_nonce, server_nonce,
                                      is_server=True)
        if wid in self.peers:
            raise _Refused(f"worker {wid} is already connected", retry=True)
        return wid, session

    async def _accept(self, sock: socket.socket, tls_kw: dict) -> None:
        """Accept connections on the listening socket ``sock`` until cancelled, admitting each
        through :attr:`admission` (caps and descriptor budget, see :mod:`byzps.admission`);
        a refused connection is reset at once, unread."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except OSError as e:   # EMFILE/ENFILE/ENOBUFS: back off instead of spinning
                self._stranger(None, "accept error", f"accept() failed: {e.strerror or e}; "
                               f"pausing 0.1 s")
                await asyncio.sleep(0.1)
                continue
            host = str(addr[0]) if isinstance(addr, tuple) else str(addr)
            ticket, reason = self.admission.admit(host)
            if ticket is None:
                reset_socket(conn)
                self._stranger(None, reason, f"connection from {host} refused ({reason}: "
                               f"{self.admission.pending} pending, {self.admission.open} open)")
                continue
            task = loop.create_task(self._serve(conn, addr, ticket, tls_kw))
            self._handlers.add(task)

    async def _serve(self, conn: socket.socket, addr, ticket: Ticket, tls_kw: dict) -> None:
        """One admitted connection: TLS handshake (if configured), then :meth:`_handle`."""
        try:
            stream = FrameStream()
            try:
                await asyncio.get_running_loop().connect_accepted_socket(
                    lambda: stream, conn, **tls_kw)
            except (OSError, asyncio.TimeoutError, TimeoutError) as e:
                conn.close()
                self._stranger(None, "TLS handshake", f"peer {addr}: TLS handshake failed or "
                               f"timed out: {e}")
                return
            await self._handle(stream, ticket)
        except asyncio.CancelledError:
            pass
        finally:
            ticket.release()
            self._handlers.discard(asyncio.current_task())

    def _gradient_sink(self, wid: int):
        """Where a frame's tensor payload from worker ``wid`` goes: a GRADIENT for the open
        round into the worker's row of the round buffer, anything else into a fresh tensor."""
        def sink(prefix: Prefix, header: dict) -> Optional[torch.Tensor]:
            if prefix.mtype is MsgType.GRADIENT:
                return self.machine.receive_buffer(wid, header["round"])
            return None
        return sink

    def _account(self, peer: _Peer, msg, nbytes: int, arrived: float) -> None:
        """Per-round I/O figures of the open round: frame bytes from each worker, and the
        latency of its first GRADIENT for the round (from its ROUND frame being written)."""
        cur = self.machine.current
        if cur is None:
            return
        wid = peer.worker_id
        self._bytes[wid] = self._bytes.get(wid, 0) + nbytes
        if isinstance(msg, Gradient) and msg.round == cur.round and wid not in self._latency \
                and peer.round_sent is not None and peer.round_sent[0] == cur.round:
            self._latency[wid] = arrived - peer.round_sent[1]

    async def _handle(self, stream: FrameStream, ticket: Optional[Ticket] = None) -> None:
        addr = stream.get_extra_info("peername")
        set_keepalive(stream.get_extra_info("socket"))
        task = asyncio.current_task()
        self._handlers.add(task)
        peer: Optional[_Peer] = None
        who = f"peer {addr}"
        try:
            # one deadline for the whole handshake, however the peer spreads its frames
            wid, session = await asyncio.wait_for(self._handshake(stream),
                                                  self.cfg.server.hello_timeout)
            who = f"worker {wid} ({addr})"
            peer = _Peer(wid, stream, session)
            peer.sender = asyncio.create_task(self._sender(peer))
            self.peers[wid] = peer
            if ticket is not None:
                ticket.promote()
            log.info("%s registered%s", who, " (authenticated)" if session else "")
            self._execute(self.machine.connect(wid))
            if set(self.peers) == set(self.machine.worker_ids):
                self._all_connected.set()
            sink = self._gradient_sink(wid)
            while True:
                msg = await stream.read_message(self.limits, None, session, sink)
                self._account(peer, msg, stream.frame_bytes, stream.frame_arrived)
                self._execute(self.machine.on_message(wid, msg))
        except _Refused as e:
            self._stranger(peer, "refused in handshake", f"refused {who}: {e}")
            await _try_send(stream, Refuse(str(e), e.retry))
        except PeerClosed:
            log.info("%s closed the connection", who)
        except (FrameError, auth.AuthError) as e:
            self._stranger(peer, "bad frame", f"{who}: bad frame, connection closed: {e}")
        except (asyncio.TimeoutError, TimeoutError):
            self._stranger(peer, "handshake timeout",
                           f"{who} did not complete its HELLO/authentication within "
                           f"server.hello_timeout={self.cfg.server.hello_timeout:g} s; closed")
        except (ConnectionError, OSError) as e:
            log.info("%s: connection lost: %s", who, e)
        except asyncio.CancelledError:
            pass  # server shutdown; asyncio would otherwise log the cancellation as an error
        finally:
            self._handlers.discard(task)
            stream.close()
            if peer is not None:
                self._forget(peer)

    def _stranger(self, peer: Optional[_Peer], reason: str, message: str) -> None:
        """Log a problem of a connection: rate-limited while it has not registered as a
        worker (strangers can make many), in full for a registered worker."""
        if peer is None:
            self.refusals.log(logging.WARNING, reason, "%s", message)
        else:
            log.warning("%s", message)

    def _forget(self, peer: _Peer) -> None:
        """Remove a peer (once) and tell the round logic it is gone."""
        if self.peers.get(peer.worker_id) is not peer:
            return
        del self.peers[peer.worker_id]
        peer.stream.abort()   # close() would wait for a slow reader to take its data
        if peer.sender is not None and peer.sender is not asyncio.current_task():
            peer.sender.cancel()
        if not self._closing:
            self._execute(self.machine.disconnect(peer.worker_id))

    async def _sender(self, peer: _Peer) -> None:
        timeout = self.cfg.server.write_timeout
        try:
            while True:
                buffers, round_start = await peer.queue.get()
                if round_start is not None:
                    peer.round_sent = (round_start, time.perf_counter())
                await peer.stream.write_message(buffers, timeout)
        except (asyncio.TimeoutError, TimeoutError):
            log.warning("worker %d took no frame within server.write_timeout=%g s; dropped",
                        peer.worker_id, timeout)
        except (ConnectionError, OSError) as e:
            log.info("worker %d: send failed (%s); dropped", peer.worker_id, e)
        except asyncio.CancelledError:
            return
        self._forget(peer)

    def _enqueue(self, wid: int, buffers: list, round_start: Optional[int] = None) -> None:
        peer = self.peers.get(wid)
        if peer is None:
            return
        if peer.queue.qsize() >= MAX_PENDING:
            log.warning("worker %d has %d frames unread; dropped as too slow", wid,
                        peer.queue.qsize())
            self._forget(peer)
            return
        peer.queue.put_nowait((frame_buffers(buffers, peer.session), round_start))

    def _execute(self, actions: list[Action]) -> None:
        """Carry out the round logic's actions. Never blocks: sends are queued per peer."""
        mac = self.keys is not None
        for action in actions:
            if isinstance(action, (Send, Broadcast)):
                msg = action.message
                round_start = msg.round if isinstance(msg, RoundStart) else None
                buffers = encode(msg, mac=mac)   # a broadcast is encoded once for everyone
                for wid in ([action.worker_id] if isinstance(action, Send) else list(self.peers)):
                    self._enqueue(wid, buffers, round_start)
            elif isinstance(action, Drop):
                peer = self.peers.get(action.worker_id)
                if peer is not None:
                    log.warning("worker %d dropped: %s", action.worker_id, action.reason)
                    self._forget(peer)
            else:
                if isinstance(action, RoundClosed):   # the record's time is the close's
                    self._round_io[action.round] = (self._latency, self._bytes, time.time())
                    self._latency, self._bytes = {}, {}
                self.events.put_nowait(action)

    # -- the run ------------------------------------------------------------------------------

    async def run(self) -> ServerResult:
        """Listen, wait for workers, run every round, evaluate, stop the workers.

        Raises:
            TrainingFailed: too few workers registered in time, or a round without a quorum
                after ``training.round_retries`` retries.
            ListenError: the port cannot be bound.
            byzps.transport.TlsError: ``server.tls`` is set but its files are unusable.
        """
        s = self.cfg.server
        ssl_ctx = server_ssl_context(s.tls.cert, s.tls.key) if s.tls else None
        tls_kw = {"ssl": ssl_ctx, "ssl_handshake_timeout": s.hello_timeout} if ssl_ctx else {}
        raise_nofile_limit()
        server = _Listeners(_listen(s.listen_host, s.port))
        self.port = server.sockets[0].getsockname()[1]
        log.info("PS listening on %s:%d%s; n=%d workers, f=%d, aggregator %s, rounds %d..%d, "
                 "d=%d, quorum %d", s.listen_host, self.port, " (TLS)" if ssl_ctx else "", self.cfg.n, self.cfg.f,
                 self.cfg.aggregation.method, self.machine.round, self.rounds - 1,
                 self.replica.d, self.machine.quorum)
        if self.keys is None:
            log.warning("NO AUTHENTICATION: server.secrets_file is not set, so any process that "
                        "reaches %s:%d can act as a worker. Use `byzps keygen` for real "
                        "deployments.", s.listen_host, self.port)
        try:
            if self.status is not None:
                self.status.start()   # StatusEndpointError names server.metrics_port
            self.admission = self._admission()
            server.tasks = [asyncio.get_running_loop().create_task(self._accept(sock, tls_kw))
                            for sock in server.sockets]
            return await self._train()
        finally:
            try:
                await asyncio.wait_for(self._shutdown(server), SHUTDOWN_TIMEOUT)
            except (asyncio.TimeoutError, TimeoutError):
                log.error("shutdown did not finish within %.0f s; exiting anyway",
                          SHUTDOWN_TIMEOUT)
            if self.status is not None:
                self.status.stop()

    def _admission(self) -> Admission:
        """Connection caps from the config and the descriptor budget: the open-file soft
        limit minus the descriptors open now, ``server.fd_reserve`` and the status
        endpoint's connection cap (:func:`byzps.admission.descriptor_budget`)."""
        s = self.cfg.server
        reserve = s.fd_reserve + (s.metrics_max_connections if self.status is not None else 0)
        budget = descriptor_budget(reserve)
        if budget is None:
            budget = 1 << 30
        elif budget < self.cfg.n + 1:
            log.warning("the open-file limit leaves room for only %d connections (n = %d "
                        "workers, server.fd_reserve=%d); raise it (ulimit -n)", max(budget, 0),
                        self.cfg.n, s.fd_reserve)
        budget = max(budget, 1)
        log.info("connections: at most %d pending (%d per address), %d open in all",
                 s.max_pending_connections, s.max_pending_per_address, budget)
        return Admission(s.max_pending_connections, s.max_pending_per_address, budget)

    async def _shutdown(self, server: "_Listeners") -> None:
        """Tell every worker to stop, give them a moment to hang up, then close everything."""
        if not self.machine.finished:
            self._execute([Broadcast(Stop("server shutting down", ok=False))])
        server.close()
        pending = [p.sender for p in self.peers.values() if p.sender is not None]
        deadline = time.monotonic() + 5.0
        while any(not p.queue.empty() for p in self.peers.values()) and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=max(0.1, deadline - time.monotonic()))
        self._closing = True
        for p in list(self.peers.values()):
            p.stream.close()
        for task in list(self._handlers) + pending:
            task.cancel()
        await asyncio.gather(*self._handlers, *pending, return_exceptions=True)
        self.refusals.flush()
        self.metrics.close()

    async def _wait_for_workers(self) -> None:
        s = self.cfg.server
        needed = s.min_workers or self.machine.quorum
        try:
            await asyncio.wait_for(self._all_connected.wait(), s.connect_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            missing = sorted(set(self.machine.worker_ids) - set(self.peers))
            if len(self.peers) < needed:
                raise TrainingFailed(
                    f"only {len(self.peers)} of {self.cfg.n} workers registered within "
                    f"server.connect_timeout={s.connect_timeout:g} s (need {needed}); missing "
                    f"worker ids: {missing}") from None
            log.warning("starting without workers %s (not registered within %g s)", missing,
                        s.connect_timeout)

    def _checkpoint(self) -> bool:
        """Write the checkpoint of the current round; a failure (disk full, no descriptor
        left, folder not writable) is logged and training goes on: the next checkpoint
        tries again. Returns whether it was written."""
        t = self.cfg.training
        try:
            path = checkpoint.save(t.checkpoint_dir, checkpoint.Checkpoint(
                self.machine.round, self.replica.state(), self.aggregator.state_dict(),
                torch.random.get_rng_state(), checkpoint.fingerprint(self.cfg)))
        except (OSError, RuntimeError) as e:   # torch's file writer raises RuntimeError
            log.error("checkpoint of round %d could not be written to %s: %s; training goes "
                      "on and the next checkpoint (every %d rounds) tries again",
                      self.machine.round, t.checkpoint_dir, str(e).splitlines()[0][:300],
                      t.checkpoint_every)
            return False
        log.info("checkpoint of round %d written to %s", self.machine.round, path)
        return True

    async def _train(self) -> ServerResult:
        await self._wait_for_workers()
        try:
            return await self._rounds()
        except TrainingFailed as e:
            _, acc = self.replica.evaluate(self.test_x, self.test_y)
            raise TrainingFailed(f"{e}. Test accuracy of the model after round "
                                 f"{self.machine.round - 1}: {acc:.4f}") from None

    async def _rounds(self) -> ServerResult:
        t = self.cfg.training
        start = time.perf_counter()
        first_round = self.machine.round
        test_loss, test_acc = float("nan"), float("nan")
        while not self.machine.finished:
            r = self.machine.round
            round_start = time.perf_counter()
            log.debug("round %d begins; live workers %s", r, sorted(self.machine.live))
            # hash the replica off the event loop, which meanwhile sends the last UPDATE
            await asyncio.to_thread(self.machine.digest)
            self._execute(self.machine.begin_round())
            closed = await self._await_close(r, t.round_timeout)
            evaluate = (r + 1) % t.eval_every == 0 or self.machine.finished
            if evaluate:
                test_loss, test_acc = self.replica.evaluate(self.test_x, self.test_y)
            latencies, nbytes, closed_at = self._round_io.pop(r, ({}, {}, None))
            record = round_record(closed, worker_ids=self.machine.worker_ids,
                                  latencies=latencies, bytes_received=nbytes, now=closed_at,
                                  seconds_round=time.perf_counter() - round_start,
                                  test_loss=test_loss if evaluate else None,
                                  test_accuracy=test_acc if evaluate else None)
            if evaluate:
                log.info("round %d/%d: test accuracy %.4f, test loss %.4f, %.3f s/round, "
                         "accepted %s%s", r + 1, self.rounds, test_acc, test_loss,
                         (time.perf_counter() - start) / (r + 1 - first_round),
                         list(closed.accepted),
                         f", rejected {closed.rejected}" if closed.rejected else "")
            self.metrics.write(record)
            if self.status is not None:
                self.status.update(record, live_workers=self.machine.live)
            if t.checkpoint_every and (r + 1) % t.checkpoint_every == 0:
                self._checkpoint()
        digest = self.replica.digest()
        log.info("training finished; PS replica digest %s", digest)
        return ServerResult(self.rounds, test_acc, test_loss, time.perf_counter() - start,
                            digest)

    async def _await_close(self, r: int, timeout: float) -> RoundClosed:
        retries = 0
        deadline = time.monotonic() + timeout
        while True:
            event = None
            remaining = deadline - time.monotonic()
            if remaining > 0:
                try:
                    event = await asyncio.wait_for(self.events.get(), remaining)
                except (asyncio.TimeoutError, TimeoutError):
                    pass
            if event is None:
                log.debug("round %d: deadline passed", r)
                self._execute(self.machine.on_deadline())  # always closes or fails the round
                event = self.events.get_nowait()
            if isinstance(event, RoundClosed):
                return event
            if isinstance(event, RoundFailed):
                retries += 1
                if not event.missing:
                    raise TrainingFailed(f"round {event.round}: {event.reason}; every worker "
                                         f"answered, so asking again cannot help")
                if retries > self.cfg.training.round_retries:
                    raise TrainingFailed(
                        f"round {event.round}: {event.reason}; gave up after "
                        f"training.round_retries={self.cfg.training.round_retries} retries")
                log.warning("round %d: %s; retry %d of %d", event.round, event.reason, retries,
                            self.cfg.training.round_retries)
                self._execute(self.machine.retry_round())
                deadline = time.monotonic() + timeout
            # Finished needs no handling here: the caller's loop checks machine.finished


class _Listeners:
    """The PS's listening sockets and their accept tasks; ``close()`` stops both."""

    def __init__(self, sockets: list[socket.socket]):
        self.sockets = sockets
        self.tasks: list[asyncio.Task] = []

    def close(self) -> None:
        """Cancel the accept tasks and close the listening sockets (idempotent)."""
        for task in self.tasks:
            task.cancel()
        for sock in self.sockets:
            sock.close()


def _listen(host: str, port: int) -> list[socket.socket]:
    """Non-blocking listening sockets on every address ``host`` resolves to (like
    ``loop.create_server``: SO_REUSEADDR, IPv6 sockets v6-only).

    Raises:
        ListenError: ``host`` does not resolve or an address cannot be bound; the message
            names server.bind_host and server.port.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as e:
        raise ListenError(e.errno or errno.EINVAL, f"server.bind_host={host!r} does not "
                          f"resolve: {e.strerror or e}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(512)
            sock.setblocking(False)
    except OSError as e:
        for sock in sockets:
            sock.close()
        hint = "the port is in use; change server.port" if e.errno == errno.EADDRINUSE \
            else "check server.bind_host and server.port"
        raise ListenError(e.errno or errno.EINVAL, f"cannot listen on {host}:{port}: "
                          f"{e.strerror or e} ({hint})") from None
    return sockets


async def _try_send(stream: FrameStream, msg) -> None:
    try:
        await stream.write_message(msg, 5.0)
    except (asyncio.TimeoutError, TimeoutError, ConnectionError, OSError):
        pass
