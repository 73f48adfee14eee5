"""The 28 x 28 grey-scale built-in tasks: ``mnist`` (LeCun et al. 1998) and ``fashion_mnist``
(Xiao, Rasul & Vollgraf 2017, "Fashion-MNIST: a novel image dataset for benchmarking machine
learning algorithms"), with the models of :mod:`byzps.models`.

Both read LeCun's IDX format with :func:`byzps.data.parse_idx` (which checks the header against
the file's length) and normalise pixels to ``(p / 255 - mean) / std`` with their training set's
statistics. ``mnist`` is today's job: the same files, arrays and models, so a config without
``task`` and one with ``task: {ref: mnist}`` build bit-identical replicas and batches.

Where ``fashion_mnist`` finds its four files (``train-images-idx3-ubyte.gz`` etc.):

1. the data root: ``DATA_ROOT``, ``DATA_ROOT/FashionMNIST/raw`` (torchvision's layout),
   ``DATA_ROOT/fashion-mnist``, ``DATA_ROOT/fashion_mnist``;
2. the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``),
   which installs them in ``/usr/share/datasets/fashion-mnist/`` (recompressed: its .gz
   files differ byte-wise from the official ones, so they are checked by shape, not md5);
3. the official files from Zalando's download site, kept only if their md5 is the published
   one, saved into ``DATA_ROOT/FashionMNIST/raw``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from byzps import data, models
from byzps.data import DatasetNotFound, IdxFormatError
from byzps.task import LabeledTensors, Task

#: Fashion-MNIST's files: stem -> (md5 of the official .gz, shape; None = any count).
FASHION_FILES = {
    "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", (None, 28, 28)),
    "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", (None,)),
    "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", (None, 28, 28)),
    "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83fd310", (None,)),
}
#: The official download site (Xiao et al. 2017's repository README).
FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
DEBIAN_FASHION_FOLDER = Path("/usr/share/datasets/fashion-mnist")
#: Mean and standard deviation of Fashion-MNIST's 60,000 training images' pixels in [0, 1]
#: (computed from the files: 0.28604, 0.35302).
FASHION_MEAN = 0.2860
FASHION_STD = 0.3530

_NUM_CLASSES = 10


class MnistTask(Task):
    """MNIST: 60,000 training and 10,000 test images ``(1, 28, 28)``, 10 classes.

    Args:
        model: one of :func:`byzps.models.model_names` (default ``cnn_mnist``).
        data_root: the folder searched first (see :mod:`byzps.data`).
        download: whether the public mirrors may be tried as a last resort.

    Raises:
        ValueError: unknown model.
        byzps.data.DatasetNotFound / IdxFormatError: from :meth:`train_data` / :meth:`test_data`
            when no usable copy exists.
    """

    MODELS = tuple(models.model_names())

    def __init__(self, model: str = "cnn_mnist", data_root: str = "data",
                 download: bool = True):
        self.build = models.builder(model)
        self.model = model
        self.data_root = data_root
        self.download = download
        self._splits: dict[str, LabeledTensors] = {}

    def build_model(self) -> nn.Module:
        """The named model, weights from torch's global RNG (byzps seeds it)."""
        return self.build()

    def _load(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        m = data.load_mnist(self.data_root, download=self.download, parts=(part,))
        return (m.train_images, m.train_labels) if part == "train" else \
            (m.test_images, m.test_labels)

    def _split(self, part: str, mean: float, std: float) -> LabeledTensors:
        if part not in self._splits:
            images, labels = self._load(part)
            self._splits[part] = LabeledTensors(*data.to_tensors(images, labels, mean, std))
        return self._splits[part]

    def train_data(self) -> LabeledTensors:
        """``(m, 1, 28, 28)`` float32 normalised images and int64 labels (loaded once)."""
        return self._split("train", data.MNIST_MEAN, data.MNIST_STD)

    def test_data(self) -> LabeledTensors:
        """The 10,000 test images, as :meth:`train_data`."""
        return self._split("t10k", data.MNIST_MEAN, data.MNIST_STD)


class FashionMnistTask(MnistTask):
    """Fashion-MNIST (Xiao et al. 2017): MNIST's format and sizes, 10 classes of clothing;
    the MNIST models apply unchanged. See the module docstring for where the files are found.

    Args:
        model, data_root, download: as :class:`MnistTask`.

    Raises:
        ValueError: unknown model.
        byzps.data.DatasetNotFound: no copy found (the message says what to install).
        byzps.data.IdxFormatError: a corrupt file, image and label counts that differ, or a
            label outside 0..9.
    """

    def locate(self) -> dict[str, Path]:
        """The four files' paths, in the module docstring's order.

        Raises:
            DatasetNotFound: nothing found or downloadable.
        """
        root = Path(self.data_root)
        for folder in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist",
                       root / "fashion_mnist", DEBIAN_FASHION_FOLDER):
            found = data.find_idx_files(folder, FASHION_FILES)
            if found:
                return found
        if self.download:
            found = data.download_idx_files(root / "FashionMNIST" / "raw", FASHION_FILES,
                                            FASHION_MIRRORS)
            if found:
                return found
        raise DatasetNotFound(
            f"Fashion-MNIST not found in {root} (or its FashionMNIST/raw, fashion-mnist, "
            f"fashion_mnist folders) nor in {DEBIAN_FASHION_FOLDER}. Install the Debian "
            f"package (apt-get install dataset-fashion-mnist), or put the four official IDX "
            f"files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in the data root")

    def _load(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        paths = self.locate()
        arrays = data.read_idx_files(paths, FASHION_FILES, (part,))
        images, labels = arrays[f"{part}-images-idx3-ubyte"], arrays[f"{part}-labels-idx1-ubyte"]
        if len(images) != len(labels) or len(images) == 0:
            raise IdxFormatError(f"{paths[f'{part}-images-idx3-ubyte']}: {len(images)} images "
                                 f"but {len(labels)} labels; expected the same count, >= 1")
        if labels.dtype != np.uint8 or int(labels.max()) >= _NUM_CLASSES:
            raise IdxFormatError(f"{paths[f'{part}-labels-idx1-ubyte']}: labels must be uint8 "
                                 f"in 0..{_NUM_CLASSES - 1}, got {labels.dtype} up to "
                                 f"{int(labels.max())}")
        return images, labels

    def train_data(self) -> LabeledTensors:
        """``(m, 1, 28, 28)`` float32 images normalised with Fashion-MNIST's statistics."""
        return self._split("train", FASHION_MEAN, FASHION_STD)

    def test_data(self) -> LabeledTensors:
        """The test images, as :meth:`train_data`."""
        return self._split("t10k", FASHION_MEAN, FASHION_STD)

