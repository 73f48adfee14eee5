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
import json
import os
import stat
from collections.abc import Iterator
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


def iter_lines(path: PathLike, max_bytes: int, max_line_bytes: int,
               what: str = "file") -> Iterator[tuple[int, bytes]]:
    """The lines of the regular file ``path`` (without their newline), read in chunks, so
    memory stays bounded by ``max_line_bytes`` whatever the file holds. A last line without a
    newline is yielded too (a caller following a growing file uses :class:`LineFollower`).

    Yields:
        ``(line number from 1, bytes of the line)``.

    Raises:
        FileRefused: not a regular file, larger than ``max_bytes`` (also if it grows past it
            while read), or a line longer than ``max_line_bytes`` (the message names the file
            and the line number).
        OSError: the file cannot be opened or read.
    """
    with open_checked(path, max_bytes, what) as fh:
        buf = b""
        number, total = 0, 0
        while True:
            chunk = fh.read(1 << 20)
            total += len(chunk)
            if total > max_bytes:
                raise FileRefused(f"{what} {path}: more than the limit of {max_bytes} bytes")
            if not chunk:
                if buf:
                    yield number + 1, buf
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                number += 1
                if len(line) > max_line_bytes:
                    raise FileRefused(f"{what} {path}: line {number} is longer than the limit "
                                      f"of {max_line_bytes} bytes")
                yield number, line
            if len(buf) > max_line_bytes:
                raise FileRefused(f"{what} {path}: line {number + 1} is longer than the limit "
                                  f"of {max_line_bytes} bytes")


class LineFollower:
    """The complete lines appended to a growing file since the last call, read from the last
    offset (a file someone else is writing, e.g. the PS's ``metrics.jsonl``): each call costs
    what was appended, not the whole file.

    A last line without its newline waits for the next call. A line longer than
    ``max_line_bytes`` is skipped (up to its newline) and counted in :attr:`skipped`, so a
    hostile or broken writer cannot make the reader hold more than ``max_line_bytes``. A file
    that shrank (replaced by a new one) is read again from its start.

    Args:
        path: the file (it need not exist yet).
        max_line_bytes: the longest line kept, bytes.
        max_read: most bytes read per call (the rest waits for the next call).
    """

    def __init__(self, path: PathLike, max_line_bytes: int, max_read: int = 16 << 20) -> None:
        self.path = path
        self.max_line_bytes = max_line_bytes
        self.max_read = max_read
        self.offset = 0
        self.skipped = 0
        self._partial = b""
        self._skipping = False

    def read_new(self) -> list[bytes]:
        """The complete lines appended since the last call (without newlines; possibly none).

        Raises:
            FileRefused: the path is not a regular file.
            OSError: it exists but cannot be read.
        """
        try:
            fh = open_checked(self.path, 1 << 62, "file")
        except FileNotFoundError:
            return []
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size < self.offset:      # replaced or truncated: start again
                self.offset, self._partial, self._skipping = 0, b"", False
            fh.seek(self.offset)
            data = fh.read(min(self.max_read, size - self.offset))
        self.offset += len(data)
        out = []
        *lines, rest = (self._partial + data).split(b"\n")
        for line in lines:
            if self._skipping or len(line) > self.max_line_bytes:
                self.skipped += 1
                self._skipping = False
                continue
            out.append(line)
        if len(rest) > self.max_line_bytes:
            self._skipping, rest = True, b""
        elif self._skipping:
            rest = b""
        self._partial = rest
        return out


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
    """``yaml.SafeLoader`` that refuses aliases (``*name``, also in ``<<: *name`` merges) and
    duplicate keys in a mapping (``training:`` twice would otherwise be merged silently, the
    last one winning).

    Raises (from ``yaml.load``):
        yaml.composer.ComposerError: the document uses an alias; the message names its line.
        yaml.constructor.ConstructorError: a key appears twice in one mapping; the message
            names the key and both lines.
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

    def construct_mapping(self, node, deep=False):  # noqa: D401 - PyYAML's hook
        """Construct a mapping, refusing a key that appears twice in it (PyYAML would keep
        the last one silently)."""
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:   # an unhashable key: the base class says so
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {shorten(key, 40)} at line {line} (first "
                        f"at line {first}); each key may appear once in a mapping",
                        key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, loader: type = NoAliasLoader) -> Any:
    """Parse one YAML document with ``loader`` (default :class:`NoAliasLoader`).

    Raises:
        yaml.YAMLError: not valid YAML, an alias, or a duplicate key.
    """
    return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass


class DuplicateKey(ValueError):
    """A JSON object with a key twice (:func:`load_json`); the message names the key."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(f"duplicate key {shorten(k, 40)}; each key may appear once in "
                               f"an object")
        out[k] = v
    return out


def load_json(text: str) -> Any:
    """Parse JSON, refusing an object with a key twice (``json.loads`` keeps the last).

    Raises:
        json.JSONDecodeError: not valid JSON.
        DuplicateKey: a key appears twice in one object.
        ValueError: a number too long to convert (more than 4300 digits).
    """
    return json.loads(text, object_pairs_hook=_unique_pairs)


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters plus an ellipsis when longer (error messages)."""
    return text if len(text) <= limit else text[:limit] + "…"


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of ``str(err)`` (or the exception's type name), cut to ``limit``."""
    text = str(err)
    return clip(text.splitlines()[0] if text else type(err).__name__, limit)

