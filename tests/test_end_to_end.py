"""End to end: a real PS and real worker processes over 127.0.0.1 on a slice of real MNIST."""

from __future__ import annotations

import json
import re
import socket
import struct
import time

from conftest import start_node, write_config

TIMEOUT = 180


def digests(text: str) -> set[str]:
    return set(re.findall(r"digest ([0-9a-f]{32})", text))


def test_ps_and_four_workers_train_and_stay_identical(tmp_path, base_config):
    base_config["training"]["metrics_file"] = str(tmp_path / "metrics.jsonl")
    cfg = write_config(tmp_path / "c.yaml", base_config)
    # workers first: they must retry until the PS is up
    workers = [start_node(cfg, "worker", worker_id=i, log=tmp_path / f"w{i}.log")
               for i in range(4)]
    time.sleep(1.0)
    server = start_node(cfg, "server", log=tmp_path / "ps.log")
    assert server.wait(TIMEOUT) == 0, (tmp_path / "ps.log").read_text()
    for i, w in enumerate(workers):
        assert w.wait(TIMEOUT) == 0, (tmp_path / f"w{i}.log").read_text()
    ps_log = (tmp_path / "ps.log").read_text()
    m = re.search(r"final test accuracy: ([0-9.]+) .* after 3 rounds", ps_log)
    assert m and 0.0 <= float(m.group(1)) <= 1.0, ps_log
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["accepted"] == [0, 1, 2, 3] for r in records)
    assert all("test_accuracy" in r for r in records)
    # every replica (PS and the four workers) ends bit-identical
    all_logs = ps_log + "".join((tmp_path / f"w{i}.log").read_text() for i in range(4))
    assert len(digests(all_logs)) == 1, all_logs


def test_hostile_peers_do_not_disturb_training(tmp_path, base_config):
    """Garbage, an oversized frame announcement and an unknown id while training runs."""
    base_config["training"]["rounds"] = 4
    base_config["workers"] = base_config["workers"][:3]
    cfg = write_config(tmp_path / "c.yaml", base_config)
    server = start_node(cfg, "server", log=tmp_path / "ps.log")
    port = base_config["server"]["port"]
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline, (tmp_path / "ps.log").read_text()
            time.sleep(0.2)
    hostile = []
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 100)
    hostile.append(s)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(struct.pack("<4sBBHIQ", b"BZPS", 1, 1, 0, 20, 2 ** 40))
    hostile.append(s)
    s = socket.create_connection(("127.0.0.1", port))
    hello = json.dumps({"worker_id": 42}).encode()
    s.sendall(struct.pack("<4sBBHIQ", b"BZPS", 1, 1, 0, len(hello), 0) + hello)
    hostile.append(s)
    workers = [start_node(cfg, "worker", worker_id=i, log=tmp_path / f"w{i}.log")
               for i in range(3)]
    assert server.wait(TIMEOUT) == 0, (tmp_path / "ps.log").read_text()
    for i, w in enumerate(workers):
        assert w.wait(TIMEOUT) == 0, (tmp_path / f"w{i}.log").read_text()
    ps_log = (tmp_path / "ps.log").read_text()
    assert "bad magic" in ps_log
    assert "expected exactly" in ps_log
    assert "unknown worker id 42" in ps_log
    assert "after 4 rounds" in ps_log
    for s in hostile:
        s.close()
