"""Reading files the PS is told to read, with bounds: file type, size, YAML aliases, echoes.

Every file a config names (the config itself, ``server.secrets_file``, the TLS files, a
checkpoint, a grid file) and every MNIST file is opened through :func:`open_checked`:

* it must be a **regular file** (after following symlinks): ``/dev/zero``, a FIFO, a socket or a
  folder is refused before a byte is read, so a path can never make the PS read forever;
* its size must be at most the caller's cap, checked on the opened descriptor (``fstat``, no
  race between the check and the read), and :func:`read_file` stops one byte past the cap
  even if the file grows while it is read.

YAML is parsed with :class:`NoAliasLoader`, a ``yaml.SafeLoader`` that refuses aliases
(``*name``): nested aliases expand exponentially ("billion laughs"; a 600-byte document can
stand for gigabytes of nodes), and no file of this project needs them.

:func:`shorten` bounds any value an error message echoes.

Imports nothing of byzps (a leaf: config, auth, checkpoint, data, grid and transport use it).
"""

from __future__ import annotations

import io
import os
import stat
from typing import Any, BinaryIO, Union

import yaml

#: cap on a config file (YAML or JSON), bytes
MAX_CONFIG_BYTES = 1 << 20
#: cap on a key file (``server.secrets_file``), bytes
MAX_SECRETS_BYTES = 1 << 20
#: cap on each TLS file (certificate chain, private key, CA bundle), bytes
MAX_TLS_BYTES = 1 << 20
#: cap on a grid file (``byzps grid``), bytes
MAX_GRID_BYTES = 1 << 20
#: longest value an error message shows (characters, before the ellipsis)
ECHO_CHARS = 80

PathLike = Union[str, os.PathLike]


class FileRefused(ValueError):
    """A file that must not be read: not a regular file, or larger than its cap. The message
    names the file, what it is, and the limit."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (pipe)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_checked(path: PathLike, max_bytes: int, what: str = "file") -> BinaryIO:
    """Open ``path`` for binary reading after checking, on the opened descriptor, that it is
    a regular file of at most ``max_bytes`` bytes.

    Opening uses ``O_NONBLOCK`` so that a FIFO cannot block the open; the flag is cleared
    again for a regular file.

    Args:
        path: the file (symlinks are followed; the target is what is checked).
        max_bytes: the largest size accepted, in bytes.
        what: how error messages name the file (e.g. ``"server.secrets_file"``).

    Returns:
        an open binary file object positioned at 0; the caller closes it.

    Raises:
        FileRefused: not a regular file (``/dev/zero``, a FIFO, a folder, ...) or larger than
            ``max_bytes``.
        OSError: the file cannot be opened (missing, no permission, ...).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{what} {path}: is {_kind(st.st_mode)}; expected a regular file")
        if st.st_size > max_bytes:
            raise FileRefused(f"{what} {path}: {st.st_size} bytes, more than the limit of "
                              f"{max_bytes} bytes")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_limited(fh: BinaryIO, max_bytes: int, what: str = "file") -> bytes:
    """Read ``fh`` to its end, refusing more than ``max_bytes`` bytes (a file that grows while
    it is read, or a stream).

    Raises:
        FileRefused: more than ``max_bytes`` bytes.
    """
    buf = io.BytesIO()
    while True:
        chunk = fh.read(min(1 << 20, max_bytes + 1 - buf.tell()))
        if not chunk:
            return buf.getvalue()
        buf.write(chunk)
        if buf.tell() > max_bytes:
            raise FileRefused(f"{what}: more than the limit of {max_bytes} bytes")


def read_file(path: PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them.

    Raises:
        FileRefused: not a regular file, or larger than ``max_bytes`` (also if it grew).
        OSError: the file cannot be opened or read.
    """
    with open_checked(path, max_bytes, what) as fh:
        return read_limited(fh, max_bytes, f"{what} {path}")


def read_text(path: PathLike, max_bytes: int, what: str = "file") -> str:
    """:func:`read_file` decoded as UTF-8.

    Raises:
        FileRefused, OSError: see :func:`read_file`.
        UnicodeDecodeError: not UTF-8.
    """
    return read_file(path, max_bytes, what).decode("utf-8")


def check_file(path: PathLike, max_bytes: int, what: str = "file") -> None:
    """Check that ``path`` is a regular file of at most ``max_bytes`` bytes, for files read
    by a library that takes a path (``ssl``'s certificate chain and key).

    Raises:
        FileRefused, OSError: see :func:`open_checked`.
    """
    open_checked(path, max_bytes, what).close()


def shorten(value: Any, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters with an ellipsis, for error messages that
    echo what a file or peer supplied. Never builds the repr of a huge container or string."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        value = value[:limit + 1]
    if isinstance(value, (dict, list, tuple, set)) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        text = repr(value)
    except ValueError:   # an int with more digits than str() may convert
        return f"<{type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[:limit] + "…"


class NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (``*name``, also in ``<<: *name`` merges).

    Raises (from ``yaml.load``):
        yaml.composer.ComposerError: the document uses an alias; the message names its line.
    """

    def compose_node(self, parent, index):  # noqa: D401 - PyYAML's hook
        """Compose the next node, refusing an alias event before it is resolved."""
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML alias *{shorten(event.anchor, 40)[1:-1]} at line "
                f"{event.start_mark.line + 1}: aliases are not allowed (nested aliases can "
                f"expand without bound); write the value out", event.start_mark)
        return super().compose_node(parent, index)


def load_yaml(text: str, loader: type = NoAliasLoader) -> Any:
    """Parse one YAML document with ``loader`` (default :class:`NoAliasLoader`).

    Raises:
        yaml.YAMLError: not valid YAML, or an alias.
    """
    return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters plus an ellipsis when longer (error messages)."""
    return text if len(text) <= limit else text[:limit] + "…"


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of ``str(err)`` (or the exception's type name), cut to ``limit``."""
    text = str(err)
    return clip(text.splitlines()[0] if text else type(err).__name__, limit)

