"""One training job in one process, no sockets: the PS's and the workers' state machines wired
together directly.

The simulator runs the same round logic as a TCP run, built by the same job builder
(:class:`byzps.job.Job`): the server side is the PS core (:class:`byzps.core.ps.PsCore`: the
config's replica, robust pipeline, quorum, round machine and the after-close step that
evaluates, writes the record and checkpoints), each worker a worker core
(:class:`byzps.core.worker.WorkerCore`), whose :class:`byzps.core.rounds.WorkerRounds`
computes exactly what the worker process would send. Nothing of the network layer
(:mod:`byzps.net`) is imported, so keys and TLS settings in the config are never read.
Messages are handed over in memory: STATE to every worker as it "connects", then per round
ROUND -> GRADIENT -> UPDATE. Tensors are shared, not copied: every receiver only reads them
(a worker loads STATE by copying it, applies UPDATE without writing to it; the PS copies each
GRADIENT into its round buffer), and a non-finite reported loss arrives as None, as the wire
format sends it. Every worker always answers, so no deadline ever passes and every round
closes with every answer (``training.close_at: all``, whatever the config says: without
arrival times there are no "fastest n - f"); for the same config and seed the final PS replica
is bit-identical to a TCP run with ``close_at: all`` and without timeouts or disconnections.

Speed (issue 14): a broadcast (ROUND, UPDATE, STOP) is handled by the workers on ``threads``
Python threads at once, each worker's computation on one torch thread (the intra-op count is
set to 1 for the whole run, as every TCP node uses); the replies are then handed to the PS in
ascending worker id. Each worker's gradient depends only on its own replica, sampler, momentum
and attack (all randomness comes from explicit per-worker generators), so the result is
bit-identical for every ``threads``. During a round's close the PS's rules spread their
column-wise work (clipping's rows, NNM's mixing, the trimmed mean's sorts, the distances to the
aggregate) over the same threads (:func:`byzps.aggregators.parallel_chunks`; each chunk is
computed as in one thread, so the aggregate is bit-identical too). Neither side hashes its
replica at each ROUND (the PS sends none, ``ServerRounds.send_digest`` off;
``WorkerRounds.verify_digest`` off); instead, at every evaluated round, the simulation checks
that every worker's replica digest equals the PS's and fails if one differs.

Omniscient attacks (``attack_params: {omniscient: true}``) exist only here: when a config has
one, each ROUND goes first to the other workers, and the vectors the honest workers sent are
stacked ``(h, d)`` into :attr:`byzps.core.worker.WorkerCore.omniscient_view` of the omniscient
Byzantine workers before they answer (with threads: the others' replies are all computed
first, then the omniscient workers'), with the PS pipeline's state of the round in
:attr:`byzps.core.worker.WorkerCore.pipeline_state` (for attacks that run the rule
themselves). The aggregate does not depend on the order in which gradients arrive (rows are
stacked by worker id).

    result = simulate(cfg, data_root="./data", rounds=20, metrics_file="m.jsonl")
    result.digest, result.test_accuracy
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from byzps.aggregators import parallel_chunks
from byzps.config import Config
from byzps.core.messages import Gradient, RoundStart, Update
from byzps.core.rounds import Broadcast, RoundClosed, RoundFailed, Send
from byzps.core.worker import WorkerCore
from byzps.job import Job

log = logging.getLogger(__name__)


class SimulationFailed(RuntimeError):
    """The simulated run cannot go on (a round could not close); the message says why."""


@dataclass(frozen=True)
class SimResult:
    """What a finished simulation reports.

    Attributes:
        rounds: rounds completed.
        test_accuracy: final accuracy in [0, 1] on the (limited) test set.
        test_loss: final mean cross-entropy.
        seconds: wall seconds of the round loop, set-up and the test-set evaluations excluded.
        digest: the PS replica's digest (:meth:`byzps.replica.Replica.digest`), 32 hex chars.
        records: every per-round metrics record (:func:`byzps.metrics.round_record`) when
            the run was asked to keep them (``keep_records``), else empty: a long run's memory
            does not grow with its rounds. Their ``seconds_round`` includes an evaluation in
            the rounds that had one, as the PS's do.
        seconds_eval: wall seconds of the test-set evaluations (and the replica checks done
            with them).
        last_record: the last round's record (None if no round ran).
        best_accuracy: the highest evaluated test accuracy over the run, or None.
    """

    rounds: int
    test_accuracy: float
    test_loss: float
    seconds: float
    digest: str
    records: list[dict[str, Any]] = field(repr=False, default_factory=list)
    seconds_eval: float = 0.0
    last_record: Optional[dict[str, Any]] = field(repr=False, default=None)
    best_accuracy: Optional[float] = None

    @property
    def seconds_per_round(self) -> float:
        """Mean wall seconds per simulated round, evaluations excluded."""
        return self.seconds / max(self.rounds, 1)


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (restored after); None = unchanged."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_threads(n: int) -> int:
    """Threads for n workers: the CPUs this process may run on (its affinity), at most n, at
    least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(n, cpus))


def _as_received(reply: Any) -> Any:
    """A worker's reply as the PS would decode it: a GRADIENT's non-finite reported loss
    becomes None, as the wire format sends it (the tensor is shared: the PS only copies it)."""
    if isinstance(reply, Gradient) and reply.loss is not None and not math.isfinite(reply.loss):
        return dataclasses.replace(reply, loss=None)
    return reply


class Simulation:
    """A whole job (PS + every worker of the config) in this process.

    Args:
        cfg: validated config.
        data_root: the folder searched first for the task's data (see :mod:`byzps.data`).
        rounds: total rounds R (default ``cfg.training.rounds``).
        metrics_file: JSON Lines path for one record per round (default
            ``cfg.training.metrics_file``; None = no file).
        threads: Python threads that handle a broadcast's workers at once (1 = one after the
            other, in the caller's thread). The result does not depend on it; each thread
            uses the process's torch intra-op thread count (:func:`simulate` sets 1).

    Raises:
        byzps.data.DatasetNotFound: no copy of the task's data.
        ValueError: a data shard smaller than one batch (the message says which and why), or
            threads < 1.
    """

    def __init__(self, cfg: Config, data_root: str, rounds: Optional[int] = None,
                 metrics_file: Optional[str] = None, threads: int = 1):
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.cfg = cfg
        self.threads = threads
        job = Job(cfg, data_root, rounds=rounds)
        # exactly as the TCP PS builds it; every answer is in before the close (no arrival
        # times here), i.e. training.close_at "all", so a TCP run equals this one bit for bit
        # only with close_at: all. A simulation cannot resume, so it writes no checkpoints.
        self.core = job.ps_core(rounds, close_at="all", metrics_file=metrics_file,
                                checkpoints=False)
        self.rounds = self.core.rounds
        self.replica, self.robust, self.machine = (self.core.replica, self.core.aggregator,
                                                   self.core.machine)
        job.shard_indices()   # fail early if a shard is < one batch
        self.workers: dict[int, WorkerCore] = {w.id: job.worker_core(w.id)
                                               for w in cfg.workers}
        for w in self.workers.values():   # checked at the evaluation rounds instead
            w.machine.verify_digest = False
        self.machine.send_digest = False    # so no ROUND needs the PS replica's digest
        self._omniscient = {wid for wid, w in self.workers.items()
                            if w.attack is not None and w.attack.omniscient}
        self._honest = {wid for wid, w in self.workers.items() if w.attack is None}
        self._rows: dict[int, torch.Tensor] = {}
        self._aggregate: Optional[torch.Tensor] = None
        self._pool: Optional[cf.ThreadPoolExecutor] = None

    # -- message passing ----------------------------------------------------------------------

    def _to_workers(self, wids: list[int], msg: Any, queue: deque) -> None:
        """Hand ``msg`` to each worker of ``wids`` (on the pool's threads when there is one)
        and their replies to the PS in the order of ``wids``, each as soon as it and those
        before it are ready (the PS checks one while the pool computes the next)."""
        answers: Iterator[list] = (self._pool.map(self._deliver(msg), wids)
                                   if self._pool is not None and len(wids) > 1
                                   else map(self._deliver(msg), wids))
        for wid, replies in zip(wids, answers):
            for reply in replies:
                reply = _as_received(reply)
                if isinstance(reply, Gradient):
                    self._rows[wid] = reply.tensor
                queue.extend(self.machine.on_message(wid, reply))

    def _deliver(self, msg: Any) -> Callable[[int], list]:
        """``wid -> replies of worker wid to msg`` (called on a pool thread)."""
        return lambda wid: self.workers[wid].machine.on_message(msg)

    def _execute(self, actions: list) -> list:
        """Deliver every Send/Broadcast (and what the replies cause); return the other
        actions (RoundClosed, RoundFailed, Drop, Finished) in order."""
        events, queue = [], deque(actions)
        while queue:
            action = queue.popleft()
            if isinstance(action, Send):
                if action.worker_id in self.machine.live:
                    self._to_workers([action.worker_id], action.message, queue)
            elif isinstance(action, Broadcast):
                if isinstance(action.message, Update):
                    self._aggregate = action.message.tensor
                live = sorted(self.machine.live)
                if isinstance(action.message, RoundStart) and self._omniscient:
                    # omniscient attackers answer last, having seen the honest vectors
                    self._to_workers([w for w in live if w not in self._omniscient],
                                     action.message, queue)
                    last = [w for w in live if w in self._omniscient]
                    view = self._honest_view() if last else None   # every honest row is in
                    state = self.robust.state_dict() if last else None
                    for wid in last:
                        self.workers[wid].omniscient_view = view
                        self.workers[wid].pipeline_state = state
                    self._to_workers(last, action.message, queue)
                else:
                    self._to_workers(live, action.message, queue)
            else:
                events.append(action)
        return events

    def _honest_view(self) -> Optional[torch.Tensor]:
        """The ``(h, d)`` honest vectors of the round so far (None when there are none), for
        the omniscient workers; the attacks only read it."""
        rows = [self._rows[i] for i in sorted(self._rows) if i in self._honest]
        return torch.stack(rows) if rows else None

    # -- the run ------------------------------------------------------------------------------

    def run(self, on_record: Optional[Callable[[dict[str, Any]], None]] = None,
            keep_records: bool = False) -> SimResult:
        """Connect every worker, run every round, evaluate as the PS does.

        Args:
            on_record: called with each round's record as soon as it is written.
            keep_records: return every round's record in :attr:`SimResult.records` (memory
                grows with the rounds); False keeps only the last record and the summary.

        Raises:
            SimulationFailed: a round could not close (e.g. too few usable gradients, or the
                aggregator refused them), or at an evaluated round a worker's replica differs
                from the PS's.
        """
        records: list[dict[str, Any]] = []
        count, last_record, best = 0, None, None
        seconds_eval = 0.0
        if on_record is not None:
            self.core.listeners.append(on_record)
        if self.threads > 1:   # made here, so its threads start with torch's current count
            self._pool = cf.ThreadPoolExecutor(self.threads, thread_name_prefix="byzps-worker")
        chunks = contextlib.ExitStack()
        try:
            # the PS's rules spread their column work over the same pool (idle during a close)
            chunks.enter_context(parallel_chunks(self._pool, self.threads))
            for wid in sorted(self.workers):
                self._raise_on_failure(self._execute(self.machine.connect(wid)))
            start = time.perf_counter()
            while not self.machine.finished:
                r = self.machine.round
                round_start = time.perf_counter()
                self._rows, self._aggregate = {}, None
                events = self._execute(self.core.begin_round())
                if not any(isinstance(e, RoundClosed) for e in events):
                    events += self._execute(self.machine.on_deadline())
                self._raise_on_failure(events)
                closed = next((e for e in events if isinstance(e, RoundClosed)), None)
                if closed is None:
                    raise SimulationFailed(f"round {r} did not close: {events}")
                evaluated = self.core.due_for_evaluation(r)
                eval_start = time.perf_counter()
                if evaluated:
                    self._check_replicas(r)
                last_record = self.core.after_close(
                    closed, round_started=round_start, rows=self._rows,
                    aggregate=self._aggregate)
                count += 1
                acc = last_record.get("test_accuracy")
                if acc is not None and (best is None or acc > best):
                    best = acc
                if keep_records:
                    records.append(last_record)
                if evaluated:
                    seconds_eval += time.perf_counter() - eval_start
            seconds = time.perf_counter() - start - seconds_eval
        finally:
            chunks.close()
            self.core.close()
            if on_record is not None:
                self.core.listeners.remove(on_record)
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
        digest = self.replica.digest()
        log.info("training finished; PS replica digest %s", digest)
        last = self.core.last
        return SimResult(count, last.accuracy, last.loss, seconds, digest, records,
                         seconds_eval, last_record, best)

    def _check_replicas(self, r: int) -> None:
        """Every live worker's replica digest equals the PS's after round r (what the workers'
        per-ROUND check would have found over TCP, where such a worker would resync).

        Raises:
            SimulationFailed: naming the workers whose replica differs.
        """
        want = self.replica.digest()
        differ = [w for w in sorted(self.machine.live)
                  if self.workers[w].replica.digest() != want]
        if differ:
            raise SimulationFailed(
                f"after round {r}: the replicas of workers {differ} differ from the PS's "
                f"(digest {want}); the simulation no longer equals a TCP run")

    @staticmethod
    def _raise_on_failure(events: list) -> None:
        for e in events:
            if isinstance(e, RoundFailed):
                raise SimulationFailed(f"round {e.round}: {e.reason}")


def simulate(cfg: Config, data_root: str = "./data", rounds: Optional[int] = None,
             metrics_file: Optional[str] = None, threads: Optional[int] = None,
             on_record: Optional[Callable[[dict[str, Any]], None]] = None,
             keep_records: bool = False) -> SimResult:
    """Build a :class:`Simulation` and run it.

    Args:
        cfg: validated config.
        data_root: the folder searched first for the task's data.
        rounds: override of ``training.rounds``.
        metrics_file: JSON Lines output (default ``training.metrics_file``).
        threads: threads that compute the workers' messages at once (see
            :class:`Simulation`); None = :func:`default_threads` (the CPUs available, at most
            n). Whatever the count, torch runs with one intra-op thread per computing thread
            while the simulation runs (restored after), as every TCP node does under the
            launcher, so the result is bit-identical to a TCP run for every ``threads``.
        on_record: called with each round's metrics record.
        keep_records: keep every record in :attr:`SimResult.records` (default off: only the
            last record and the summary, so memory does not grow with the rounds).

    Raises:
        SimulationFailed: a round could not close.
        byzps.data.DatasetNotFound: no copy of the task's data.
        ValueError: a shard smaller than one batch, or threads < 1.
    """
    if threads is None:
        threads = default_threads(len(cfg.workers))
    with torch_threads(1):
        return Simulation(cfg, data_root, rounds, metrics_file, threads).run(on_record,
                                                                             keep_records)
