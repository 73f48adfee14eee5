"""The TCP parameter server: connections, authentication, the round loop's timing and deadlines.

I/O only. The round logic is :class:`byzps.core.rounds.ServerRounds` and what happens after a
round closed (evaluation, the metrics record, checkpoints) is
:meth:`byzps.core.ps.PsCore.after_close`, both in the PS core this server is given
(:meth:`byzps.job.Job.ps_core`); this module reads validated messages from sockets, hands them
to the machine, and carries out the actions it returns. Every worker
connection is a :class:`_Peer` with its own outgoing queue and sender task, so a worker that
reads slowly delays nobody else: it is dropped when its queue backs up or a write takes longer
than ``server.write_timeout``. A peer that sends a bad frame, fails authentication, claims an
unknown or already connected id, or sends a forged or replayed message is refused or
disconnected with a logged reason; nothing a peer sends stops the server.

Each connection is a :class:`byzps.net.transport.FrameStream`: a worker's GRADIENT payload is
received straight into its row of the round logic's ``(n, d)`` buffer
(:meth:`byzps.core.rounds.ServerRounds.receive_buffer`), and every frame is sent from the
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

from byzps.config import Config
from byzps.core.ps import PsCore
from byzps.core.rounds import Action, Broadcast, Drop, RoundClosed, RoundFailed, Send
from byzps.logutil import RateLimitedLog
from byzps.net import auth
from byzps.net.admission import (
    Admission,
    Ticket,
    descriptor_budget,
    raise_nofile_limit,
    reset_socket,
)
from byzps.net.transport import (
    FrameStream,
    PeerClosed,
    frame_buffers,
    server_ssl_context,
    set_keepalive,
)
from byzps.net.wire import (
    Auth,
    Challenge,
    FrameError,
    Gradient,
    Hello,
    Limits,
    MsgType,
    Prefix,
    Refuse,
    RoundStart,
    Stop,
    encode,
)

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
    """Runs one training job as the PS over TCP.

    Args:
        cfg: loaded config (``server`` section: address, timeouts, keys, TLS, status port;
            ``training``: round timeout and retries).
        core: the PS core (:meth:`byzps.job.Job.ps_core`): replica, robust pipeline, round
            machine and after-close step; its ``rounds`` is the absolute last round + 1.

    Raises:
        byzps.net.auth.AuthError: the secrets file is unusable or lacks a worker's key.
    """

    def __init__(self, cfg: Config, core: PsCore):
        self.cfg = cfg
        self.core = core
        # True from the moment run() starts its shutdown (STOP to every worker): a caller that
        # cancels run() on a signal re-cancels until this is set (see byzps.cli._until_signal)
        self.stopping = False
        self.rounds = core.rounds
        self.keys = self._load_keys()
        self.replica, self.aggregator, self.machine = core.replica, core.aggregator, core.machine
        d, mac = self.replica.d, self.keys is not None
        self.limits_hello = Limits(d, frozenset({MsgType.HELLO}))
        self.limits_auth = Limits(d, frozenset({MsgType.AUTH}))
        self.limits = Limits(d, frozenset({MsgType.GRADIENT, MsgType.RESYNC}), mac=mac,
                             state_rows=self.replica.state_rows)
        self.peers: dict[int, _Peer] = {}
        self.events: asyncio.Queue = asyncio.Queue()
        self.port: Optional[int] = None
        #: connection caps and descriptor budget (byzps.net.admission); run() sets it up
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
            status = self.status
            core.listeners.append(lambda record: status.update(
                record, live_workers=self.machine.live))

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
        ours = self.replica.signature()
        if hello.model != ours:
            theirs = "no model signature" if hello.model is None else repr(hello.model)
            raise _Refused(f"worker {wid}'s model differs from the PS's: the worker has "
                           f"{theirs}, the PS has {ours!r} (class, parameter count d, "
                           f"layout hash, optimizer, step-settings hash); start the worker "
                           f"with the same task, model, optimizer, schedule and --rounds")
        if wid in self.peers:
            raise _Refused(f"worker {wid} is already connected", retry=True)
        return wid, session

    async def _accept(self, sock: socket.socket, tls_kw: dict) -> None:
        """Accept connections on the listening socket ``sock`` until cancelled, admitting each
        through :attr:`admission` (caps and descriptor budget, see :mod:`byzps.net.admission`);
        a refused connection is reset at once, unread."""
        admission = self.admission
        if admission is None:
            raise RuntimeError("_accept before run() set up the admission control")
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
            ticket, reason = admission.admit(host)
            if ticket is None:
                reset_socket(conn)
                self._stranger(None, reason, f"connection from {host} refused ({reason}: "
                               f"{admission.pending} pending, {admission.open} open)")
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
        if task is not None:
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
            byzps.net.transport.TlsError: ``server.tls`` is set but its files are unusable.
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
            self.stopping = True
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
        endpoint's connection cap (:func:`byzps.net.admission.descriptor_budget`)."""
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

    async def _shutdown(self, server: _Listeners) -> None:
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
        self.core.close()

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

    async def _train(self) -> ServerResult:
        await self._wait_for_workers()
        try:
            return await self._rounds()
        except TrainingFailed as e:
            acc = self.core.evaluate().accuracy
            raise TrainingFailed(f"{e}. Test accuracy of the model after round "
                                 f"{self.machine.round - 1}: {acc:.4f}") from None

    async def _rounds(self) -> ServerResult:
        t = self.cfg.training
        while not self.machine.finished:
            r = self.machine.round
            round_start = time.perf_counter()
            log.debug("round %d begins; live workers %s", r, sorted(self.machine.live))
            # hash the replica off the event loop, which meanwhile sends the last UPDATE
            await asyncio.to_thread(self.machine.digest)
            self._execute(self.core.begin_round())
            closed = await self._await_close(r, t.round_timeout)
            latencies, nbytes, closed_at = self._round_io.pop(r, ({}, {}, None))
            self.core.after_close(closed, round_started=round_start,
                                  latencies=latencies, bytes_received=nbytes, now=closed_at)
        digest = self.replica.digest()
        log.info("training finished; PS replica digest %s", digest)
        last = self.core.last
        return ServerResult(self.rounds, last.accuracy, last.loss, self.core.seconds(), digest)

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
