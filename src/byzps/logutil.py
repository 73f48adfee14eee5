"""Rate-limited logging for messages a peer can trigger at will.

A Byzantine worker or a stranger chooses how often the PS meets a bad gradient, a RESYNC flood
or a refused connection; logging each one would let it fill the disk and drown the useful
lines. :class:`RateLimitedLog` lets through at most ``burst`` lines per key and ``interval``
seconds, counts the rest, and says how many were left out in the next line it lets through for
that key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any


class RateLimitedLog:
    """At most ``burst`` log lines per key per ``interval`` seconds.

    Args:
        logger: where the lines go.
        interval: window length in seconds (> 0).
        burst: lines let through per key and window (>= 1).
        max_keys: keys remembered at most; beyond that the oldest windows are forgotten (keys
            come from bounded sets such as (worker id, reason), this only caps a misuse).
        clock: monotonic seconds (tests pass a fake one).

    Raises:
        ValueError: ``interval <= 0``, ``burst < 1`` or ``max_keys < 1``.
    """

    def __init__(self, logger: logging.Logger, interval: float = 30.0, burst: int = 3,
                 max_keys: int = 4096, clock: Callable[[], float] = time.monotonic):
        if interval <= 0 or burst < 1 or max_keys < 1:
            raise ValueError(f"need interval > 0, burst >= 1, max_keys >= 1; got {interval}, "
                             f"{burst}, {max_keys}")
        self.logger = logger
        self.interval = float(interval)
        self.burst = int(burst)
        self.max_keys = int(max_keys)
        self._clock = clock
        #: key -> [window start, lines let through in the window, lines left out since the
        #: last line let through]
        self._windows: dict[Hashable, list] = {}

    def log(self, level: int, key: Hashable, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` used up its lines in this window.

        Returns:
            True if the line was logged, False if it was only counted.
        """
        now = self._clock()
        w = self._windows.get(key)
        if w is None or now - w[0] >= self.interval:
            if w is None and len(self._windows) >= self.max_keys:
                self._windows.pop(next(iter(self._windows)))
            w = self._windows[key] = [now, 0, 0 if w is None else w[2]]
        if w[1] >= self.burst:
            w[2] += 1
            return False
        w[1] += 1
        if w[2]:
            msg += " (%d similar lines left out)"
            args = (*args, w[2])
            w[2] = 0
        self.logger.log(level, msg, *args)
        return True

    def flush(self, level: int = logging.WARNING) -> None:
        """Log, once for each key that has some, how many lines were left out since that key's
        last line (e.g. at shutdown, when no later line of the key would say it)."""
        for key, w in self._windows.items():
            if w[2]:
                self.logger.log(level, "%s: %d similar lines left out", key, w[2])
                w[2] = 0
