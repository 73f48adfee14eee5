"""End to end: a real PS and real workers, one of them sending NaN (``attack: nan``)."""

from __future__ import annotations

import json
import re

from conftest import start_node, write_config

TIMEOUT = 180
ROUNDS = 3


def test_nan_worker_is_excluded_every_round(tmp_path, base_config):
    base_config["training"]["rounds"] = ROUNDS
    base_config["training"]["metrics_file"] = str(tmp_path / "metrics.jsonl")
    byz = base_config["workers"][3]
    del byz["attack_scale"]  # only meaningful for sign_flip
    byz["attack"] = "nan"
    cfg = write_config(tmp_path / "c.yaml", base_config)
    server = start_node(cfg, "server", log=tmp_path / "ps.log")
    workers = [start_node(cfg, "worker", worker_id=i, log=tmp_path / f"w{i}.log")
               for i in range(4)]
    try:
        assert server.wait(TIMEOUT) == 0, (tmp_path / "ps.log").read_text()
        for i, w in enumerate(workers):
            assert w.wait(TIMEOUT) == 0, (tmp_path / f"w{i}.log").read_text()
    finally:
        for p in [server, *workers]:
            if p.poll() is None:
                p.kill()
    ps_log = (tmp_path / "ps.log").read_text()
    assert f"after {ROUNDS} rounds" in ps_log, ps_log
    excluded = re.findall(r"round (\d+): gradient of worker 3 excluded: non-finite", ps_log)
    assert sorted(map(int, excluded)) == list(range(ROUNDS)), ps_log
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["accepted"] for r in records] == [[0, 1, 2]] * ROUNDS
    assert all("3" in r["rejected"] or 3 in r["rejected"] for r in records)
    assert "attack nan" in (tmp_path / "w3.log").read_text()
