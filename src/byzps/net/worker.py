"""The TCP worker: connect (with retry), authenticate, move messages between the PS and the
worker core. I/O only: what the worker computes is :class:`byzps.core.worker.WorkerCore`'s.

A worker keeps retrying its connection with exponential backoff until
``server.connect_timeout`` seconds have passed, so it may start before the PS, and it
reconnects the same way when the connection drops before the PS said STOP. Only transport
errors (a closed or broken connection, a bad frame, a failed MAC, a timeout) reconnect; an
error of the worker's own computation (an attack whose precondition fails on this round's data,
a broken attack) stops the worker with that error's message (:class:`WorkerFailed`, exit
status 1 from the command line).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import NoReturn, Optional

from byzps.config import Config
from byzps.core.worker import WorkerCore
from byzps.logutil import RateLimitedLog
from byzps.net import auth
from byzps.net.transport import FrameStream, PeerClosed, client_ssl_context, set_keepalive
from byzps.net.wire import Auth, Challenge, FrameError, Hello, Limits, MsgType, Refuse

log = logging.getLogger(__name__)

#: first wait before reconnecting, and the cap of its doubling (seconds)
RETRY_FIRST, RETRY_CAP = 0.5, 10.0


def retry_delay(failures: int) -> float:
    """Seconds to wait before reconnecting after ``failures`` (>= 1) lost or refused
    connections in a row: :data:`RETRY_FIRST` doubling up to :data:`RETRY_CAP`."""
    return min(RETRY_FIRST * 2 ** min(max(failures - 1, 0), 30), RETRY_CAP)


class WorkerFailed(RuntimeError):
    """The worker cannot go on (refused by the PS, PS unreachable, or a local error in its own
    computation); the message says why."""


class _LocalError(Exception):
    """Wraps an exception raised by the worker core (not by the transport)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class Worker:
    """One worker process's network side.

    Args:
        cfg: loaded config (``server`` section: address, timeouts, keys, TLS).
        core: the worker core (:meth:`byzps.job.Job.worker_core`) that computes the replies.

    Attributes:
        id: the worker id; core: the core; machine: ``core.machine``; replica: ``core.replica``.

    Raises:
        byzps.net.auth.AuthError: the secrets file is unusable or lacks this worker's key.
        byzps.net.transport.TlsError: ``server.tls.ca`` is unusable.
    """

    def __init__(self, cfg: Config, core: WorkerCore):
        self.cfg = cfg
        self.core = core
        self.id = core.id
        self.type = core.type
        self.replica = core.replica
        self.machine = core.machine
        self.key = self._load_key()
        self.ssl_ctx = client_ssl_context(cfg.server.tls.ca) if cfg.server.tls else None
        d, rows = self.replica.d, self.replica.state_rows
        running = frozenset({MsgType.STATE, MsgType.ROUND, MsgType.UPDATE, MsgType.STOP,
                             MsgType.REFUSE})
        self.limits = Limits(d, running, state_rows=rows)
        self.limits_mac = Limits(d, running, mac=True, state_rows=rows)
        # without authentication the first frame may be a ROUND or UPDATE when the PS has
        # already sent this model version's STATE to this worker id (one per version)
        self.limits_first = Limits(d, frozenset({MsgType.CHALLENGE, MsgType.STATE,
                                                 MsgType.REFUSE, MsgType.ROUND, MsgType.UPDATE,
                                                 MsgType.STOP}), state_rows=rows)

    def _on_message(self, msg) -> list:
        """The core's replies to ``msg``; its errors come out as :class:`_LocalError`."""
        try:
            return self.machine.on_message(msg)
        except Exception as e:  # the core's own computation: an attack, the model, the data
            raise _LocalError(e) from e

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
                    f"against server.tls.ca={s.tls.ca if s.tls else None}: {e.verify_message} "
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
        key = self.key
        nonce = auth.new_nonce() if key is not None else None
        await stream.write_message(Hello(self.id, nonce.hex() if nonce else None,
                                         self.replica.signature()), 30.0)
        first = await stream.read_message(self.limits_first, 60.0)
        if isinstance(first, Refuse):
            self._refused(first)
        if key is None or nonce is None:
            if isinstance(first, Challenge):
                raise WorkerFailed(f"worker {self.id}: the PS requires authentication and this "
                                   f"worker has no key: set server.secrets_file or "
                                   f"${auth.ENV_SECRETS} to a file from `byzps keygen`")
            self._on_message(first)
            return None
        if not isinstance(first, Challenge):
            raise WorkerFailed(f"worker {self.id}: the PS at {self.cfg.server.host}:"
                               f"{self.cfg.server.port} does not authenticate but this worker "
                               f"has a key; refusing to talk to it (wrong server or a downgrade)")
        server_nonce = bytes.fromhex(first.nonce)
        tag = auth.auth_tag(key, self.id, nonce, server_nonce)
        await stream.write_message(Auth(tag.hex()), 30.0)
        return auth.MacSession(key, self.id, nonce, server_nonce, is_server=False)

    def _refused(self, msg: Refuse) -> NoReturn:
        """Raise for a REFUSE: ConnectionError (reconnect later) when the PS says the cause
        may pass, else WorkerFailed."""
        if msg.retry:
            raise ConnectionError(f"refused for now: {msg.reason}")
        raise WorkerFailed(f"worker {self.id}: the PS refused us: {msg.reason}")

    async def run(self) -> int:
        """Work until the PS says STOP, reconnecting (with backoff, for up to
        ``server.connect_timeout`` seconds each time) when the connection drops.

        A connection lost or refused for now (REFUSE with retry: e.g. the PS still holds this
        id's previous connection) before the PS took this worker again counts as a failure in
        a row: the wait before the next try doubles from :data:`RETRY_FIRST` to
        :data:`RETRY_CAP` seconds, the warning is rate-limited (3 lines a minute, then a count),
        and after ``server.connect_timeout`` seconds of failures in a row the worker gives up.

        Returns:
            number of rounds whose update this worker applied.

        Raises:
            WorkerFailed: refused, PS unreachable, still refused or dropped after
                ``server.connect_timeout`` s of retries, authentication failure, the PS aborted, or
                an error in this worker's own computation (the message is that error's,
                prefixed with the worker id and its type).
        """
        timeout = self.cfg.server.connect_timeout
        failures, failing_since = 0, 0.0    # lost or refused connections in a row, since when
        lost_log = RateLimitedLog(log, interval=60.0, burst=3)
        while True:
            stream = await self._connect(time.monotonic() + timeout)
            set_keepalive(stream.get_extra_info("socket"))
            # a new connection starts from a STATE (now, or after the next close when this
            # worker id already got this model version's); ROUND and UPDATE before it are
            # ignored, even if the replica of the lost connection happens to be current
            self.machine.synced = False
            try:
                session = await self._handshake(stream)
                failures = 0                # the PS took us: a later loss starts afresh
                limits = self.limits if session is None else self.limits_mac
                log.info("worker %d (%s) connected to the PS%s", self.id, self.type,
                         " (authentication sent)" if session else "")
                while self.machine.stopped is None:
                    msg = await stream.read_message(limits, None, session)
                    if isinstance(msg, Refuse):
                        self._refused(msg)
                    for reply in self._on_message(msg):
                        await stream.write_message(reply, 60.0, session)
            except _LocalError as e:
                err = e.error
                raise WorkerFailed(f"worker {self.id} ({self.type}): {type(err).__name__}: "
                                   f"{err}") from err
            except (PeerClosed, ConnectionError, OSError, FrameError, auth.AuthError,
                    asyncio.TimeoutError, TimeoutError) as e:
                now = time.monotonic()
                failures += 1
                if failures == 1:
                    failing_since = now
                elif now - failing_since > timeout:
                    raise WorkerFailed(
                        f"worker {self.id}: could not rejoin the PS within "
                        f"server.connect_timeout={timeout:g} s ({failures} tries; last: "
                        f"{e or type(e).__name__})") from None
                delay = retry_delay(failures)
                lost_log.log(logging.WARNING, "lost", "worker %d: connection to the PS lost "
                             "(%s); reconnecting in %.1f s", self.id, e or type(e).__name__,
                             delay)
                await asyncio.sleep(delay)
                continue
            finally:
                stream.close()
            stop = self.machine.stopped
            if not stop.ok:
                raise WorkerFailed(f"worker {self.id}: the PS aborted: {stop.reason}")
            log.info("worker %d: %s (%d rounds applied, replica digest %s)", self.id,
                     stop.reason, self.machine.rounds_done, self.replica.digest())
            return self.machine.rounds_done
