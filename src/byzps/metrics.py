"""Per-round metric records and a JSON Lines writer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class JsonlWriter:
    """Append one JSON object per line to ``path`` (created with its parent folders).

    Non-finite floats are written as ``null`` so every line is strict JSON. Each record is
    flushed at once, so a crashed run keeps every finished round.

    Args:
        path: file path, or None for a writer that drops everything.

    Raises:
        OSError: the file cannot be created.
    """

    def __init__(self, path: Optional[str | Path]):
        self._fh = None
        if path is not None:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            self._fh = p.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (a JSON-serialisable mapping) as one line."""
        if self._fh is not None:
            self._fh.write(json.dumps(_clean(record), sort_keys=True) + "\n")
            self._fh.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
