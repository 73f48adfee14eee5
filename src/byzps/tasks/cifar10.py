"""The ``cifar10`` built-in task: CIFAR-10 (Krizhevsky 2009, "Learning multiple layers of
features from tiny images"), 50,000 training and 10,000 test colour images ``(3, 32, 32)`` in
10 classes, with ResNet-20 (He et al. 2016) or a small CNN.

Only the *binary version* is read, never the pickled "python version" (unpickling a file runs
arbitrary code). Its format: each of ``data_batch_1.bin`` .. ``data_batch_5.bin`` and
``test_batch.bin`` is a sequence of 3,073-byte records: one label byte (0..9), then 1,024 red,
1,024 green and 1,024 blue bytes of a 32 x 32 image in row-major order. The official files hold
10,000 records each; the reader accepts 1..10,000 whole records per file (so tests can write
small files) and refuses anything else, and labels outside 0..9, naming the file.

Where the files are found:

1. ``DATA_ROOT/cifar-10-batches-bin/``;
2. the official archive ``DATA_ROOT/cifar-10-binary.tar.gz`` (downloaded there from the
   authors' page if absent and ``download`` is on), accepted only with the published md5
   :data:`ARCHIVE_MD5`; only the six expected regular files are extracted from it, each at
   most 10,000 records long, whatever else the archive holds.

Images are kept as uint8 (150 MB for the training set) and normalised per batch to
``(p / 255 - mean) / std`` per channel. No data augmentation: a worker's minibatch must be a
pure function of the seed and the round on every replica, and random crops or flips would need
their own seeded stream (not built yet).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch import nn

from byzps.data import DatasetNotFound, IdxFormatError
from byzps.safeio import FileRefused, open_checked
from byzps.task import LabeledTensors, Task

log = logging.getLogger(__name__)

#: Bytes of one record: the label, then 3 x 32 x 32 pixels.
RECORD_BYTES = 1 + 3 * 32 * 32
#: Records of one official batch file; a file may hold at most this many.
MAX_RECORDS = 10_000
FOLDER = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{k}.bin" for k in range(1, 6))
TEST_FILES = ("test_batch.bin",)
ARCHIVE = "cifar-10-binary.tar.gz"
#: The official archive's address and md5 (from the dataset's page).
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
#: The official archive is 170,052,171 bytes; a download is cut off past this many.
MAX_ARCHIVE_BYTES = 200_000_000
#: Per-channel mean and standard deviation of the training pixels in [0, 1].
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

_NUM_CLASSES = 10


class CifarFormatError(IdxFormatError):
    """A CIFAR-10 file or archive that is not what the binary version holds (wrong length,
    label out of range, bad md5, unexpected archive member); the message names the file. A
    subclass of :class:`byzps.data.IdxFormatError` so that the command line reports it as a
    data error."""


def read_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one binary-version batch file.

    Args:
        path: a ``*.bin`` file of 1..:data:`MAX_RECORDS` records of :data:`RECORD_BYTES`.

    Returns:
        ``(m, 3, 32, 32)`` uint8 images (channels red, green, blue) and ``(m,)`` uint8 labels.

    Raises:
        CifarFormatError: a length that is not a whole number of records, too many records,
            or a label outside 0..9.
        OSError: the file cannot be read.
    """
    path = Path(path)
    try:   # a regular file only: a FIFO or device would be read without end
        fh = open_checked(path, MAX_RECORDS * RECORD_BYTES, "CIFAR-10 batch")
    except FileRefused as e:
        raise CifarFormatError(str(e)) from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0 or size % RECORD_BYTES or size // RECORD_BYTES > MAX_RECORDS:
            raise CifarFormatError(f"{path}: {size} bytes is not 1..{MAX_RECORDS} whole "
                                   f"records of {RECORD_BYTES} bytes (CIFAR-10 binary version)")
        raw = fh.read(size + 1)
    if len(raw) != size:
        raise CifarFormatError(f"{path}: changed size while being read")
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = rec[:, 0].copy()
    if int(labels.max()) >= _NUM_CLASSES:
        k = int(np.argmax(labels >= _NUM_CLASSES))
        raise CifarFormatError(f"{path}: record {k} has label {int(labels[k])}, expected "
                               f"0..{_NUM_CLASSES - 1}")
    images = rec[:, 1:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def _md5_of(path: Path) -> str:
    h = hashlib.md5()
    try:   # a regular file of a bounded size only (a symlink to /dev/zero never ends)
        fh = open_checked(path, MAX_ARCHIVE_BYTES, "CIFAR-10 archive")
    except FileRefused as e:
        raise CifarFormatError(str(e)) from None
    with fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract_archive(archive: str | Path, root: str | Path, md5: str = ARCHIVE_MD5) -> Path:
    """Check the archive's md5 and extract the six batch files into ``root/cifar-10-batches-bin``.

    Only the members ``cifar-10-batches-bin/<name>`` for the names in :data:`TRAIN_FILES` and
    :data:`TEST_FILES` are read, each only if it is a regular file of at most
    ``MAX_RECORDS * RECORD_BYTES`` bytes; nothing else in the archive is written anywhere
    (no paths from the archive are used). Each file is written to a temporary name and renamed.

    Args:
        archive: the ``.tar.gz``.
        root: the data root.
        md5: expected md5 of the archive (the official one by default).

    Returns:
        the folder holding the six files.

    Raises:
        CifarFormatError: wrong md5, a missing or oversized member, or not a gzip tar.
        OSError: cannot read or write.
    """
    archive, target = Path(archive), Path(root) / FOLDER
    got = _md5_of(archive)
    if got != md5:
        raise CifarFormatError(f"{archive}: md5 {got}, expected {md5} (the official CIFAR-10 "
                               f"binary archive); delete it and download it again")
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tf:
            for name in TRAIN_FILES + TEST_FILES:
                try:
                    member = tf.getmember(f"{FOLDER}/{name}")
                except KeyError:
                    raise CifarFormatError(f"{archive}: no member {FOLDER}/{name}") from None
                if not member.isreg() or member.size > MAX_RECORDS * RECORD_BYTES:
                    raise CifarFormatError(f"{archive}: {FOLDER}/{name} is not a regular file "
                                           f"of at most {MAX_RECORDS * RECORD_BYTES} bytes")
                src = tf.extractfile(member)
                assert src is not None   # a regular member always has a file object
                tmp = target / f".{name}.{os.getpid()}.tmp"
                with src, open(tmp, "wb") as out:
                    out.write(src.read(member.size))
                os.replace(tmp, target / name)
    except tarfile.TarError as e:
        raise CifarFormatError(f"{archive}: not a readable .tar.gz: {e}") from None
    return target


def download_archive(root: str | Path, url: str = ARCHIVE_URL) -> Path:
    """Download the official archive into ``root`` (at most :data:`MAX_ARCHIVE_BYTES`, to a
    temporary name renamed when complete). The caller checks the md5 (:func:`extract_archive`).

    Raises:
        OSError: the download failed or was too large.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path, tmp = root / ARCHIVE, root / f".{ARCHIVE}.{os.getpid()}.tmp"
    total = 0
    with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
        for chunk in iter(lambda: resp.read(1 << 20), b""):
            total += len(chunk)
            if total > MAX_ARCHIVE_BYTES:
                out.close()
                tmp.unlink()
                raise OSError(f"{url}: more than {MAX_ARCHIVE_BYTES} bytes; not the CIFAR-10 "
                              f"archive")
            out.write(chunk)
    os.replace(tmp, path)
    return path


def locate(root: str | Path, download: bool = True) -> Path:
    """The folder holding the six batch files, in the module docstring's order.

    Raises:
        DatasetNotFound: no folder, no archive, and no (successful) download.
        CifarFormatError: an archive with the wrong md5 or content.
    """
    root = Path(root)
    folder = root / FOLDER
    if all((folder / n).is_file() for n in TRAIN_FILES + TEST_FILES):
        return folder
    archive = root / ARCHIVE
    if not archive.is_file() and download:
        try:
            log.warning("CIFAR-10 not in %s; downloading %s", root, ARCHIVE_URL)
            download_archive(root)
        except OSError as e:
            log.warning("download of %s failed: %s", ARCHIVE_URL, e)
    if archive.is_file():
        return extract_archive(archive, root)
    raise DatasetNotFound(
        f"CIFAR-10 not found: expected the binary version's folder {folder} (data_batch_1.bin "
        f".. data_batch_5.bin, test_batch.bin) or the archive {archive} (from {ARCHIVE_URL}, "
        f"md5 {ARCHIVE_MD5}); the pickled python version is not read")


def normalise(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 32, 32)`` uint8 -> float32 ``(p / 255 - mean) / std`` per channel, computed as
    ``(p - 255 mean) / (255 std)`` with tensor operands (exactly the same per item and per
    batch)."""
    mean = torch.tensor([255.0 * m for m in CIFAR_MEAN], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor([255.0 * s for s in CIFAR_STD], dtype=torch.float32).view(1, 3, 1, 1)
    return (images.to(torch.float32) - mean) / std


# ---------------------------------------------------------------------------------------------
# Models


class _PadShortcut(nn.Module):
    """He et al. 2016's option A shortcut: keep every other pixel and pad the new channels with
    zeros (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return nn.functional.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a ReLU between and after the residual sum."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = _PadShortcut(cout - cin) if stride != 1 or cin != cout \
            else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """The CIFAR-10 ResNet of He et al. 2016 ("Deep residual learning for image recognition",
    Sec. 4.2): a 3x3 conv with 16 filters, then three stages of ``blocks`` basic blocks with 16,
    32 and 64 filters on 32x32, 16x16 and 8x8 maps (stride-2 first conv of stages 2 and 3),
    BatchNorm after every conv, parameter-free option A shortcuts, global average pooling and a
    10-way linear layer: 6 * blocks + 2 layers. Convolutions are initialised as in He et al.
    2015 (normal, std sqrt(2 / fan_in)).

    Args:
        blocks: basic blocks per stage (3 gives ResNet-20: 269,722 parameters).
        num_classes: outputs C.

    Input ``(B, 3, 32, 32)`` float32, output ``(B, C)`` logits.
    """

    def __init__(self, blocks: int = 3, num_classes: int = _NUM_CLASSES):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for k in range(blocks):
                layers.append(_BasicBlock(cin, cout, stride if k == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.conv(x)))
        out = self.blocks(out)
        return self.fc(out.mean(dim=(2, 3)))


def resnet20() -> nn.Module:
    """ResNet-20 for CIFAR-10 (:class:`ResNetCifar` with 3 blocks per stage; 269,722
    parameters; 19 BatchNorm layers, each with buffers running mean, running variance and a
    batch counter)."""
    return ResNetCifar(blocks=3)


def cnn_cifar() -> nn.Module:
    """A small CNN for ``(B, 3, 32, 32)`` inputs: conv 32@3x3, pool, conv 64@3x3, pool,
    fc 128, fc 10 (545,098 parameters, no buffers)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, _NUM_CLASSES),
    )


_MODELS = {"resnet20": resnet20, "cnn_cifar": cnn_cifar}


class Cifar10Task(Task):
    """CIFAR-10, binary version (see the module docstring).

    Args:
        model: ``resnet20`` (default) or ``cnn_cifar``.
        data_root: the folder holding ``cifar-10-batches-bin/`` or the archive.
        download: whether the official archive may be downloaded when neither is there.

    Raises:
        ValueError: unknown model.
        byzps.data.DatasetNotFound, CifarFormatError: from :meth:`train_data` /
            :meth:`test_data`.
    """

    MODELS = tuple(_MODELS)

    def __init__(self, model: str = "resnet20", data_root: str = "data", download: bool = True):
        if model not in _MODELS:
            raise ValueError(f"unknown model {model!r} for cifar10; expected one of "
                             f"{', '.join(sorted(_MODELS))}")
        self.model = model
        self.data_root = data_root
        self.download = download
        self._splits: dict[str, LabeledTensors] = {}

    def build_model(self) -> nn.Module:
        """The named model, weights from torch's global RNG (byzps seeds it)."""
        return _MODELS[self.model]()

    def _split(self, files: tuple[str, ...]) -> LabeledTensors:
        key = files[0]
        if key not in self._splits:
            folder = locate(self.data_root, self.download)
            parts = [read_batch(folder / n) for n in files]
            images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
            labels = torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64))
            self._splits[key] = LabeledTensors(images, labels, transform=normalise)
        return self._splits[key]

    def train_data(self) -> LabeledTensors:
        """The five training batches: uint8 images normalised per batch to float32
        ``(3, 32, 32)``, int64 labels (loaded once)."""
        return self._split(TRAIN_FILES)

    def test_data(self) -> LabeledTensors:
        """``test_batch.bin``, as :meth:`train_data`."""
        return self._split(TEST_FILES)
