"""The simulator: same round logic as the TCP job, bit-identical final model; `byzps run`."""

from __future__ import annotations

import io
import json

import pytest
import torch

from byzps.attacks import alie_z
from byzps.job import parse_config
from byzps.launcher import final_digest, launch
from byzps.metrics import read_jsonl
from byzps.simulate import Simulation, SimulationFailed, simulate

from conftest import write_config


def small(base_config: dict) -> dict:
    """3 workers (2 honest + 1 sign-flip), worker momentum on: fast, and exercises momentum."""
    base_config["workers"] = [
        {"id": 0, "type": "honest"}, {"id": 1, "type": "honest"},
        {"id": 2, "type": "byzantine", "attack_scale": -2.0}]
    base_config["training"]["worker_momentum"] = 0.5
    return base_config


def test_simulate_equals_tcp_run_bit_for_bit(tmp_path, base_config):
    """`byzps run` (PS + 3 worker processes over 127.0.0.1, each ps_node's own code) and the
    in-process simulation end with the same PS replica digest after 3 rounds."""
    cfg_dict = small(base_config)
    path = write_config(tmp_path / "c.yaml", cfg_dict)
    out = io.StringIO()
    summary = launch(path, tmp_path / "run", data_root="./data", out=out, poll=0.2)
    text = out.getvalue()
    assert summary.ok, text + (tmp_path / "run" / "server.log").read_text()
    assert "round 3/3" in text and "byzps run: OK: 3/3 rounds" in text
    tcp_digest = final_digest(tmp_path / "run")
    assert tcp_digest is not None
    tcp_records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in tcp_records] == [0, 1, 2]

    # one thread per worker: the threaded path must equal the TCP run too
    result = simulate(parse_config(cfg_dict), "./data", metrics_file=str(tmp_path / "sim.jsonl"),
                      threads=3)
    assert result.digest == tcp_digest
    assert result.rounds == 3
    sim_records = read_jsonl(tmp_path / "sim.jsonl")
    assert [r["round"] for r in sim_records] == [0, 1, 2]
    # the same evaluation numbers as the PS logged
    assert [r["test_accuracy"] for r in sim_records] == [r["test_accuracy"]
                                                         for r in tcp_records]
    assert [r["accepted"] for r in sim_records] == [[0, 1, 2]] * 3


def test_simulation_records_rejections_and_distances(tmp_path, base_config):
    base_config["workers"][3] = {"id": 3, "type": "byzantine", "attack": "nan"}
    base_config["training"]["rounds"] = 2
    res = simulate(parse_config(base_config), "./data", keep_records=True)
    rec = res.records[-1]
    assert rec == res.last_record and len(res.records) == 2
    assert rec["accepted"] == [0, 1, 2]
    assert rec["rejected"] == {"3": "non-finite values (NaN or Inf)"}
    w = rec["workers"]
    assert w["3"]["status"] == "rejected" and "distance" not in w["3"]
    assert all(w[k]["status"] == "accepted" and w[k]["distance"] > 0 for k in "012")
    json.dumps(res.records)  # strict JSON


def test_simulation_with_non_iid_data_and_pre_aggregators(base_config):
    base_config["training"]["distribution"] = {"name": "label_sorted"}
    base_config["training"]["rounds"] = 2
    base_config["aggregation"] = {"method": "trimmed_mean",
                                  "pre_aggregators": [{"name": "clipping", "threshold": 1.0},
                                                      {"name": "nnm"}]}
    res = simulate(parse_config(base_config), "./data")
    assert res.rounds == 2 and 0.0 <= res.test_accuracy <= 1.0


def test_simulation_fails_clearly_when_a_round_cannot_close(base_config):
    # 2 of 4 workers send NaN, f = 1: quorum n - f = 3 cannot be met
    base_config["workers"][2] = {"id": 2, "type": "byzantine", "attack": "nan"}
    base_config["workers"][3] = {"id": 3, "type": "byzantine", "attack": "nan"}
    base_config["aggregation"]["f"] = 1
    with pytest.raises(SimulationFailed, match="round 0: 2 usable gradients"):
        simulate(parse_config(base_config), "./data")


def test_shard_smaller_than_a_batch_fails_at_start(base_config):
    base_config["training"]["train_limit"] = 100   # 25 per worker < batch 32
    with pytest.raises(ValueError, match="fewer than one batch of 32"):
        simulate(parse_config(base_config), "./data")


def test_omniscient_alie_sees_the_honest_vectors_of_the_round(base_config):
    """Both Byzantine workers send mean - z * std of exactly the rows the honest workers sent
    in the same round (the simulator hands them over before the attackers answer)."""
    base_config["workers"] = [{"id": i, "type": "honest"} for i in range(4)] + [
        {"id": i, "type": "byzantine", "attack": "alie", "attack_params": {"omniscient": True}}
        for i in (4, 5)]
    base_config["aggregation"] = {"method": "coordinate_wise_median", "f": 2}
    base_config["training"]["rounds"] = 2
    sim = Simulation(parse_config(base_config), "./data")
    sim.run()
    honest = torch.stack([sim._rows[i] for i in range(4)])
    z = alie_z(6, 2)
    expected = honest.mean(dim=0) - z * honest.std(dim=0, correction=1)
    assert torch.equal(sim._rows[4], expected) and torch.equal(sim._rows[5], expected)


def test_worker_threads_do_not_change_the_result(base_config):
    """The workers handled on 1 or 3 threads give the same final digest and the same per-round
    losses and distances, with server and worker momentum and an omniscient attacker (which
    must see every honest vector of the round before it answers)."""
    base_config["workers"] = [{"id": i, "type": "honest"} for i in range(4)] + [
        {"id": 4, "type": "byzantine", "attack": "alie", "attack_params": {"omniscient": True}}]
    base_config["aggregation"] = {"method": "coordinate_wise_median", "f": 1}
    base_config["training"]["worker_momentum"] = 0.5
    cfg = parse_config(base_config)
    one = simulate(cfg, "./data", threads=1, keep_records=True)
    three = simulate(cfg, "./data", threads=3, keep_records=True)
    assert one.digest == three.digest and one.rounds == three.rounds == 3
    for a, b in zip(one.records, three.records):
        assert (a["workers"], a["reported_loss"], a["test_accuracy"]) == \
            (b["workers"], b["reported_loss"], b["test_accuracy"])
    assert all("distance" in w for w in one.records[-1]["workers"].values())


def test_simulation_fails_when_a_worker_replica_diverges(base_config):
    """The workers skip the per-ROUND digest check in simulation; the evaluation rounds check
    every worker's replica against the PS's and name the one that differs."""
    sim = Simulation(parse_config(base_config), "./data", threads=2)

    def tamper(record):
        if record["round"] == 0:
            with torch.no_grad():
                sim.workers[1].replica.theta[0] += 1.0

    with pytest.raises(SimulationFailed, match=r"after round 1: the replicas of workers \[1\] "
                                               r"differ from the PS's"):
        sim.run(on_record=tamper)


def test_summary_seconds_leave_out_the_evaluations(base_config):
    """SimResult.seconds (and so s/round) excludes the test-set evaluations, which the
    records' seconds_round include (every round is evaluated here)."""
    res = simulate(parse_config(base_config), "./data", keep_records=True)
    assert res.seconds_eval > 0
    assert res.seconds < sum(r["seconds_round"] for r in res.records)
    assert res.seconds_per_round == res.seconds / res.rounds


def test_threads_must_be_positive(base_config):
    with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
        Simulation(parse_config(base_config), "./data", threads=0)


def test_simulate_ignores_tls_and_secrets_of_the_config(tmp_path, base_config):
    """A config set up for TCP with keys and TLS simulates as is: the simulator builds no
    network object, so it reads neither the key file nor the certificates (which do not even
    exist here), and the model is the same as without them."""
    base_config["training"]["rounds"] = 2
    plain = simulate(parse_config(base_config), "./data")
    base_config["server"]["secrets_file"] = str(tmp_path / "missing.secrets.yaml")
    base_config["server"]["tls"] = {"cert": str(tmp_path / "no.pem"),
                                    "key": str(tmp_path / "no.key"),
                                    "ca": str(tmp_path / "no-ca.pem")}
    secured = simulate(parse_config(base_config), "./data")
    assert secured.digest == plain.digest and secured.rounds == 2


def test_records_are_not_kept_unless_asked(base_config):
    """A long simulation's memory does not grow with its rounds: by default only the last
    record, the count and the best accuracy are kept."""
    base_config["training"].update(rounds=3, eval_every=1)
    seen = []
    res = simulate(parse_config(base_config), "./data", on_record=seen.append)
    assert res.records == [] and res.rounds == 3
    assert res.last_record == seen[-1] and res.last_record["round"] == 2
    assert res.best_accuracy == max(r["test_accuracy"] for r in seen)
