"""Grid attack entries: labels (two parameterisations of one attack in one grid) and omniscient
attacks, which run only in simulation."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path

import pytest

from byzps.config import ConfigError
from byzps.grid import GridError, parse_grid
from byzps.job import omniscient_workers, parse_config
from byzps.launcher import launch

from conftest import write_config

ROOT = Path(__file__).resolve().parent.parent


def grid(base_config: dict, attacks: list) -> dict:
    """A 3-honest grid with one rule and the given attack entries (no run)."""
    base = {k: copy.deepcopy(v) for k, v in base_config.items()
            if k not in ("workers", "aggregation")}
    return {"base": base, "honest": 3,
            "sweep": {"aggregator": ["mean"], "attack": attacks, "f": [1]}}


def test_attack_labels_keep_two_scales_of_sign_flip_apart(base_config):
    g = parse_grid(grid(base_config, [
        "sign_flip", {"name": "sign_flip", "params": {"scale": -4.0}, "label": "sign_flip(-4)"},
        {"name": "alie", "params": {"omniscient": True}}]))
    assert [c.attack_display for c in g.cells] == ["sign_flip", "sign_flip(-4)", "alie"]
    assert [c.key for c in g.cells] == ["mean__sign_flip__f1__iid__s0",
                                        "mean__sign_flip--4-__f1__iid__s0",
                                        "mean__alie-omniscientTrue__f1__iid__s0"]
    cfg = g.config(g.cells[1])
    assert cfg["workers"][3] == {"id": 3, "type": "byzantine", "attack": "sign_flip",
                                 "attack_params": {"scale": -4.0}}
    assert g.cells[1].spec()["attack_label"] == "sign_flip(-4)"


def test_bad_attack_entries_are_named(base_config):
    with pytest.raises(GridError, match=r"sweep.attack entry .*unknown key\(s\) \['lable'\]"):
        parse_grid(grid(base_config, [{"name": "gaussian", "lable": "g"}]))
    with pytest.raises(GridError, match="omniscient must be true or false"):
        parse_grid(grid(base_config, [{"name": "ipm", "params": {"omniscient": "y"}}]))


def test_tcp_entry_points_refuse_omniscient_attacks(tmp_path, base_config):
    """ps_node (either role) and `byzps run` refuse a config with an omniscient attack before
    starting anything, naming the workers and where such a config can run."""
    base_config["workers"][3] = {"id": 3, "type": "byzantine", "attack": "alie",
                                 "attack_params": {"omniscient": True}}
    path = write_config(tmp_path / "c.yaml", base_config)
    assert omniscient_workers(parse_config(base_config)) == [3]
    for argv in (["--role", "server"], ["--role", "worker", "--worker-id", "0"]):
        proc = subprocess.run([sys.executable, str(ROOT / "ps_node.py"), "--config", str(path), *argv],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "attack_params.omniscient is true for worker id(s) 3," in proc.stderr
        assert "byzps simulate" in proc.stderr
    with pytest.raises(ConfigError, match=r"omniscient is true for worker id\(s\) 3,"):
        launch(path, tmp_path / "run", data_root="./data", out=io.StringIO())
    assert not (tmp_path / "run" / "server.log").exists()


def test_byzps_run_stops_the_workers_at_once_when_the_ps_fails(tmp_path, base_config):
    """The PS cannot bind its status port: `byzps run` stops the workers instead of letting them wait
    out connect_timeout (300 s here), and reports the PS's reason first."""
    import socket
    import time
    base_config["server"]["connect_timeout"] = 300.0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        base_config["server"]["metrics_port"] = taken.getsockname()[1]
        path = write_config(tmp_path / "c.yaml", base_config)
        out = io.StringIO()
        t0 = time.monotonic()
        summary = launch(path, tmp_path / "run", data_root="./data", out=out, poll=0.2)
        elapsed = time.monotonic() - t0
    text = out.getvalue()
    assert not summary.ok and summary.exit_codes["server"] == 1, text
    assert elapsed < 120, text
    lines = text.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("  "))
    assert lines[first].startswith("  server exited 1:") and "metrics_port" in lines[first], text
    assert "  worker-0 exited" in text and "stopped because the PS failed" in text
