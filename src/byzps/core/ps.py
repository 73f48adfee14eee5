"""The PS core: the parameter server's replica, robust pipeline and round state machine, and the
one after-close step that every driver runs when a round has closed.

A driver (the TCP server :mod:`byzps.net.server`, the in-process simulator
:mod:`byzps.simulate`) moves messages and time; it starts rounds with :meth:`PsCore.begin_round`,
feeds the machine what arrived, and when the machine reports a
:class:`byzps.core.rounds.RoundClosed` calls :meth:`PsCore.after_close`, which

1. evaluates the model on the test set every ``eval_every`` rounds and after the last round,
2. builds the round's metrics record (:func:`byzps.metrics.round_record`) and logs progress,
3. writes the record to the metrics file and hands it to every listener (the status endpoint,
   a progress display),
4. writes a checkpoint every ``checkpoint_every`` rounds.

So evaluation cadence, record building, logging and checkpointing exist once, whatever moves
the messages. The core is built from a config by :meth:`byzps.job.Job.ps_core`; it reads no
config itself and does no network I/O.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from byzps import checkpoint
from byzps.core.rounds import Action, RoundClosed, ServerRounds
from byzps.metrics import JsonlWriter, round_record
from byzps.replica import Replica
from byzps.robust import RobustPipeline

log = logging.getLogger(__name__)

#: most of a task's metrics (besides accuracy) a record carries
MAX_METRICS = 16

#: ``listener(record)``: called with every round's metrics record after it was written.
Listener = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Evaluation:
    """The latest evaluation of the PS replica on the test set.

    Attributes:
        round: the round after whose step the model was evaluated (-1: never).
        loss: mean test loss (NaN before the first evaluation).
        accuracy: test accuracy in [0, 1] (NaN before the first evaluation, or when the
            task's metrics have no ``accuracy``).
        metrics: every metric of the task's ``metrics`` (the default has only ``accuracy``).
    """

    round: int = -1
    loss: float = float("nan")
    accuracy: float = float("nan")
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass
class PsCore:
    """The PS's I/O-free parts, shared by the TCP server and the in-process simulator.

    Attributes:
        replica: the PS's model replica (``d`` parameters).
        aggregator: the robust pipeline (pre-aggregators, then the rule).
        machine: the round state machine (rounds ``machine.round`` .. ``rounds - 1``).
        test_x, test_y: the evaluation set, ``(m, *input_shape)`` inputs and ``(m,)`` int64
            labels.
        rounds: total rounds R (absolute: a resumed run stops at the same round).
        eval_every: evaluate every this many rounds (and after the last round), >= 1.
        metrics: the metrics file writer (a writer of ``None`` writes nothing).
        checkpoint_every: write a checkpoint every this many rounds (0: never).
        checkpoint_dir: folder of ``latest.pt``.
        fingerprint: the config fingerprint stored in each checkpoint
            (:func:`byzps.checkpoint.fingerprint`).
        listeners: called with each round's record after it was written.
        last: the latest :class:`Evaluation`.
        calibration: ``(c, *input_shape)`` training inputs the replica recomputes its running
            statistics (BatchNorm) from before each evaluation, in batches of
            ``calibration_batch``; None for a model without them.
        eval_split: what ``test_x``/``test_y`` are, for log lines: ``"test"`` or
            ``"validation"`` (training.validation; the records' fields keep their names).
        checkpoints_written, checkpoints_failed: checkpoints this process wrote / could not
            write (:meth:`checkpoint`).
    """

    replica: Replica
    aggregator: RobustPipeline
    machine: ServerRounds
    test_x: torch.Tensor
    test_y: torch.Tensor
    rounds: int
    eval_every: int = 1
    metrics: JsonlWriter = field(default_factory=lambda: JsonlWriter(None))
    checkpoint_every: int = 0
    checkpoint_dir: str = "checkpoints"
    fingerprint: Mapping[str, Any] = field(default_factory=dict)
    listeners: list[Listener] = field(default_factory=list)
    last: Evaluation = field(default_factory=Evaluation)
    calibration: Optional[torch.Tensor] = None
    calibration_batch: int = 32
    eval_split: str = "test"
    checkpoints_written: int = 0
    checkpoints_failed: int = 0
    _started: Optional[float] = field(default=None, repr=False)
    _first_round: int = field(default=0, repr=False)

    def begin_round(self) -> list[Action]:
        """Start the machine's next round (and the run's clock at the first); its actions."""
        if self._started is None:
            self._started, self._first_round = time.perf_counter(), self.machine.round
        return self.machine.begin_round()

    def evaluate(self) -> Evaluation:
        """Evaluate the replica on the test set now; the result becomes :attr:`last`."""
        loss, metrics = self.replica.evaluate(self.test_x, self.test_y,
                                              calibration=self.calibration,
                                              calibration_batch=self.calibration_batch)
        self.last = Evaluation(self.machine.round - 1, loss,
                               float(metrics.get("accuracy", float("nan"))), metrics)
        return self.last

    def due_for_evaluation(self, round_: int) -> bool:
        """Whether the model after round ``round_`` is evaluated: every ``eval_every`` rounds
        and after the last round."""
        return (round_ + 1) % self.eval_every == 0 or self.machine.finished

    def after_close(self, closed: RoundClosed, *, round_started: Optional[float] = None,
                    rows: Optional[Mapping[int, torch.Tensor]] = None,
                    aggregate: Optional[torch.Tensor] = None,
                    latencies: Optional[Mapping[int, float]] = None,
                    bytes_received: Optional[Mapping[int, int]] = None,
                    now: Optional[float] = None) -> dict[str, Any]:
        """The one step after a round closed: evaluate (when due), build the record, log,
        write it, hand it to the listeners, checkpoint (when due).

        Args:
            closed: the machine's :class:`byzps.core.rounds.RoundClosed`.
            round_started: ``time.perf_counter()`` when the round began; the record's
                ``seconds_round`` runs from there to the end of the evaluation (None: left out).
            rows, aggregate: worker id -> ``(d,)`` vector it sent, and the ``(d,)`` aggregate
                (the simulator has them; gives per-worker distances when ``closed`` has none).
            latencies, bytes_received: per worker, seconds from ROUND to its GRADIENT and
                frame bytes received (the TCP server).
            now: the record's Unix time (default: now).

        Returns:
            the record (:func:`byzps.metrics.round_record`).

        Raises:
            OSError: the metrics file cannot be written.
        """
        r = closed.round
        evaluated = self.due_for_evaluation(r)
        if evaluated:
            self.evaluate()
        seconds_round = None if round_started is None else time.perf_counter() - round_started
        record = round_record(closed, worker_ids=self.machine.worker_ids,
                              seconds_round=seconds_round, rows=rows, aggregate=aggregate,
                              latencies=latencies, bytes_received=bytes_received, now=now,
                              test_loss=self.last.loss if evaluated else None,
                              test_accuracy=self.last.accuracy if evaluated else None)
        if evaluated:
            extra = {k: v for k, v in self.last.metrics.items() if k != "accuracy"}
            if extra:
                record["test_metrics"] = dict(sorted(extra.items())[:MAX_METRICS])
        if evaluated:
            started = self._started if self._started is not None else time.perf_counter()
            rate = (time.perf_counter() - started) / max(1, r + 1 - self._first_round)
            log.info("round %d/%d: %s accuracy %.4f, %s loss %.4f, %.3f s/round, "
                     "accepted %s%s", r + 1, self.rounds, self.eval_split, self.last.accuracy,
                     self.eval_split, self.last.loss,
                     rate, list(closed.accepted),
                     f", rejected {closed.rejected}" if closed.rejected else "")
        self.metrics.write(record)
        for listener in self.listeners:
            listener(record)
        if self.checkpoint_every and (r + 1) % self.checkpoint_every == 0:
            self.checkpoint()
        return record

    def checkpoint(self) -> bool:
        """Write ``checkpoint_dir/latest.pt`` now (model, optimizer state, aggregator state,
        RNG, round). A failure (disk full, no descriptor left, folder not writable) is logged
        and training goes on: the next checkpoint tries again.

        Returns:
            whether the checkpoint was written.
        """
        try:
            path = checkpoint.save(self.checkpoint_dir, checkpoint.Checkpoint(
                self.machine.round, self.replica.state(), self.aggregator.state_dict(),
                torch.random.get_rng_state(), dict(self.fingerprint)))
        except (OSError, RuntimeError) as e:   # torch's file writer raises RuntimeError
            log.error("checkpoint of round %d could not be written to %s: %s; training goes "
                      "on and the next checkpoint (every %d rounds) tries again",
                      self.machine.round, self.checkpoint_dir, str(e).splitlines()[0][:300],
                      self.checkpoint_every)
            self.checkpoints_failed += 1
            return False
        log.info("checkpoint of round %d written to %s", self.machine.round, path)
        self.checkpoints_written += 1
        return True

    def checkpoint_problem(self) -> Optional[str]:
        """One line when checkpoints were due and none could be written (the run cannot be
        resumed), else None."""
        if self.checkpoints_failed and not self.checkpoints_written:
            return (f"no checkpoint could be written to {self.checkpoint_dir} ("
                    f"{self.checkpoints_failed} attempts failed; see the ERROR lines above): "
                    f"this run cannot be resumed")
        return None

    def seconds(self) -> float:
        """Wall seconds since the first round of this process began (0 before it)."""
        return 0.0 if self._started is None else time.perf_counter() - self._started

    def close(self) -> None:
        """Close the metrics file."""
        self.metrics.close()
