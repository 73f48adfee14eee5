"""Per-worker I/O figures of a TCP round (issue 5) and the PS's receive-in-place path (issue 6):
a real ParameterServer and real Workers over 127.0.0.1, all in this process's event loop."""

from __future__ import annotations

import asyncio
import json

import pytest

from byzps.job import Job, parse_config
from byzps.metrics import read_jsonl
from byzps.net import auth
from byzps.net.server import ParameterServer
from byzps.net.wire import MAC_BYTES, PREFIX_BYTES
from byzps.net.worker import Worker


@pytest.mark.parametrize("authenticated", [False, True])
def test_metrics_carry_latency_and_frame_bytes_per_worker(tmp_path, base_config,
                                                          authenticated):
    base_config["workers"] = base_config["workers"][:3]
    base_config["training"].update(rounds=3, model="logreg", eval_every=3,
                                   metrics_file=str(tmp_path / "metrics.jsonl"))
    if authenticated:
        auth.write_keys(tmp_path / "keys.yaml", auth.generate_keys(range(3)))
        base_config["server"]["secrets_file"] = str(tmp_path / "keys.yaml")
    cfg = parse_config(base_config)

    async def run():
        job = Job(cfg, "./data")
        ps = ParameterServer(cfg, job.ps_core())
        workers = [Worker(cfg, job.worker_core(i)) for i in range(3)]
        return ps, await asyncio.wait_for(
            asyncio.gather(ps.run(), *(w.run() for w in workers)), 120)

    ps, (result, *done) = asyncio.run(run())
    assert result.rounds == 3 and done == [3, 3, 3]
    d = ps.replica.d
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2]
    for rec in records:
        assert rec["accepted"] == [0, 1, 2]
        assert 0.0 <= rec["seconds_validate"] < rec["seconds_round"]
        for wid, entry in rec["workers"].items():
            # ROUND written -> GRADIENT fully arrived: positive, within the round
            assert 0.0 < entry["latency"] <= rec["seconds_round"]
            # exactly the GRADIENT frame: prefix + the JSON header it sent + d float32 (+ MAC)
            header = json.dumps({"round": rec["round"], "worker_id": int(wid),
                                 "loss": entry["loss"], "dtype": "float32", "shape": [d]},
                                separators=(",", ":")).encode()
            want = PREFIX_BYTES + len(header) + 4 * d + (MAC_BYTES if authenticated else 0)
            assert entry["bytes"] == want, (entry, want)
