"""The progress display of the ``byzps`` command (``run``, ``simulate``, ``grid``): one library,
tqdm, for every bar.

On a terminal a :class:`Progress` is a tqdm bar (redrawn in place, with a status text after
it) and its :meth:`Progress.line` prints above the bar; on anything else (a pipe, a log file,
a test's ``io.StringIO``) there is no bar and each :meth:`Progress.line` is one plain line.
"""

from __future__ import annotations

from typing import Any, Optional, TextIO

from tqdm import tqdm


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (has ``isatty()`` returning True)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty()) if callable(isatty) else False


class Progress:
    """Progress over ``total`` units (rounds or grid cells).

    Args:
        total: units to do (> 0).
        stream: where it goes (a text stream).
        unit: the unit's name in the bar (``round``, ``cell``).
        initial: units already done (a resumed run).

    Attributes:
        tty: whether ``stream`` is a terminal (a bar is drawn) or not (plain lines only).
    """

    def __init__(self, total: int, stream: TextIO, unit: str = "round", initial: int = 0):
        self.stream = stream
        self.total = total
        self.tty = is_terminal(stream)
        self._bar: Optional[tqdm] = None
        if self.tty:
            self._bar = tqdm(total=total, initial=initial, unit=unit, file=stream,
                             dynamic_ncols=True, leave=True,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {postfix}")

    def advance_to(self, done: int, status: str = "") -> None:
        """Show ``done`` of ``total`` units and ``status`` after the bar (terminal only)."""
        if self._bar is None:
            return
        self._bar.n = max(0, min(done, self.total))
        self._bar.set_postfix_str(status, refresh=False)
        self._bar.refresh()

    def line(self, text: str) -> None:
        """Print ``text`` as a line of its own (above the bar on a terminal)."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar (terminal only); the stream stays open."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
