"""Config validation: good configs load, each kind of bad config gives a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from byzps.config import ConfigError
from byzps.job import aggregator_params, load_config, parse_config

from conftest import ROOT, write_config


def errors(cfg: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, "cfg.yaml")
    return str(e.value)


def test_example_config_loads():
    cfg = load_config(ROOT / "nodes_example.yaml")
    assert cfg.n == 4 and cfg.f == 1
    assert cfg.aggregation.method == "coordinate_wise_median"
    assert cfg.server.listen_host == "127.0.0.1"
    assert [cfg.shard_of(i) for i in range(4)] == [0, 1, 2, 3]


def test_json_and_yaml_are_the_same_schema(tmp_path, base_config):
    (tmp_path / "c.json").write_text(json.dumps(base_config))
    a = load_config(tmp_path / "c.json")
    b = load_config(write_config(tmp_path / "c.yml", base_config))
    assert a == b


def test_f_defaults_to_byzantine_count_and_krum_f_alias(base_config):
    assert parse_config(base_config).f == 1
    base_config["aggregation"] = {"method": "multi_krum", "krum_f": 1, "krum_q": 2}
    cfg = parse_config(base_config)
    assert cfg.f == 1 and aggregator_params(cfg)["q"] == 2


def test_data_shard_defaults_to_position(base_config):
    for w in base_config["workers"]:
        del w["data_shard"]
    assert [parse_config(base_config).shard_of(i) for i in range(4)] == [0, 1, 2, 3]


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["aggregation"].update(method="average"),
     "aggregation.method: unknown aggregator 'average'"),
    (lambda c: c["server"].pop("port"), "server.port: required field is missing"),
    (lambda c: c["server"].update(port=70000), "server.port: Input should be less than or equal"),
    (lambda c: c["server"].update(port=0), "server.port: Input should be greater than or equal"),
    (lambda c: c["training"].update(rounds="ten"), "training.rounds: Input should be a valid "
                                                   "integer"),
    (lambda c: c["training"].update(learning_rate="1e-3"), "write 1.0e-3"),
    (lambda c: c["training"].update(rounds=True), "on/off/yes/no"),
    (lambda c: c["training"].update(learning_rate=float("nan")), "training.learning_rate"),
    (lambda c: c["training"].update(lerning_rate=0.1),
     "training.lerning_rate: unknown field (did you mean 'learning_rate'? see README.md"),
    (lambda c: c["server"].update(zzz=1), "server.zzz: unknown field (check the spelling;"),
    (lambda c: c["workers"][1].update(id=0), "duplicate worker id(s) [0]"),
    (lambda c: c["workers"][1].update(data_shard=0), "data_shard [0] used by more than one"),
    (lambda c: c["workers"][1].update(data_shard=9), "data_shard 9 out of range: expected 0..3"),
    (lambda c: c["workers"][1].update(type="evil"), "workers.1.type: Input should be 'honest' "
                                                    "or 'byzantine'"),
    (lambda c: c.update(workers=[]), "workers: List should have at least 1 item"),
    (lambda c: c["aggregation"].update(method="multi_krum", krum_f=2),
     "aggregation: "),
    (lambda c: c["aggregation"].update(method="multi_krum", krum_f=1, krum_q=4),
     "aggregation: "),
    (lambda c: c["aggregation"].update(krum_q=2), "aggregation.krum_q: only meaningful for "
                                                  "multi_krum"),
    (lambda c: c["aggregation"].update(f=1, krum_f=0), "f=1 and its alias krum_f=0 disagree"),
    (lambda c: c.pop("server"), "server: required field is missing"),
    (lambda c: c.pop("training"), "training: required field is missing"),
])
def test_bad_configs_name_the_field(base_config, mutate, expected):
    mutate(base_config)
    msg = errors(base_config)
    assert expected in msg, msg
    assert msg.startswith("cfg.yaml: ")


def test_not_a_mapping_and_bad_syntax(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(p)
    p.write_text("training: {rounds: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "c.toml").write_text("")
    with pytest.raises(ConfigError, match="unknown config extension '.toml'"):
        load_config(tmp_path / "c.toml")


def test_yaml_octal_and_on_are_refused(tmp_path, base_config):
    text = write_config(tmp_path / "c.yaml", base_config).read_text()
    (tmp_path / "c.yaml").write_text(text.replace("seed: 0", "seed: on"))
    with pytest.raises(ConfigError, match="training.seed.*on/off/yes/no"):
        load_config(tmp_path / "c.yaml")


def test_cli_reports_config_error_in_one_line_with_exit_2(tmp_path, base_config):
    base_config["server"]["port"] = 123456
    p = write_config(tmp_path / "bad.yaml", base_config)
    r = subprocess.run([sys.executable, str(ROOT / "ps_node.py"), "--config", str(p), "--role",
                        "server"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "server.port" in lines[0], r.stderr


def test_cli_unknown_worker_id_exit_2(tmp_path, base_config):
    p = write_config(tmp_path / "c.yaml", base_config)
    r = subprocess.run([sys.executable, str(ROOT / "ps_node.py"), "--config", str(p), "--role",
                        "worker", "--worker-id", "7"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--worker-id 7 is not in" in r.stderr


@pytest.mark.parametrize("value", ["0700", "1:30", "-012"])
def test_yaml_octal_and_base60_integers_are_refused(tmp_path, base_config, value):
    text = write_config(tmp_path / "c.yaml", base_config).read_text()
    port = str(base_config["server"]["port"])
    (tmp_path / "c.yaml").write_text(text.replace(f"port: {port}", f"port: {value}"))
    with pytest.raises(ConfigError, match="ambiguous number"):
        load_config(tmp_path / "c.yaml")


def test_yaml_nan_is_refused(tmp_path, base_config):
    text = write_config(tmp_path / "c.yaml", base_config).read_text()
    (tmp_path / "c.yaml").write_text(text.replace("learning_rate: 0.05", "learning_rate: .nan"))
    with pytest.raises(ConfigError, match="training.learning_rate"):
        load_config(tmp_path / "c.yaml")
