"""The PS's optional status endpoint: Prometheus metrics and a JSON status page over HTTP.

Enabled by ``server.metrics_port`` (bound on ``server.metrics_host``, default 127.0.0.1)::

    GET /metrics   Prometheus text format (prometheus-client), this server's registry only
    GET /status    JSON: round, rounds, live workers, each worker's last status, last accuracy,
                   uptime
    GET /          a two-line index naming both

Usage (the PS does this; see :class:`byzps.net.server.ParameterServer`)::

    ep = StatusEndpoint("127.0.0.1", 9100, worker_ids=[0, 1, 2, 3], rounds=300)
    ep.start()                                     # background daemon thread; returns the port
    ep.update(record, live_workers=[0, 1, 2])      # once per round, record = round_record(...)
    ep.stop()

Metrics (all prefixed ``byzps_``; times in seconds, accuracy in [0, 1]):

=========================================  =========  ============================================
``byzps_round``                            gauge      rounds completed (absolute: index of the
                                                      last closed round + 1, also after a resume)
``byzps_rounds_planned``                   gauge      total rounds R of the run
``byzps_rounds_total``                     counter    rounds closed by this PS process
``byzps_round_seconds``                    histogram  wall seconds per round
``byzps_aggregate_seconds``                histogram  seconds spent in the robust aggregator
``byzps_live_workers``                     gauge      workers the round logic counts as live
``byzps_workers``                          gauge      configured workers n
``byzps_accepted_total{worker}``           counter    gradients accepted per worker
``byzps_rejected_gradients_total{worker,   counter    gradients rejected per worker and reason
reason}``
``byzps_missing_total{worker}``            counter    rounds a worker did not answer in time
``byzps_states_refused_total{worker}``     counter    STATE requests refused (one STATE per
                                                      worker and model version)
``byzps_reported_loss``                    gauge      median training loss the accepted workers
                                                      reported in the last round (NaN if none)
``byzps_test_accuracy``                    gauge      last evaluated test accuracy (NaN before)
``byzps_test_loss``                        gauge      last evaluated test loss (NaN before)
``byzps_start_time_seconds``               gauge      Unix time the endpoint was created
=========================================  =========  ============================================

Label values are bounded whatever the workers send: ``worker`` is always one of the configured
worker ids (anything else in a record is ignored), ``reason`` one of
:data:`byzps.core.rounds.REJECTION_REASONS` (anything else is counted as ``other``); so are the
keys of ``/status``.

Each endpoint has its own :class:`prometheus_client.CollectorRegistry` (never the process-wide
default), so several can live in one process (tests). The HTTP server
(:class:`byzps.bounded_http.BoundedHttpServer`) runs in one daemon thread and only reads a
snapshot taken under a lock, so it never blocks the PS's event loop. Its cost is bounded
whatever clients do: one thread for all connections, at most ``max_connections`` of them
(``server.metrics_max_connections``, default 16; more are reset), at most
:data:`MAX_REQUEST_BYTES` of request head each (more: 431), and :data:`CONNECTION_TIMEOUT`
seconds per connection from accept to the end of the answer.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

from byzps.bounded_http import BoundedHttpServer
from byzps.core.rounds import REJECTION_REASONS
from byzps.metrics import strict_json

log = logging.getLogger(__name__)

#: histogram buckets (seconds) of byzps_round_seconds and byzps_aggregate_seconds
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0)
#: the ``reason`` label of a rejection that is not one of the fixed reasons
OTHER_REASON = "other"


class StatusEndpointError(RuntimeError):
    """The status endpoint cannot run: its address cannot be bound (port in use, bad
    address) or prometheus-client is missing; the message names ``server.metrics_port``."""


#: largest request line + headers the endpoint reads, bytes (more: 431)
MAX_REQUEST_BYTES = 8192
#: seconds a client connection may live, from accept to the last byte of the answer
CONNECTION_TIMEOUT = 5.0


class StatusEndpoint:
    """Prometheus metrics and a JSON status page of one PS, served from a background thread.

    Args:
        host: address to bind (``server.metrics_host``).
        port: TCP port (``server.metrics_port``); 0 picks a free one (tests).
        worker_ids: every configured worker id.
        rounds: total rounds R of the run (absolute).
        start_round: the first round this process runs (> 0 after a resume).
        clock: ``time.time``-like clock, for the uptime (tests pass a fake one).
        max_connections: most client connections held at once (``server.
            metrics_max_connections``); more are reset.
        timeout: seconds a client connection may live (default :data:`CONNECTION_TIMEOUT`).

    Nothing listens until :meth:`start`; :meth:`update` works with or without a listener.

    Raises:
        StatusEndpointError: prometheus-client is not installed.
    """

    def __init__(self, host: str, port: int, *, worker_ids: Iterable[int], rounds: int,
                 start_round: int = 0, clock: Callable[[], float] = time.time,
                 max_connections: int = 16, timeout: float = CONNECTION_TIMEOUT):
        self.host = host
        self.max_connections = int(max_connections)
        self.timeout = float(timeout)
        self.requested_port = int(port)
        self.port: Optional[int] = None
        self._clock = clock
        self._started_at = clock()
        self._lock = threading.Lock()
        self._httpd: Optional[BoundedHttpServer] = None
        self._thread: Optional[threading.Thread] = None
        ids = sorted(int(w) for w in worker_ids)
        self._ids = frozenset(str(w) for w in ids)
        self._state: dict[str, Any] = {
            "round": int(start_round), "rounds": int(rounds), "rounds_this_run": 0,
            "finished": int(start_round) >= int(rounds),
            "live_workers": [], "workers": {str(w): {"status": "unknown"} for w in ids},
            "test_accuracy": None, "test_loss": None, "evaluated_round": None,
            "reported_loss": None, "last_round_seconds": None,
            "rejected_gradients": {}, "missing": {}, "states_refused": {},
        }
        try:
            from prometheus_client import (
                CONTENT_TYPE_LATEST,
                CollectorRegistry,
                Counter,
                Gauge,
                Histogram,
                generate_latest,
            )
        except ImportError:
            raise StatusEndpointError("server.metrics_port needs the prometheus-client package: "
                                      "pip install prometheus-client (or rerun "
                                      "scripts/setup_env.sh)") from None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._g_round = Gauge("byzps_round", "rounds completed (index of the last closed round "
                              "+ 1)", registry=r)
        self._g_planned = Gauge("byzps_rounds_planned", "total rounds R of the run",
                                registry=r)
        self._c_rounds = Counter("byzps_rounds", "rounds closed by this PS process",
                                 registry=r)
        self._h_round = Histogram("byzps_round_seconds", "wall seconds per round",
                                  buckets=SECONDS_BUCKETS, registry=r)
        self._h_agg = Histogram("byzps_aggregate_seconds", "seconds spent in the robust "
                                "aggregator per round", buckets=SECONDS_BUCKETS, registry=r)
        self._g_live = Gauge("byzps_live_workers", "workers the round logic counts as live",
                             registry=r)
        self._g_workers = Gauge("byzps_workers", "configured workers n", registry=r)
        self._c_accepted = Counter("byzps_accepted", "gradients accepted, per worker",
                                   ["worker"], registry=r)
        self._c_rejected = Counter("byzps_rejected_gradients", "gradients rejected, per "
                                   "worker and reason", ["worker", "reason"], registry=r)
        self._c_missing = Counter("byzps_missing", "rounds a worker did not answer before the "
                                  "round closed", ["worker"], registry=r)
        self._c_refused = Counter("byzps_states_refused", "STATE requests refused (one STATE "
                                  "per worker and model version), per worker", ["worker"],
                                  registry=r)
        self._g_reported = Gauge("byzps_reported_loss", "mean training loss reported by the "
                                 "accepted workers in the last round", registry=r)
        self._g_acc = Gauge("byzps_test_accuracy", "last evaluated test accuracy in [0, 1]",
                            registry=r)
        self._g_loss = Gauge("byzps_test_loss", "last evaluated test cross-entropy",
                             registry=r)
        self._g_start = Gauge("byzps_start_time_seconds", "Unix time the PS status endpoint "
                              "was created", registry=r)
        self._g_round.set(start_round)
        self._g_planned.set(rounds)
        self._g_workers.set(len(ids))
        for g in (self._g_reported, self._g_acc, self._g_loss):
            g.set(math.nan)
        self._g_start.set(self._started_at)
        for w in ids:   # zero-valued series exist from the start, so rate() works at once
            self._c_accepted.labels(worker=str(w))
            self._c_missing.labels(worker=str(w))
            self._c_refused.labels(worker=str(w))
        self._render_metrics = lambda: (CONTENT_TYPE_LATEST, generate_latest(self.registry))

    # -- state ------------------------------------------------------------------------------

    def update(self, record: Mapping[str, Any], live_workers: Iterable[int] = ()) -> None:
        """Take one round's record (:func:`byzps.metrics.round_record` layout) and the ids the
        round logic counts as live. Thread-safe. Worker ids that are not configured are
        ignored and unknown rejection reasons count as ``other``, so no record can add a label
        value or a ``/status`` key beyond the configured workers and the fixed reasons."""
        rnd = int(record["round"])
        live = sorted(int(w) for w in live_workers)
        workers = {str(w): e for w, e in (record.get("workers") or {}).items()
                   if str(w) in self._ids}
        with self._lock:
            s = self._state
            s["round"] = rnd + 1
            s["rounds_this_run"] += 1
            s["finished"] = rnd + 1 >= s["rounds"]
            s["live_workers"] = live
            s["reported_loss"] = record.get("reported_loss")
            s["last_round_seconds"] = record.get("seconds_round")
            for wid, entry in workers.items():
                s["workers"][wid] = dict(entry, round=rnd)
                if entry.get("states_refused"):
                    k = int(entry["states_refused"])
                    s["states_refused"][wid] = s["states_refused"].get(wid, 0) + k
                    self._c_refused.labels(worker=wid).inc(k)
            for wid, reason in (record.get("rejected") or {}).items():
                wid = str(wid)
                if wid not in self._ids:
                    continue
                reason = str(reason) if reason in REJECTION_REASONS else OTHER_REASON
                per = s["rejected_gradients"].setdefault(wid, {})
                per[reason] = per.get(reason, 0) + 1
                self._c_rejected.labels(worker=wid, reason=reason).inc()
            for wid in map(str, record.get("missing") or ()):
                if wid in self._ids:
                    s["missing"][wid] = s["missing"].get(wid, 0) + 1
                    self._c_missing.labels(worker=wid).inc()
            for wid in map(str, record.get("accepted") or ()):
                if wid in self._ids:
                    self._c_accepted.labels(worker=wid).inc()
            if record.get("test_accuracy") is not None:
                s["test_accuracy"] = float(record["test_accuracy"])
                s["evaluated_round"] = rnd
                self._g_acc.set(s["test_accuracy"])
            if record.get("test_loss") is not None:
                s["test_loss"] = float(record["test_loss"])
                self._g_loss.set(s["test_loss"])
            self._g_round.set(rnd + 1)
            self._c_rounds.inc()
            self._g_live.set(len(live))
            loss = record.get("reported_loss")
            self._g_reported.set(math.nan if loss is None else float(loss))
            if record.get("seconds_round") is not None:
                self._h_round.observe(float(record["seconds_round"]))
            if record.get("seconds_aggregate") is not None:
                self._h_agg.observe(float(record["seconds_aggregate"]))

    def set_live_workers(self, live_workers: Iterable[int]) -> None:
        """Update only the live worker ids (e.g. as workers register before round 0)."""
        live = sorted(int(w) for w in live_workers)
        with self._lock:
            self._state["live_workers"] = live
            self._g_live.set(len(live))

    def snapshot(self) -> dict[str, Any]:
        """The ``/status`` document: a deep copy of the state plus ``uptime_seconds``.

        Keys: ``round`` (rounds completed, absolute), ``rounds`` (R), ``rounds_this_run``,
        ``finished``, ``live_workers`` (ids), ``workers`` (id -> last round's entry of the
        record plus ``round``; ``{"status": "unknown"}`` before the first round),
        ``test_accuracy`` / ``test_loss`` / ``evaluated_round`` (None before the first
        evaluation), ``reported_loss``, ``last_round_seconds``, ``rejected_gradients``
        (id -> reason -> count), ``missing`` (id -> count), ``states_refused`` (id -> count),
        ``uptime_seconds``. Non-finite
        numbers are None.
        """
        with self._lock:
            doc = copy.deepcopy(self._state)
        doc["uptime_seconds"] = max(0.0, self._clock() - self._started_at)
        return strict_json(doc)

    # -- HTTP -------------------------------------------------------------------------------

    def _app(self, path: str) -> tuple[str, str, bytes]:
        """``(status, content type, body)`` of a GET of ``path``."""
        if path == "/metrics":
            ctype, body = self._render_metrics()
            return "200 OK", ctype, body
        if path in ("/status", "/status/"):
            body = json.dumps(self.snapshot(), sort_keys=True, allow_nan=False).encode()
            ctype = "application/json"
            status = "200 OK"
        elif path == "/":
            body = b"byzps parameter server\n/metrics  Prometheus metrics\n/status   JSON status\n"
            ctype, status = "text/plain; charset=utf-8", "200 OK"
        else:
            body = f"not found: {path[:100]}; try /metrics or /status\n".encode()
            ctype, status = "text/plain; charset=utf-8", "404 Not Found"
        return status, ctype, body

    def start(self) -> int:
        """Bind ``host:port`` and serve in a daemon thread; returns the bound port.

        Raises:
            StatusEndpointError: the address cannot be bound (naming server.metrics_port and
                server.metrics_host); RuntimeError if already started.
        """
        if self._httpd is not None:
            raise RuntimeError("status endpoint already started")
        try:
            httpd = BoundedHttpServer(self.host, self.requested_port, self._app,
                                      max_connections=self.max_connections,
                                      max_request_bytes=MAX_REQUEST_BYTES, timeout=self.timeout)
        except OSError as e:
            raise StatusEndpointError(
                f"cannot serve the status endpoint on {self.host}:{self.requested_port}: "
                f"{e.strerror or e} (is server.metrics_port={self.requested_port} in use? "
                f"choose another server.metrics_port, or check server.metrics_host="
                f"{self.host!r})") from None
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"byzps-status-{self.port}", daemon=True)
        self._thread.start()
        log.info("status endpoint on http://%s:%d (/metrics, /status)", self.host, self.port)
        return self.port

    @property
    def url(self) -> Optional[str]:
        """``http://host:port`` once started, else None."""
        return None if self.port is None else f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent; the state stays readable)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
