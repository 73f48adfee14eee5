"""Hostile files (issue 11, items 7-10): YAML alias bombs, endless or oversized files, checkpoints
with wrong fields, IDX headers that overflow, and gzip bombs in the data root."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
import yaml

from byzps import checkpoint, data
from byzps.checkpoint import CheckpointError
from byzps.config import ConfigError
from byzps.data import IdxFormatError, parse_idx
from byzps.grid import GridError, load_grid
from byzps.job import build_robust, load_config, parse_config
from byzps.net.auth import AuthError, load_keys
from byzps.replica import Replica

from conftest import ROOT, node_env, write_config


def alias_bomb(levels: int) -> str:
    """A YAML value ``x`` whose expansion has 10**levels leaves, in a few hundred bytes."""
    lines = ["x0: &x0 [a, a, a, a, a, a, a, a, a, a]"]
    for k in range(1, levels):
        refs = ", ".join([f"*x{k - 1}"] * 10)
        lines.append(f"x{k}: &x{k} [{refs}]")
    return "\n".join(lines) + "\n"


# -- item 7: YAML aliases, bounded echoes ------------------------------------------------------

def test_config_with_an_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path,
                                                                           base_config):
    body = yaml.safe_dump(base_config, sort_keys=False)
    body = body.replace("  method: coordinate_wise_median",
                        "  method: coordinate_wise_median\n  params: {bomb: *x5}")
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(6) + body)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert time.perf_counter() - start < 2.0
    msg = str(e.value)
    assert "alias" in msg and "line 2" in msg, msg
    assert len(msg) < 600, len(msg)


def test_secrets_and_grid_files_refuse_aliases(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("k: &k " + "ab" * 32 + "\nkeys: {0: *k}\n")
    with pytest.raises(AuthError, match=r"aliases are not allowed"):
        load_keys(keys)
    grid = tmp_path / "grid.yaml"
    grid.write_text(alias_bomb(3) + "base: {}\nhonest: *x2\nsweep: {}\n")
    with pytest.raises(GridError, match=r"aliases are not allowed"):
        load_grid(grid)


def test_errors_never_echo_a_huge_value(tmp_path, base_config):
    base_config["training"]["model"] = "m" * 100_000
    base_config["server"]["host"] = 7
    with pytest.raises(ConfigError) as e:
        parse_config(base_config)
    msg = str(e.value)
    assert len(msg) < 1000, len(msg)
    assert "training.model" in msg and "…" in msg
    keys = tmp_path / "k.yaml"
    keys.write_text(yaml.safe_dump({"keys": {"9" * 5000: "ab" * 32}}))
    with pytest.raises(AuthError) as e:
        load_keys(keys)
    assert len(str(e.value)) < 400 and "…" in str(e.value)


def test_shorten_is_exact():
    from byzps.safeio import shorten

    assert shorten("abc") == "'abc'"
    assert shorten("x" * 200, limit=10) == "'xxxxxxxxx…"
    assert shorten(list(range(100))) == "<list of 100 items>"
    assert shorten(5) == "5"


# -- item 8: endless and oversized files -------------------------------------------------------

ENDLESS = r"""
import os, sys
from byzps.net.auth import load_keys
from byzps.checkpoint import load
from byzps.job import load_config
from byzps.grid import load_grid
from byzps.tasks.cifar10 import extract_archive
from byzps.net.transport import client_ssl_context, server_ssl_context
tmp = sys.argv[1]
os.symlink("/dev/zero", f"{tmp}/config.yaml")
os.makedirs(f"{tmp}/ckpt")
os.symlink("/dev/zero", f"{tmp}/ckpt/latest.pt")
os.mkfifo(f"{tmp}/fifo.yaml")
cfg = load_config(sys.argv[2])
calls = [("config", lambda: load_config(f"{tmp}/config.yaml")),
         ("secrets", lambda: load_keys("/dev/zero")),
         ("fifo", lambda: load_keys(f"{tmp}/fifo.yaml")),
         ("grid", lambda: load_grid("/dev/zero")),
         ("ca", lambda: client_ssl_context("/dev/zero")),
         ("cert", lambda: server_ssl_context("/dev/zero", "/dev/zero")),
         ("checkpoint", lambda: load(f"{tmp}/ckpt", cfg, 10)),
         ("cifar", lambda: extract_archive("/dev/zero", tmp))]
for name, call in calls:
    try:
        call()
        print(name, "ACCEPTED")
    except ValueError as e:
        print(name, type(e).__name__, str(e).replace("\n", " "))
"""


def _limit_memory():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))   # a fuse for the old code


def test_endless_files_are_refused_before_reading(tmp_path, base_config):
    cfg = write_config(tmp_path / "ok.yaml", base_config)
    out = subprocess.run([sys.executable, "-c", ENDLESS, str(tmp_path), str(cfg)], text=True,
                         capture_output=True, timeout=90, env=node_env(), cwd=ROOT,
                         preexec_fn=_limit_memory)
    lines = dict(ln.split(" ", 1) for ln in out.stdout.splitlines())
    assert set(lines) == {"config", "secrets", "fifo", "grid", "ca", "cert", "checkpoint",
                          "cifar"}, \
        out.stdout + out.stderr
    for name, kind in [("config", "ConfigError"), ("secrets", "AuthError"),
                       ("grid", "GridError"), ("ca", "TlsError"), ("cert", "TlsError"),
                       ("checkpoint", "CheckpointError"), ("cifar", "CifarFormatError")]:
        assert lines[name].startswith(kind) and "a character device; expected a regular " \
            "file" in lines[name], lines[name]
    assert "a FIFO (pipe)" in lines["fifo"], lines["fifo"]


def test_oversized_config_and_secrets_are_refused_naming_the_limit(tmp_path):
    from byzps.safeio import MAX_CONFIG_BYTES

    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:
        fh.truncate(MAX_CONFIG_BYTES + 1)   # sparse: costs no disk
    with pytest.raises(ConfigError, match=rf"{MAX_CONFIG_BYTES + 1} bytes, more than the "
                                          rf"limit of {MAX_CONFIG_BYTES} bytes"):
        load_config(big)
    with pytest.raises(AuthError, match=r"more than the limit"):
        load_keys(big)


# -- item 9: checkpoint fields -----------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """(folder, config, d, the saved dict) of a real checkpoint of the base config."""
    from conftest import BASE_CONFIG

    cfg = parse_config(json.loads(json.dumps(BASE_CONFIG)))
    rep = Replica(cfg.training.model, 0, 0.05, 0.9)
    folder = tmp_path_factory.mktemp("ckpt")
    checkpoint.save(folder, checkpoint.Checkpoint(
        7, rep.state(), build_robust(cfg).state_dict(), torch.random.get_rng_state(),
        checkpoint.fingerprint(cfg)))
    raw = torch.load(folder / checkpoint.FILENAME, weights_only=True)
    return folder, cfg, rep.d, raw


def _garbage_rng():
    return torch.randint(0, 256, torch.random.get_rng_state().shape, dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("change, field", [
    (lambda raw: raw.pop("fingerprint"), "field fingerprint: required field is missing"),
    (lambda raw: raw.update(fingerprint=5), "field fingerprint: Input should be a valid string"),
    (lambda raw: raw.update(fingerprint="[1, 2]"), "field fingerprint: expected a JSON mapping"),
    (lambda raw: raw.update(round=float("inf")), "field round: Input should be a valid integer"),
    (lambda raw: raw.update(round=-5), "field round: Input should be greater than or equal"),
    (lambda raw: raw.update(round=10 ** 30), "field round: Input should be less than or equal"),
    (lambda raw: raw.update(round=True), "field round: Input should be a valid integer"),
    (lambda raw: raw.update(rng_state=_garbage_rng()), "field rng_state: not a valid generator"),
    (lambda raw: raw.update(rng_state=torch.zeros(3)), "field rng_state: expected a uint8"),
    (lambda raw: raw.update(state=torch.full((2, 3), float("nan"))), "field state: expected"),
    (lambda raw: raw.update(aggregator_state=[1]), "field aggregator_state: Input should be"),
    (lambda raw: raw.update(extra=1), "field extra: unknown field"),
])
def test_checkpoint_fields_are_validated(tmp_path, saved_checkpoint, change, field):
    folder, cfg, d, raw = saved_checkpoint
    assert checkpoint.load(folder, cfg, d).round == 7
    bad = dict(raw)
    change(bad)
    torch.save(bad, tmp_path / checkpoint.FILENAME)
    with pytest.raises(CheckpointError, match=field):
        checkpoint.load(tmp_path, cfg, d)


@pytest.mark.parametrize("change, field", [
    (lambda raw: raw.pop("fingerprint"), "field fingerprint"),
    (lambda raw: raw.update(aggregator_state={"pre": [], "aggregator": {"center": 1}}),
     "field aggregator_state"),
])
def test_resume_with_a_bad_checkpoint_exits_2_naming_the_field(tmp_path, base_config,
                                                              saved_checkpoint, change, field,
                                                              capsys):
    from byzps.cli import main

    _, _, _, raw = saved_checkpoint
    base_config["training"]["checkpoint_dir"] = str(tmp_path / "ck")
    (tmp_path / "ck").mkdir()
    bad = dict(raw)
    change(bad)
    torch.save(bad, tmp_path / "ck" / checkpoint.FILENAME)
    cfg = write_config(tmp_path / "c.yaml", base_config)
    assert main(["--config", str(cfg), "--role", "server", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("checkpoint error: ") and field in err and "Traceback" not in err


# -- item 10: IDX headers and gzip bombs -------------------------------------------------------

def _idx(code: int, dims: list[int], body: bytes = b"") -> bytes:
    return struct.pack(">BBBB", 0, 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims) \
        + body


def _data_root(tmp_path, t10k_images: bytes):
    root = tmp_path / "root"
    root.mkdir()
    for stem in data.MNIST_FILES:
        (root / stem).write_bytes(_idx(8, [1], b"\0"))   # parts that are not read
    (root / "t10k-labels-idx1-ubyte").write_bytes(_idx(8, [10000], bytes(10000)))
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(t10k_images)
    (root / "t10k-images-idx3-ubyte").unlink()
    return root


@pytest.mark.parametrize("header, match", [
    (_idx(8, [1] * 255, b"\0"), r"declares 255 dimensions; expected 1..16"),
    (_idx(8, [2 ** 31, 2 ** 31, 4]), r"declares 18446744073709551616 data bytes, more than "
                                     r"the limit of \d+"),
])
def test_idx_headers_that_overflow_or_declare_255_dims_are_clear_errors(tmp_path, header,
                                                                      match):
    root = _data_root(tmp_path, gzip.compress(header))
    with pytest.raises(IdxFormatError, match=match):
        data.load_mnist(root, download=False, parts=("t10k",))
    with pytest.raises(IdxFormatError):
        parse_idx(header)


def test_gzip_bomb_is_inflated_only_as_far_as_the_header_declares(tmp_path):
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [z.compress(_idx(8, [10000, 28, 28]))]
    zeros = bytes(1 << 20)
    parts += [z.compress(zeros) for _ in range(160)]   # 160 MiB of zeros behind the header
    parts.append(z.flush())
    blob = b"".join(parts)
    assert len(blob) < 400_000
    root = _data_root(tmp_path, blob)
    tracemalloc.start()
    try:
        with pytest.raises(IdxFormatError, match=r"more data after the 7840000 bytes"):
            data.load_mnist(root, download=False, parts=("t10k",))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20, peak   # the declared 7.8 MB (and a copy), not 160 MiB


def test_idx_reading_still_reads_gz_and_raw_exactly(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = _idx(8, [2, 3, 4], arr.tobytes())
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "b.gz").write_bytes(gzip.compress(raw))
    for name in ("a", "b.gz"):
        assert np.array_equal(data.read_idx(tmp_path / name, 24), arr)
        with pytest.raises(IdxFormatError, match="more than the limit of 23"):
            data.read_idx(tmp_path / name, 23)
    (tmp_path / "c").write_bytes(raw + b"!")
    with pytest.raises(IdxFormatError, match="more data after the 24 bytes"):
        data.read_idx(tmp_path / "c", 1000)
