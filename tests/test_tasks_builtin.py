"""The built-in tasks: synthetic determinism, mnist equal to today's job, the Fashion-MNIST and
CIFAR-10 loaders on small files in the official formats that the tests write, ResNet-20."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from byzps import data, models
from byzps.data import DatasetNotFound, IdxFormatError
from byzps.task import build_model_seeded, load_task, validate_task
from byzps.tasks import cifar10
from byzps.tasks import mnist as mnist_tasks
from byzps.tasks.cifar10 import CifarFormatError

# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_in_its_seed():
    a, b = load_task("synthetic", {"seed": 3}), load_task("synthetic", {"seed": 3})
    c = load_task("synthetic", {"seed": 4})
    for split in ("train_data", "test_data"):
        da, db, dc = (getattr(t, split)() for t in (a, b, c))
        assert torch.equal(da.inputs, db.inputs) and torch.equal(da.targets, db.targets)
        assert not torch.equal(da.inputs, dc.inputs)
    tr = a.train_data()
    assert tr.inputs.shape == (2048, 16) and tr.inputs.dtype == torch.float32
    assert set(tr.targets.tolist()) == {0, 1, 2, 3}
    # the data do not depend on (or disturb) torch's global RNG
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    d = load_task("synthetic", {"seed": 3}).train_data()
    assert torch.equal(d.inputs, tr.inputs) and torch.equal(state, torch.random.get_rng_state())


def test_synthetic_bn_model_has_buffers_and_validates():
    task = load_task("synthetic", {"model": "mlp_bn", "hidden": 8, "classes": 3,
                                   "features": 5})
    info = validate_task(task)
    assert info.buffers == ("1.running_mean", "1.running_var", "1.num_batches_tracked")
    assert info.d == 5 * 8 + 8 + 8 + 8 + 8 * 3 + 3 and info.num_outputs == 3
    assert any(isinstance(m, nn.BatchNorm1d) for m in build_model_seeded(task, 0).modules())


@pytest.mark.parametrize("params,field", [
    ({"features": 0}, "features"), ({"classes": 1}, "classes"),
    ({"train_size": 10 ** 7}, "train_size"), ({"noise": -1.0}, "noise"),
    ({"hidden": True}, "hidden"),
])
def test_synthetic_bounds_its_parameters(params, field):
    with pytest.raises(ValueError, match=field):
        load_task("synthetic", params)


# --------------------------------------------------------------------------- mnist


def test_mnist_task_is_todays_job():
    """The built-in mnist task builds today's models with today's seeds and today's tensors."""
    task = load_task("mnist", {"model": "small_cnn"})
    ours = build_model_seeded(task, 5)
    today = models.build_model("small_cnn", 5)
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), today.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    m = data.load_mnist("data", parts=("t10k",))
    x, y = data.to_tensors(m.test_images, m.test_labels)
    test = task.test_data()
    assert torch.equal(test.inputs, x) and torch.equal(test.targets, y)


# --------------------------------------------------------------------------- fashion-mnist


def _idx(arr: np.ndarray) -> bytes:
    """LeCun's IDX encoding of a uint8 array."""
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _fashion_files(folder: Path, n_train: int = 6, n_test: int = 4, gz: bool = True,
                   labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Small Fashion-MNIST files in the official format; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10 if labels is None
        else labels,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    arrays["train-images-idx3-ubyte"][0, 0, :3] = (0, 255, 51)
    for stem, arr in arrays.items():
        raw = _idx(arr)
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


@pytest.mark.parametrize("sub,gz", [("", True), ("FashionMNIST/raw", False),
                                    ("fashion-mnist", True)])
def test_fashion_mnist_reads_idx_files_in_the_data_root(tmp_path, sub, gz):
    arrays = _fashion_files(tmp_path / sub, gz=gz)
    task = load_task("fashion_mnist", {"data_root": str(tmp_path), "download": False,
                                       "model": "small_cnn"})
    info = validate_task(task)
    assert (info.train_size, info.test_size, info.input_shape) == (6, 4, (1, 28, 28))
    tr = task.train_data()
    assert tr.targets.tolist() == [0, 1, 2, 3, 4, 5]
    assert task.test_data().targets.tolist() == [0, 3, 6, 9]
    # pixel p -> (p / 255 - 0.2860) / 0.3530 in float32, as data.to_tensors computes it
    for col, p in enumerate((0, 255, 51)):
        want = (np.float32(p) / np.float32(255.0) - np.float32(0.2860)) / np.float32(0.3530)
        assert tr.inputs[0, 0, 0, col].item() == pytest.approx(float(want), abs=0)
    assert tr.inputs[0, 0, 0, 1].item() == pytest.approx((1 - 0.2860) / 0.3530, rel=1e-6)
    assert np.array_equal(tr[5][0][0].numpy(), (
        (arrays["train-images-idx3-ubyte"][5].astype(np.float32) / 255.0 - 0.2860) / 0.3530
    ).astype(np.float32))


def test_fashion_mnist_falls_back_to_the_debian_package_folder(tmp_path, monkeypatch):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    _fashion_files(debian)
    monkeypatch.setattr(mnist_tasks, "DEBIAN_FASHION_FOLDER", debian)
    task = load_task("fashion_mnist", {"data_root": str(tmp_path / "empty"),
                                       "download": False})
    assert len(task.train_data()) == 6
    monkeypatch.setattr(mnist_tasks, "DEBIAN_FASHION_FOLDER", tmp_path / "nothing")
    task = load_task("fashion_mnist", {"data_root": str(tmp_path / "empty"),
                                       "download": False})
    with pytest.raises(DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        task.train_data()


def test_fashion_mnist_refuses_inconsistent_files(tmp_path):
    _fashion_files(tmp_path, labels=np.array([0, 1, 2, 3, 4, 10], dtype=np.uint8))
    task = load_task("fashion_mnist", {"data_root": str(tmp_path), "download": False})
    with pytest.raises(IdxFormatError, match=r"labels must be uint8 in 0..9, got uint8 up to 10"):
        task.train_data()
    _fashion_files(tmp_path, labels=np.array([0, 1, 2], dtype=np.uint8))
    task = load_task("fashion_mnist", {"data_root": str(tmp_path), "download": False})
    with pytest.raises(IdxFormatError, match=r"6 images but 3 labels"):
        task.train_data()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" +
                                                                       b"\x00" * 8))
    with pytest.raises(IdxFormatError, match="cut short"):
        load_task("fashion_mnist", {"data_root": str(tmp_path), "download": False}).test_data()


def test_idx_download_keeps_only_files_with_the_published_md5(tmp_path):
    """data.download_idx_files (used for Fashion-MNIST's official files) through a file://
    mirror: a file whose md5 differs from the table's is refused."""
    mirror = tmp_path / "mirror"
    arrays = _fashion_files(mirror)
    md5 = {s: hashlib.md5((mirror / f"{s}.gz").read_bytes()).hexdigest() for s in arrays}
    files = {s: (md5[s], (None,) + arrays[s].shape[1:]) for s in arrays}
    got = data.download_idx_files(tmp_path / "out", files, (mirror.as_uri() + "/",))
    assert got is not None and sorted(got) == sorted(arrays)
    assert (tmp_path / "out" / "t10k-labels-idx1-ubyte.gz").read_bytes() == \
        (mirror / "t10k-labels-idx1-ubyte.gz").read_bytes()
    bad = dict(files, **{"train-labels-idx1-ubyte": ("0" * 32, (None,))})
    assert data.download_idx_files(tmp_path / "out2", bad, (mirror.as_uri() + "/",)) is None
    assert not (tmp_path / "out2" / "train-labels-idx1-ubyte.gz").exists()


def test_fashion_md5_table_is_the_official_one():
    """The md5s published in Fashion-MNIST's README (Xiao et al. 2017)."""
    assert {k: v[0] for k, v in mnist_tasks.FASHION_FILES.items()} == {
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83fd310",
    }


# --------------------------------------------------------------------------- cifar-10


def _cifar_records(labels: list[int], seed: int) -> tuple[bytes, np.ndarray]:
    """Records in the binary version's format; returns the bytes and the (m, 3, 32, 32)
    images written (channel k of image j is filled with a known pattern)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    out = bytearray()
    for lab, img in zip(labels, images):
        out.append(lab)
        out += img.tobytes()       # red plane, green plane, blue plane, each row-major
    return bytes(out), images


def _cifar_folder(root: Path, per_file: int = 3) -> dict[str, tuple[list[int], np.ndarray]]:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for k, name in enumerate(cifar10.TRAIN_FILES + cifar10.TEST_FILES):
        labels = [(k + j) % 10 for j in range(per_file)]
        raw, images = _cifar_records(labels, seed=k)
        (folder / name).write_bytes(raw)
        written[name] = (labels, images)
    return written


def test_cifar10_reads_the_binary_version(tmp_path):
    written = _cifar_folder(tmp_path)
    task = load_task("cifar10", {"data_root": str(tmp_path), "download": False,
                                 "model": "cnn_cifar"})
    info = validate_task(task)
    assert (info.train_size, info.test_size, info.input_shape, info.num_outputs) == \
        (15, 3, (3, 32, 32), 10)
    tr = task.train_data()
    assert tr.targets.tolist() == sum((written[n][0] for n in cifar10.TRAIN_FILES), [])
    assert task.test_data().targets.tolist() == [5, 6, 7]
    # record 4 of the training set is record 1 of data_batch_2.bin; channel order r, g, b
    img = written["data_batch_2.bin"][1][1]
    x, y = tr[4]
    assert y == written["data_batch_2.bin"][0][1]
    for c, (mean, std) in enumerate(zip(cifar10.CIFAR_MEAN, cifar10.CIFAR_STD)):
        want = (img[c].astype(np.float32) - np.float32(255.0 * mean)) / np.float32(255.0 * std)
        assert np.array_equal(x[c].numpy(), want)
        assert x[c, 0, 0].item() == pytest.approx((img[c, 0, 0] / 255 - mean) / std, rel=1e-5)
    xb, yb = tr.batch(torch.tensor([4, 0]))
    assert torch.equal(xb[0], x) and yb[0] == y


@pytest.mark.parametrize("mutate,pattern", [
    (lambda raw: raw[:-1], r"is not 1..10000 whole records of 3073 bytes"),
    (lambda raw: b"", r"0 bytes is not"),
    (lambda raw: bytes([10]) + raw[1:], r"record 0 has label 10, expected 0..9"),
])
def test_cifar10_refuses_malformed_batch_files(tmp_path, mutate, pattern):
    _cifar_folder(tmp_path)
    f = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    f.write_bytes(mutate(f.read_bytes()))
    task = load_task("cifar10", {"data_root": str(tmp_path), "download": False})
    with pytest.raises(CifarFormatError, match=pattern) as info:
        task.train_data()
    assert "data_batch_3.bin" in str(info.value)


def _archive(root: Path, extra: dict[str, bytes] | None = None, skip: str | None = None
             ) -> Path:
    src = root / "src"
    _cifar_folder(src)
    path = root / "data" / cifar10.ARCHIVE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name in cifar10.TRAIN_FILES + cifar10.TEST_FILES:
            if name != skip:
                tf.add(src / "cifar-10-batches-bin" / name, f"cifar-10-batches-bin/{name}")
        for name, blob in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return path


def test_cifar10_archive_is_checked_and_only_the_six_files_extracted(tmp_path):
    archive = _archive(tmp_path, extra={"../escaped.txt": b"x",
                                        "cifar-10-batches-bin/batches.meta.txt": b"cat\n"})
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(CifarFormatError, match=r"md5 .*, expected c32a1d4ab5d03f1284b67883e8d"):
        cifar10.locate(archive.parent, download=False)    # the official md5 is required
    folder = cifar10.extract_archive(archive, archive.parent, md5=md5)
    assert sorted(p.name for p in folder.iterdir()) == sorted(cifar10.TRAIN_FILES +
                                                              cifar10.TEST_FILES)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "data" /
                                                            "escaped.txt").exists()
    # with the folder in place the archive is not needed any more
    task = load_task("cifar10", {"data_root": str(archive.parent), "download": False})
    assert len(task.test_data()) == 3


def test_cifar10_archive_without_a_member_is_refused(tmp_path):
    archive = _archive(tmp_path, skip="data_batch_4.bin")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(CifarFormatError, match="no member cifar-10-batches-bin/data_batch_4"):
        cifar10.extract_archive(archive, archive.parent, md5=md5)


def test_cifar10_missing_says_what_to_get(tmp_path):
    task = load_task("cifar10", {"data_root": str(tmp_path), "download": False})
    with pytest.raises(DatasetNotFound, match=r"cifar-10-batches-bin .*/cifar-10-binary.tar.gz "
                                              r".*pickled python version is not read"):
        task.train_data()


def test_resnet20_shape_parameters_and_buffers():
    """He et al. 2016, Sec. 4.2 with option A shortcuts: conv 3x3x3x16 (432) + BN (32);
    stage 1: 6 convs 16x16x9 (13,824) + 6 BN (192); stage 2: 16x32x9 + 5 x 32x32x9 (50,688)
    + 6 BN (384); stage 3: 32x64x9 + 5 x 64x64x9 (202,752) + 6 BN (768); fc 64x10 + 10 (650):
    269,722 parameters, 19 BatchNorm layers."""
    task = load_task("cifar10", {"model": "resnet20"})
    model = build_model_seeded(task, 0)
    assert sum(p.numel() for p in model.parameters()) == 269_722
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 19 and len(list(model.buffers())) == 3 * 19
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and all(c.bias is None for c in convs)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.train()
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert bns[0].num_batches_tracked.item() == 1
    model.eval()
    assert model(x).shape == (4, 10)
    assert sum(p.numel() for p in build_model_seeded(
        load_task("cifar10", {"model": "cnn_cifar"}), 0).parameters()) == 545_098


def test_resnet_option_a_shortcut_subsamples_and_pads_with_zeros():
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).view(2, 16, 4, 4)
    out = cifar10._PadShortcut(16)(x)
    assert out.shape == (2, 32, 2, 2)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_resnet20_on_the_written_files_through_validate(tmp_path):
    _cifar_folder(tmp_path)
    task = load_task("cifar10", {"data_root": str(tmp_path), "download": False})
    info = validate_task(task)
    assert info.d == 269_722 and len(info.buffers) == 57


def test_idx_reader_bounds_what_a_gzip_file_expands_to(tmp_path, monkeypatch):
    """A small .gz that expands past data.MAX_IDX_BYTES is refused (a gzip bomb does not fill
    memory); here the bound is lowered to keep the test small."""
    _fashion_files(tmp_path)
    monkeypatch.setattr(data, "MAX_IDX_BYTES", 16 + 6 * 28 * 28)   # the training images
    task = load_task("fashion_mnist", {"data_root": str(tmp_path), "download": False})
    assert len(task.train_data()) == 6
    # a header declaring 10 images, then a million zero bytes: refused from the header alone
    bomb = struct.pack(">BBBB3I", 0, 0, 8, 3, 10, 28, 28) + bytes(10 ** 6)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bomb))
    with pytest.raises(IdxFormatError, match="more than the limit of 4720"):
        task.test_data()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"junk" * 10)
    with pytest.raises(IdxFormatError, match="not a readable gzip file"):
        task.test_data()
