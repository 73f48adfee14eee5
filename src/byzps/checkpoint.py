"""PS checkpoints: atomic write, safe load, and a config fingerprint that refuses mismatches.

A checkpoint is a ``torch.save`` of plain tensors and Python scalars, read back with
``torch.load(weights_only=True)`` (which constructs no arbitrary objects). It is written to a
temporary file in the same folder and renamed over ``latest.pt``, so a crash mid-write leaves
the previous checkpoint intact.

Loading trusts nothing in the file: it must be a regular file of at most
:func:`max_checkpoint_bytes` bytes (checked before reading), and every field is validated by a
pydantic schema (:class:`CheckpointFields`) before use; a bad one is a :class:`CheckpointError`
naming the field.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from byzps.config import Config
from byzps.safeio import FileRefused, clip, open_checked, read_limited, shorten

FORMAT = 1
FILENAME = "latest.pt"
#: largest round number a checkpoint may hold (a billion rounds)
MAX_ROUND = 10 ** 9
#: longest fingerprint (JSON text, characters)
MAX_FINGERPRINT_CHARS = 1 << 20

#: Config fields that may change between a run and its resumption (they do not change the
#: trajectory of the model): dotted paths, a trailing ``*`` matches a whole section.
VOLATILE = ("training.rounds", "training.eval_every", "training.metrics_file",
            "training.checkpoint_every", "training.checkpoint_dir", "training.round_timeout",
            "training.round_retries", "training.max_missed_rounds", "training.quorum",
            "training.test_limit", "training.device", "training.close_at", "server.*")
#: A device changes the rounding of the gradients a replica computes, as another CPU or thread
#: count does, not what the run is; the PS's CPU step stays authoritative. So it is volatile.
_WORKER_VOLATILE = ("host", "port", "device")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why (e.g. the differing fields)."""


def max_checkpoint_bytes(d: int) -> int:
    """Largest checkpoint file accepted for a model of ``d`` parameters, in bytes: room for
    16 float32 vectors of length d (theta and momentum take 2; aggregator states such as
    centered clipping's centre a few more) plus 16 MiB for the RNG state, fingerprint and
    the zip/pickle overhead."""
    return 16 * 4 * int(d) + (16 << 20)


#: the value types a fingerprint entry may have
_SCALARS = (str, int, float, bool, type(None))


class CheckpointFields(BaseModel):
    """The schema of a checkpoint file's dict (validated with ``context={"d": d}``).

    Attributes:
        format: must be :data:`FORMAT`.
        round: the next round to run, an int in [0, :data:`MAX_ROUND`] (not a float, bool or
            inf).
        state: ``(1 + k, d)`` float32 tensor [theta, the optimizer's k state rows], all finite
            (k from the context's ``rows`` - 1; SGD: 1, Adam/AdamW: 2).
        aggregator_state: the robust pipeline's ``state_dict()`` (a mapping; its contents are
            checked by the pipeline's ``load_state_dict``).
        rng_state: torch's CPU generator state: a 1-D uint8 tensor of the length
            ``torch.random.get_rng_state()`` has, that a generator accepts.
        fingerprint: JSON text of a mapping dotted field path -> scalar (see
            :func:`fingerprint`), at most :data:`MAX_FINGERPRINT_CHARS` characters.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True,
                              arbitrary_types_allowed=True)

    format: Literal[1]
    round: int = Field(ge=0, le=MAX_ROUND)
    state: torch.Tensor
    aggregator_state: dict[str, Any]
    rng_state: torch.Tensor
    fingerprint: str = Field(max_length=MAX_FINGERPRINT_CHARS)

    @field_validator("state")
    @classmethod
    def _state(cls, v: torch.Tensor, info: ValidationInfo) -> torch.Tensor:
        d = (info.context or {}).get("d")
        rows = (info.context or {}).get("rows", 2)
        if v.dtype != torch.float32 or v.dim() != 2 or v.shape[0] != rows or \
                (d is not None and v.shape[1] != d):
            raise ValueError(f"expected a ({rows}, {d}) float32 tensor, got {tuple(v.shape)} "
                             f"{v.dtype}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError("holds NaN or Inf")
        return v

    @field_validator("rng_state")
    @classmethod
    def _rng(cls, v: torch.Tensor) -> torch.Tensor:
        want = torch.random.get_rng_state().shape
        if v.dtype != torch.uint8 or v.shape != want:
            raise ValueError(f"expected a uint8 tensor of shape {tuple(want)}, got "
                             f"{tuple(v.shape)} {v.dtype}")
        try:
            g = torch.Generator()
            g.set_state(v.contiguous())
            torch.rand(1, generator=g)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"not a valid generator state: {clip(str(e), 120)}") from None
        return v

    @field_validator("fingerprint")
    @classmethod
    def _fingerprint(cls, v: str) -> str:
        try:
            data = json.loads(v)
        except (ValueError, RecursionError):
            raise ValueError("not JSON text") from None
        if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(x, _SCALARS) for k, x in data.items()):
            raise ValueError("expected a JSON mapping of field paths to scalars")
        return v


def _field_problem(err: Mapping[str, Any]) -> str:
    """One pydantic error as ``field <name>: <what> (got <value>)``, the value shortened."""
    loc = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if err.get("type") == "missing":
        return f"field {loc}: required field is missing"
    if err.get("type") == "extra_forbidden":
        return f"field {loc}: unknown field"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, torch.Tensor)) else f" (got {shorten(got)})"
    return f"field {loc}: {msg}{shown}"


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: obj}


def fingerprint(cfg: Config) -> dict[str, Any]:
    """The config fields that determine the model's trajectory, flattened to dotted paths."""
    data = cfg.model_dump(mode="json")
    for w in data["workers"]:
        for k in _WORKER_VOLATILE:
            w.pop(k, None)
    flat = _flatten(data)
    for key in list(flat):
        for v in VOLATILE:
            if key == v or (v.endswith("*") and key.startswith(v[:-1])):
                del flat[key]
                break
    return flat


@dataclass(frozen=True)
class Checkpoint:
    """What the PS needs to continue a run.

    Attributes:
        round: the next round to run (rounds 0..round-1 are done).
        state: ``(1 + k, d)`` float32 [theta, the optimizer's rows]
            (:meth:`byzps.replica.Replica.state`); the optimizer's step count is ``round``.
        aggregator_state: the aggregator's ``state_dict()`` (e.g. centered clipping's centre).
        rng_state: torch's global CPU RNG state (uint8 tensor).
        fingerprint: see :func:`fingerprint`.
    """

    round: int
    state: torch.Tensor
    aggregator_state: dict
    rng_state: torch.Tensor
    fingerprint: dict[str, Any]


def save(folder: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically as ``folder/latest.pt``; returns the path.

    Raises:
        OSError: the folder or file cannot be written (no temporary file is left behind).
        RuntimeError: torch's file writer failed (e.g. no file descriptor left).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILENAME
    tmp = folder / f".{FILENAME}.{os.getpid()}.tmp"
    try:
        torch.save({"format": FORMAT, "round": ckpt.round, "state": ckpt.state,
                    "aggregator_state": ckpt.aggregator_state, "rng_state": ckpt.rng_state,
                    "fingerprint": json.dumps(ckpt.fingerprint, sort_keys=True)}, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)   # a half-written file must not stay behind
        except OSError:
            pass
        raise
    return path


def load(folder: str | Path, cfg: Config, d: int, rows: int = 2) -> Checkpoint:
    """Read ``folder/latest.pt``, validate every field, and check that it belongs to ``cfg``.

    Args:
        folder: the checkpoint folder.
        cfg: the config of the run to resume.
        d: the model size.
        rows: rows of the state tensor (:attr:`byzps.replica.Replica.state_rows`).

    Raises:
        CheckpointError: missing or unreadable file, not a regular file, larger than
            :func:`max_checkpoint_bytes`, wrong format, a field that fails
            :class:`CheckpointFields` (the message names it: missing ``fingerprint``,
            ``round: inf``, a garbage ``rng_state``, ...), or a config whose fingerprint
            differs (the message names each differing field).
    """
    path = Path(folder) / FILENAME
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: run without --resume first, with "
                              f"training.checkpoint_every > 0")
    limit = max_checkpoint_bytes(d)
    try:
        with open_checked(path, limit, "checkpoint") as fh:
            blob = read_limited(fh, limit, f"checkpoint {path}")
    except FileRefused as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        raw = torch.load(io.BytesIO(blob), weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path}: unreadable checkpoint: {clip(str(e), 300)}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a byzps checkpoint of format {FORMAT}")
    try:
        fields = CheckpointFields.model_validate(raw, context={"d": d, "rows": rows})
    except ValidationError as e:
        raise CheckpointError(f"{path}: " + "; ".join(_field_problem(err)
                                                      for err in e.errors()[:8])) from None
    saved = json.loads(fields.fingerprint)
    now = fingerprint(cfg)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        shown = "; ".join(f"{clip(k, 80)}: checkpoint {shorten(saved.get(k))}, config "
                          f"{shorten(now.get(k))}" for k in diff[:8])
        raise CheckpointError(f"{path} was written by a different config ({shown})")
    return Checkpoint(fields.round, fields.state, fields.aggregator_state, fields.rng_state,
                      saved)
