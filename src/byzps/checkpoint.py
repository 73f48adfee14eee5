"""PS checkpoints: atomic write, safe load, and a config fingerprint that refuses mismatches.

A checkpoint is a ``torch.save`` of plain tensors and Python scalars, read back with
``torch.load(weights_only=True)`` (which constructs no arbitrary objects). It is written to a
temporary file in the same folder and renamed over ``latest.pt``, so a crash mid-write leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from byzps.config import Config

FORMAT = 1
FILENAME = "latest.pt"

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
        state: ``(2, d)`` float32 [theta, SGD momentum buffer].
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
        OSError: the folder or file cannot be written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILENAME
    tmp = folder / f".{FILENAME}.{os.getpid()}.tmp"
    torch.save({"format": FORMAT, "round": ckpt.round, "state": ckpt.state,
                "aggregator_state": ckpt.aggregator_state, "rng_state": ckpt.rng_state,
                "fingerprint": json.dumps(ckpt.fingerprint, sort_keys=True)}, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load(folder: str | Path, cfg: Config, d: int) -> Checkpoint:
    """Read ``folder/latest.pt`` and check that it belongs to ``cfg``.

    Args:
        folder: the checkpoint folder.
        cfg: the config of the run to resume.
        d: the model size.

    Raises:
        CheckpointError: missing or unreadable file, wrong format, wrong tensor shapes, or a
            config whose fingerprint differs (the message names each differing field).
    """
    path = Path(folder) / FILENAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: run without --resume first, with "
                              f"training.checkpoint_every > 0")
    try:
        raw = torch.load(path, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path}: unreadable checkpoint: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a byzps checkpoint of format {FORMAT}")
    saved = json.loads(raw["fingerprint"])
    now = fingerprint(cfg)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, config {now.get(k)!r}"
                          for k in diff[:8])
        raise CheckpointError(f"{path} was written by a different config ({shown})")
    state = raw["state"]
    if not isinstance(state, torch.Tensor) or state.shape != (2, d) or \
            state.dtype != torch.float32:
        raise CheckpointError(f"{path}: model state is not (2, {d}) float32")
    return Checkpoint(int(raw["round"]), state, raw["aggregator_state"], raw["rng_state"], saved)
