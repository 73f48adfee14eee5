"""The PS's status endpoint (server.metrics_port): Prometheus /metrics and JSON /status."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from byzps.config import ConfigError
from byzps.core.rounds import REJECT_NON_FINITE, RoundClosed
from byzps.job import parse_config
from byzps.metrics import round_record

from conftest import ROOT, free_port, start_node, write_config

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from byzps.status import StatusEndpoint, StatusEndpointError  # noqa: E402


def fetch(url: str, timeout: float = 5.0) -> tuple[int, str, str]:
    """(status code, content type, body) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value of a Prometheus text exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class FakeClock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def two_records() -> list[dict]:
    r0 = round_record(RoundClosed(round=3, accepted=(0, 1, 2), rejected={3: REJECT_NON_FINITE},
                                  missing=(), losses={0: 1.0, 1: 2.0, 2: 3.0},
                                  seconds_aggregate=0.004),
                      worker_ids=[0, 1, 2, 3], seconds_round=0.3, now=10.0)
    r1 = round_record(RoundClosed(round=4, accepted=(0, 2), rejected={3: REJECT_NON_FINITE},
                                  missing=(1,), losses={0: 0.5, 2: 1.5}, seconds_aggregate=0.02),
                      worker_ids=[0, 1, 2, 3], seconds_round=1.5, test_loss=0.25,
                      test_accuracy=0.875, now=11.0)
    return [r0, r1]


def test_metrics_and_status_report_exact_values():
    clock = FakeClock(1000.0)
    ep = StatusEndpoint("127.0.0.1", 0, worker_ids=[3, 0, 1, 2], rounds=10, start_round=3,
                        clock=clock)
    port = ep.start()
    try:
        assert port > 0 and ep.url == f"http://127.0.0.1:{port}"
        code, ctype, body = fetch(ep.url + "/status")
        assert code == 200 and ctype == "application/json"
        before = json.loads(body)
        assert before["round"] == 3 and before["rounds"] == 10 and before["test_accuracy"] is None
        assert before["workers"] == {str(i): {"status": "unknown"} for i in range(4)}
        m = samples(fetch(ep.url + "/metrics")[2])
        assert m[("byzps_test_accuracy", ())] != m[("byzps_test_accuracy", ())]   # NaN: not yet
        assert m[("byzps_accepted_total", (("worker", "1"),))] == 0.0

        r0, r1 = two_records()
        ep.update(r0, live_workers=[0, 1, 2, 3])
        ep.update(r1, live_workers={2, 0, 3})
        clock.t = 1012.5
        m = samples(fetch(ep.url + "/metrics")[2])
        assert m[("byzps_round", ())] == 5.0
        assert m[("byzps_rounds_planned", ())] == 10.0
        assert m[("byzps_rounds_total", ())] == 2.0
        assert m[("byzps_live_workers", ())] == 3.0
        assert m[("byzps_workers", ())] == 4.0
        assert m[("byzps_test_accuracy", ())] == 0.875
        assert m[("byzps_test_loss", ())] == 0.25
        assert m[("byzps_reported_loss", ())] == 1.0
        assert m[("byzps_round_seconds_count", ())] == 2.0
        assert m[("byzps_round_seconds_sum", ())] == pytest.approx(1.8)
        assert m[("byzps_round_seconds_bucket", (("le", "0.5"),))] == 1.0
        assert m[("byzps_aggregate_seconds_sum", ())] == pytest.approx(0.024)
        assert m[("byzps_rejected_gradients_total",
                  (("reason", REJECT_NON_FINITE), ("worker", "3")))] == 2.0
        assert m[("byzps_missing_total", (("worker", "1"),))] == 1.0
        assert m[("byzps_missing_total", (("worker", "0"),))] == 0.0
        assert m[("byzps_accepted_total", (("worker", "0"),))] == 2.0
        assert m[("byzps_accepted_total", (("worker", "1"),))] == 1.0
        assert m[("byzps_start_time_seconds", ())] == 1000.0

        code, _, body = fetch(ep.url + "/status")
        assert code == 200
        assert json.loads(body) == {
            "round": 5, "rounds": 10, "rounds_this_run": 2, "finished": False,
            "live_workers": [0, 2, 3],
            "workers": {"0": {"status": "accepted", "loss": 0.5, "round": 4},
                        "1": {"status": "missing", "round": 4},
                        "2": {"status": "accepted", "loss": 1.5, "round": 4},
                        "3": {"status": "rejected", "reason": REJECT_NON_FINITE, "round": 4}},
            "test_accuracy": 0.875, "test_loss": 0.25, "evaluated_round": 4,
            "reported_loss": 1.0, "last_round_seconds": 1.5,
            "rejected_gradients": {"3": {REJECT_NON_FINITE: 2}}, "missing": {"1": 1},
            "states_refused": {},
            "uptime_seconds": 12.5}
        assert fetch(ep.url + "/nope")[0] == 404
        assert fetch(ep.url + "/")[0] == 200
    finally:
        ep.stop()
    ep.stop()   # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert ep.snapshot()["round"] == 5    # state stays readable after stop


def test_each_endpoint_has_its_own_registry():
    a = StatusEndpoint("127.0.0.1", 0, worker_ids=[0], rounds=3)
    b = StatusEndpoint("127.0.0.1", 0, worker_ids=[0], rounds=7)
    a.start()
    b.start()
    try:
        a.update(two_records()[0], live_workers=[0])
        ma, mb = samples(fetch(a.url + "/metrics")[2]), samples(fetch(b.url + "/metrics")[2])
        assert ma[("byzps_rounds_total", ())] == 1.0 and mb[("byzps_rounds_total", ())] == 0.0
        assert ma[("byzps_rounds_planned", ())] == 3.0 and mb[("byzps_rounds_planned", ())] == 7.0
        assert ("byzps_round", ()) not in samples(
            prometheus_client.generate_latest(prometheus_client.REGISTRY).decode())
    finally:
        a.stop()
        b.stop()


def test_port_in_use_names_the_config_field():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        ep = StatusEndpoint("127.0.0.1", port, worker_ids=[0], rounds=1)
        with pytest.raises(StatusEndpointError, match=rf"server.metrics_port={port} in use"):
            ep.start()


@pytest.mark.parametrize("value, match", [
    (0, r"server.metrics_port: Input should be greater than or equal to 1"),
    (65536, r"server.metrics_port: Input should be less than or equal to 65535"),
    ("9100", r"server.metrics_port: Input should be a valid integer"),
    (True, r"server.metrics_port: Input should be a valid integer"),
])
def test_metrics_port_validation(base_config, value, match):
    base_config["server"]["metrics_port"] = value
    with pytest.raises(ConfigError, match=match):
        parse_config(base_config)


def test_metrics_port_defaults_and_clash_with_the_training_port(base_config):
    cfg = parse_config(base_config)
    assert cfg.server.metrics_port is None and cfg.server.metrics_host == "127.0.0.1"
    base_config["server"]["metrics_port"] = 9100
    assert parse_config(base_config).server.metrics_port == 9100
    base_config["server"]["metrics_port"] = base_config["server"]["port"]
    with pytest.raises(ConfigError, match=r"server.metrics_port: expected a port other than "
                                          r"server.port"):
        parse_config(base_config)
    base_config["server"]["metrics_port"] = 9100
    base_config["server"]["metrics_host"] = ""
    with pytest.raises(ConfigError, match=r"server.metrics_host"):
        parse_config(base_config)


def test_ps_exits_1_naming_metrics_port_when_it_is_taken(tmp_path, base_config, capsys):
    from byzps.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        base_config["server"]["metrics_port"] = s.getsockname()[1]
        cfg = write_config(tmp_path / "c.yaml", base_config)
        assert main(["--config", str(cfg), "--role", "server",
                     "--data-root", str(ROOT / "data")]) == 1
    err = capsys.readouterr().err
    assert f"server.metrics_port={base_config['server']['metrics_port']} in use" in err


def test_ps_serves_status_while_training(tmp_path, base_config):
    """A real PS (in this process) and three worker processes: /status before the workers
    come, then the endpoint's state after 3 rounds matches the metrics file."""
    from byzps.job import Job
    from byzps.net.server import ParameterServer

    base_config["training"].update(metrics_file=str(tmp_path / "metrics.jsonl"), model="logreg",
                                   train_limit=600, test_limit=200)
    base_config["workers"] = base_config["workers"][:3]     # 3 honest: fewer processes to start
    base_config["server"]["metrics_port"] = free_port()
    cfg_path = write_config(tmp_path / "c.yaml", base_config)
    cfg = parse_config(base_config)
    ps = ParameterServer(cfg, Job(cfg, str(ROOT / "data")).ps_core())
    outcome: dict = {}

    def serve() -> None:
        try:
            outcome["result"] = asyncio.run(ps.run())
        except BaseException as e:   # noqa: BLE001 - reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{cfg.server.metrics_port}"
    deadline = time.time() + 30
    while True:
        try:
            code, _, body = fetch(url + "/status", timeout=2)
            break
        except OSError:
            assert time.time() < deadline and thread.is_alive(), outcome
            time.sleep(0.1)
    doc = json.loads(body)
    assert code == 200 and doc["round"] == 0 and doc["rounds"] == 3 and doc["live_workers"] == []
    assert samples(fetch(url + "/metrics")[2])[("byzps_rounds_total", ())] == 0.0
    workers = [start_node(cfg_path, "worker", worker_id=i, log=tmp_path / f"w{i}.log")
               for i in range(3)]
    thread.join(120)
    assert not thread.is_alive() and "error" not in outcome, outcome
    for i, w in enumerate(workers):
        assert w.wait(60) == 0, (tmp_path / f"w{i}.log").read_text()
    snap = ps.status.snapshot()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert snap["round"] == 3 and snap["rounds_this_run"] == 3 and snap["finished"] is True
    assert snap["test_accuracy"] == records[-1]["test_accuracy"] == \
        outcome["result"].test_accuracy
    assert snap["live_workers"] == [0, 1, 2]
    assert {w: e["status"] for w, e in snap["workers"].items()} == \
        {w: e["status"] for w, e in records[-1]["workers"].items()}
    with pytest.raises(OSError):   # the endpoint is closed with the PS
        socket.create_connection(("127.0.0.1", cfg.server.metrics_port), timeout=1).close()


def test_labels_and_status_keys_stay_bounded_whatever_the_records_say():
    """Issue 11: a record naming unknown workers or reasons (say, a reason that quotes a new
    claimed worker id each round) adds no label value and no /status key."""
    from byzps.core.rounds import REJECTION_REASONS
    ep = StatusEndpoint("127.0.0.1", 0, worker_ids=[0, 1], rounds=10 ** 6)
    for r in range(300):
        ep.update({"round": r, "accepted": [0, 7000 + r], "missing": [9000 + r],
                   "rejected": {"1": f"header claims worker {r}", str(5000 + r): "x"},
                   "workers": {"0": {"status": "accepted"}, str(8000 + r): {"status": "x"},
                               "1": {"status": "rejected", "states_refused": 2}}},
                  live_workers=[0, 1])
    m = samples(_latest(ep))
    workers = {dict(labels).get("worker") for _, labels in m} - {None}
    reasons = {dict(labels).get("reason") for _, labels in m} - {None}
    assert workers == {"0", "1"}
    assert reasons == {"other"} and "other" not in REJECTION_REASONS
    snap = ep.snapshot()
    assert set(snap["workers"]) == {"0", "1"} and snap["rejected_gradients"] == {
        "1": {"other": 300}}
    assert snap["missing"] == {} and snap["states_refused"] == {"1": 600}
    assert m[("byzps_states_refused_total", (("worker", "1"),))] == 600.0
    assert m[("byzps_accepted_total", (("worker", "0"),))] == 300.0


def _latest(ep) -> str:
    from prometheus_client import generate_latest
    return generate_latest(ep.registry).decode()
