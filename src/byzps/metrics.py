"""Per-round metric records, a JSON Lines writer and reader, and the status text of a round.

:func:`round_record` builds the record of one round from the state machine's
:class:`byzps.core.rounds.RoundClosed` (plus evaluation numbers and, where the caller has them,
the gradients and the aggregate for distances); the PS and the simulator both write it, one
JSON line per round, with :class:`JsonlWriter`.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

from byzps.safeio import LineFollower, iter_lines

#: largest reported training loss taken as sane: losses are non-negative (cross-entropy,
#: squared error) and a diverging run is obvious long before this; a worker's value outside
#: [0, MAX_REPORTED_LOSS] is left out of ``reported_loss``
MAX_REPORTED_LOSS = 1e6


def reported_loss(losses: Iterable[Any]) -> Optional[float]:
    """A robust summary of the training losses the workers reported: the median of the finite
    values in [0, :data:`MAX_REPORTED_LOSS`] (the mean of the two middle ones for an even
    count), or None when there is none.

    The losses are untrusted (a Byzantine worker reports what it likes): the median moves by
    at most one order statistic per value a Byzantine worker adds, so fewer than half of them
    cannot push it outside the honest values' range, while one -1e308 made the former mean
    -2.5e307.

    Args:
        losses: reported values (floats; non-numbers are ignored).

    Returns:
        the median as a float, or None.
    """
    sane = [float(v) for v in losses
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and 0.0 <= v <= MAX_REPORTED_LOSS]
    return float(statistics.median(sane)) if sane else None


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (also nested in dicts, lists and tuples) replaced
    by None, and dict keys made strings: what strict JSON can hold (metrics records, the status
    page)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


class MetricsWriteError(OSError):
    """The metrics file cannot be created or written (a folder, a full disk, ``/dev/full``);
    the message names the file and the reason."""


class JsonlWriter:
    """Append one JSON object per line to ``path`` (created with its parent folders).

    Non-finite floats are written as ``null`` so every line is strict JSON. Each record is
    flushed at once, so a crashed run keeps every finished round.

    Args:
        path: file path, or None for a writer that drops everything.

    Raises:
        MetricsWriteError: the file cannot be created (an OSError naming the file).
    """

    def __init__(self, path: Optional[str | Path]):
        self._fh = None
        self.path = None if path is None else Path(path)
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = self.path.open("a", encoding="utf-8")
            except OSError as e:
                raise MetricsWriteError(
                    f"cannot open the metrics file {self.path}: "
                    f"{e.strerror or e}") from None

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (a JSON-serialisable mapping) as one line.

        Raises:
            MetricsWriteError: the write failed (e.g. no space left); names the file.
        """
        if self._fh is not None:
            try:
                self._fh.write(json.dumps(strict_json(record), sort_keys=True) + "\n")
                self._fh.flush()
            except OSError as e:
                raise MetricsWriteError(
                    f"cannot write the metrics file {self.path}: "
                    f"{e.strerror or e}") from None

    def close(self) -> None:
        """Close the file (idempotent; a failing last flush is not raised again)."""
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError:
                pass


def _distances(rows: Mapping[int, Any], aggregate: Any) -> dict[int, Optional[float]]:
    """L2 distance of each row to the aggregate, in float64; None for a non-finite row."""
    import torch

    a = aggregate.detach().reshape(-1).to(torch.float64)
    out: dict[int, Optional[float]] = {}
    for wid, row in rows.items():
        r = row.detach().reshape(-1).to(torch.float64)
        if r.shape != a.shape or not bool(torch.isfinite(r).all()):
            out[int(wid)] = None
        else:
            out[int(wid)] = float(torch.linalg.vector_norm(r - a))
    return out


def round_record(closed: Any, *, worker_ids: Optional[Iterable[int]] = None,
                 seconds_round: Optional[float] = None,
                 test_loss: Optional[float] = None, test_accuracy: Optional[float] = None,
                 rows: Optional[Mapping[int, Any]] = None, aggregate: Any = None,
                 latencies: Optional[Mapping[int, float]] = None,
                 bytes_received: Optional[Mapping[int, int]] = None,
                 now: Optional[float] = None) -> dict[str, Any]:
    """The metrics record of one closed round (a pure function of its arguments).

    Args:
        closed: a :class:`byzps.core.rounds.RoundClosed` (fields ``round``, ``accepted``,
            ``rejected``, ``missing``, ``losses``, ``seconds_aggregate``; an optional
            ``distances`` mapping worker id -> L2 distance of its gradient to the aggregate is
            used when present).
        worker_ids: every configured worker id (default: those named in ``closed``); each
            gets an entry in ``workers``.
        seconds_round: wall seconds from the round's start to its close.
        test_loss, test_accuracy: evaluation of the model after this round's step, when it was
            evaluated (accuracy in [0, 1]); left out of the record when None.
        rows: worker id -> ``(d,)`` tensor it sent this round (the simulator has them); with
            ``aggregate`` (``(d,)``) gives each worker's distance to the aggregate.
        latencies: worker id -> seconds from the PS writing ROUND to that worker until its
            GRADIENT fully arrived (the PS over TCP; the simulator has none).
        bytes_received: worker id -> frame bytes (prefix, header, payload, MAC) received from
            it while the round was open.
        now: the record's ``time`` (Unix seconds); default ``time.time()``.

    Returns:
        a JSON-serialisable dict: ``round``, ``time``, ``seconds_round`` (when given),
        ``seconds_aggregate``, ``seconds_validate`` (when ``closed`` has it: seconds spent
        checking the round's gradients), ``accepted`` (ascending ids), ``rejected`` (id -> reason, keys
        as strings), ``missing``, ``reported_loss`` (:func:`reported_loss`: median of the
        accepted workers' sane reported losses, or None), ``test_loss``/``test_accuracy``
        (when evaluated), and ``workers``: ``{"<id>": {"status": "accepted" | "rejected" |
        "missing", "reason": str (rejected only), "loss": float, "distance": float,
        "latency": float, "bytes": int, "states_refused": int}}`` with the optional keys
        present only when known (``states_refused``: STATE requests of that worker refused
        since the previous round, when any). Distances are Euclidean (L2), in gradient units.
        Its size is bounded by the number of workers (nothing cumulative is copied into it).
    """
    accepted = sorted(int(w) for w in closed.accepted)
    rejected = {int(w): str(r) for w, r in closed.rejected.items()}
    missing = sorted(int(w) for w in closed.missing)
    losses = {int(w): float(v) for w, v in closed.losses.items()}
    refused = {int(w): int(k) for w, k in (getattr(closed, "states_refused", None) or {}).items()}
    ids = sorted(set(worker_ids) if worker_ids is not None
                 else set(accepted) | set(rejected) | set(missing))
    dist: dict[int, Optional[float]] = {}
    given = getattr(closed, "distances", None)
    if given:
        dist = {int(w): (None if v is None else float(v)) for w, v in given.items()}
    elif rows is not None and aggregate is not None:
        dist = _distances(rows, aggregate)
    workers: dict[str, dict[str, Any]] = {}
    for w in ids:
        if w in rejected:
            entry: dict[str, Any] = {"status": "rejected", "reason": rejected[w]}
        elif w in accepted:
            entry = {"status": "accepted"}
        else:
            entry = {"status": "missing"}
        if w in losses:
            entry["loss"] = losses[w]
        if dist.get(w) is not None:
            entry["distance"] = dist[w]
        if latencies is not None and w in latencies:
            entry["latency"] = float(latencies[w])
        if bytes_received is not None and w in bytes_received:
            entry["bytes"] = int(bytes_received[w])
        if refused.get(w):
            entry["states_refused"] = int(refused[w])
        workers[str(w)] = entry
    acc_losses = [losses[w] for w in accepted if w in losses]
    record: dict[str, Any] = {
        "round": int(closed.round),
        "time": time.time() if now is None else float(now),
        "seconds_aggregate": float(closed.seconds_aggregate),
        "accepted": accepted,
        "rejected": {str(w): r for w, r in sorted(rejected.items())},
        "missing": missing,
        "reported_loss": reported_loss(acc_losses),
        "workers": workers,
    }
    if getattr(closed, "seconds_validate", None) is not None:
        record["seconds_validate"] = float(closed.seconds_validate)
    if seconds_round is not None:
        record["seconds_round"] = float(seconds_round)
    if test_loss is not None:
        record["test_loss"] = float(test_loss)
    if test_accuracy is not None:
        record["test_accuracy"] = float(test_accuracy)
    return record


#: largest metrics file read whole (``byzps plot``, the grid's curves), bytes
MAX_METRICS_BYTES = 1 << 30
#: longest line (one round's record) of a metrics file, bytes; a record's size is bounded by n
#: (at most 4096 workers, a few hundred bytes each)
MAX_RECORD_BYTES = 8 << 20


def iter_jsonl(path: str | Path, keys: Optional[Iterable[str]] = None
               ) -> Iterator[dict[str, Any]]:
    """Every complete JSON object line of ``path``, one at a time (a last line that is not
    valid JSON, e.g. still being written, and blank or non-object lines are skipped).

    The file is read through :func:`byzps.safeio.iter_lines`: it must be a regular file of at
    most :data:`MAX_METRICS_BYTES` bytes with lines of at most :data:`MAX_RECORD_BYTES` bytes.

    Args:
        path: a metrics JSON Lines file.
        keys: keep only these keys of each record (bounds memory for callers that keep them
            all); None keeps every key.

    Raises:
        byzps.safeio.FileRefused: not a regular file (a folder, ``/dev/zero``), too large, or a
            line too long; the message names the file.
        OSError: the file cannot be read.
    """
    wanted = None if keys is None else tuple(keys)
    for _, line in iter_lines(path, MAX_METRICS_BYTES, MAX_RECORD_BYTES, "metrics file"):
        rec = _parse_line(line)
        if rec is not None:
            yield rec if wanted is None else {k: rec[k] for k in wanted if k in rec}


def truncate_records(path: str | Path, round_: int) -> int:
    """Drop every record of round ``round_`` or later from the metrics file ``path`` (what a
    PS resumed from a checkpoint of round ``round_`` will write again), and any incomplete
    last line; the file is rewritten through a temporary file in the same folder and renamed
    over it. A missing file is left alone.

    Args:
        path: a metrics JSON Lines file.
        round_: the first round to drop (the checkpoint's next round).

    Returns:
        the number of records dropped.

    Raises:
        byzps.safeio.FileRefused: not a regular file, too large, or a line too long.
        OSError: the file cannot be read or rewritten.
    """
    p = Path(path)
    if not p.exists():
        return 0
    tmp = p.with_name(p.name + ".resume-tmp")
    dropped = 0
    try:
        with tmp.open("w", encoding="utf-8") as out:
            for _, line in iter_lines(p, MAX_METRICS_BYTES, MAX_RECORD_BYTES, "metrics file"):
                rec = _parse_line(line)
                if rec is None:
                    dropped += bool(line.strip())
                    continue
                r = rec.get("round")
                if isinstance(r, int) and r >= round_:
                    dropped += 1
                    continue
                out.write(line.decode("utf-8").rstrip("\r") + "\n")
        tmp.replace(p)
    finally:
        tmp.unlink(missing_ok=True)
    return dropped


def _parse_line(line: bytes) -> Optional[dict[str, Any]]:
    line = line.strip()
    if not line:
        return None
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every complete JSON line of ``path`` as a list (:func:`iter_jsonl`, same limits).

    Raises:
        byzps.safeio.FileRefused, OSError: see :func:`iter_jsonl`.
    """
    return list(iter_jsonl(path))


class JsonlFollower:
    """The records appended to a metrics file someone is writing (the PS's), read from the last
    offset on each call (:class:`byzps.safeio.LineFollower`, lines up to
    :data:`MAX_RECORD_BYTES`): a poll costs what was appended, not the whole file.

    Args:
        path: the metrics file (it need not exist yet).
    """

    def __init__(self, path: str | Path) -> None:
        self._lines = LineFollower(path, MAX_RECORD_BYTES)

    def read_new(self) -> list[dict[str, Any]]:
        """The complete records appended since the last call, in file order.

        Raises:
            byzps.safeio.FileRefused: the path is not a regular file.
            OSError: it cannot be read.
        """
        return [r for r in map(_parse_line, self._lines.read_new()) if r is not None]


def round_status(record: Mapping[str, Any], rounds: int, seconds_per_round: Optional[float],
                 accuracy: Optional[float] = None, show_round: bool = True) -> str:
    """One status text: ``round 12/300  acc 0.9712  loss 0.215  rejected 1  0.84 s/round``
    (the progress display's line, or the text after its bar: :mod:`byzps.progress`).

    Args:
        record: the latest round record (:func:`round_record`'s layout).
        rounds: total rounds R (> 0).
        seconds_per_round: mean wall seconds per round so far, or None.
        accuracy: the latest evaluated accuracy (the record's own if it has one).
        show_round: start with ``round k/R`` (False: a bar shows it).
    """
    done = int(record.get("round", -1)) + 1
    acc = record.get("test_accuracy", accuracy)
    loss = record.get("reported_loss")
    parts = [f"round {done}/{rounds}"] if show_round else []
    parts.append(f"acc {acc:.4f}" if acc is not None else "acc -")
    parts.append(f"loss {loss:.3f}" if loss is not None else "loss -")
    parts.append(f"rejected {len(record.get('rejected') or {})}")
    if seconds_per_round is not None:
        parts.append(f"{seconds_per_round:.2f} s/round")
    return "  ".join(parts)
