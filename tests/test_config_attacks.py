"""Config fields of the attack library and worker momentum: workers[].attack, attack_params,
training.worker_momentum."""

from __future__ import annotations

import pytest

from byzps import attacks
from byzps.config import ConfigError
from byzps.job import load_config, parse_config

from conftest import write_config


def error(cfg: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, "cfg.yaml")
    assert len(e.value.problems) == 1, e.value.problems
    line = str(e.value)
    assert "\n" not in line
    return line


def test_defaults(base_config):
    cfg = parse_config(base_config)
    assert cfg.training.worker_momentum == 0.0
    w = cfg.worker(3)
    assert w.attack is None and w.attack_params == {}
    assert w.attack_spec() == ("sign_flip", {"scale": -1.0})     # attack_scale alone
    assert cfg.worker(0).attack_spec() == ("sign_flip", {"scale": -1.0})


def test_attack_scale_alone_means_sign_flip(base_config):
    base_config["workers"][3]["attack_scale"] = -4.0
    assert parse_config(base_config).worker(3).attack_spec() == ("sign_flip", {"scale": -4.0})


def test_attack_and_params_load(tmp_path, base_config):
    del base_config["workers"][3]["attack_scale"]
    base_config["workers"][3].update(attack="alie", attack_params={"estimate_batches": 3,
                                                                   "collude_seed": 7})
    base_config["training"]["worker_momentum"] = 0.9
    cfg = load_config(write_config(tmp_path / "c.yaml", base_config))
    assert cfg.training.worker_momentum == 0.9
    name, params = cfg.worker(3).attack_spec()
    assert (name, params) == ("alie", {"estimate_batches": 3, "collude_seed": 7})
    atk = attacks.build(name, **params)
    assert atk.estimate_batches == 3 and atk.collude_seed == 7


def test_sign_flip_by_name(base_config):
    del base_config["workers"][3]["attack_scale"]
    base_config["workers"][3].update(attack="sign_flip", attack_params={"scale": -3.0})
    assert parse_config(base_config).worker(3).attack_spec() == ("sign_flip", {"scale": -3.0})
    base_config["workers"][3]["attack_params"] = {}
    assert parse_config(base_config).worker(3).attack_spec() == ("sign_flip", {"scale": -1.0})


def test_every_attack_loads_with_defaults(base_config):
    del base_config["workers"][3]["attack_scale"]
    for name in attacks.names():
        base_config["workers"][3]["attack"] = name
        assert parse_config(base_config).worker(3).attack == name


def test_an_honest_entry_may_carry_an_attack_for_the_override(base_config):
    base_config["workers"][0].update(attack="nan")
    assert parse_config(base_config).worker(0).attack == "nan"


@pytest.mark.parametrize("mutate, expected", [
    (lambda w: w.update(attack="nope"),
     "workers.3.attack: unknown attack 'nope'; valid choices: alie, fang, gaussian"),
    (lambda w: w.update(attack="gaussian", attack_params={"sgima": 1.0}),
     "workers.3.attack: attack 'gaussian': unknown parameter(s) sgima; expected mu, sigma, "
     "collude_seed"),
    (lambda w: w.update(attack="ipm", attack_params={"epsilon": -1.0}),
     "workers.3.attack: attack 'ipm': epsilon must be > 0, got -1.0"),
    (lambda w: w.update(attack="alie", attack_params={"estimate_batches": "5"}),
     "workers.3.attack: attack 'alie': estimate_batches must be an integer, got '5'"),
    (lambda w: w.update(attack=5), "workers.3.attack: Input should be a valid string"),
    (lambda w: w.update(attack="nan", attack_params=[1]),
     "workers.3.attack_params: Input should be a valid dictionary"),
    (lambda w: w.update(attack_params={"scale": 2.0}),
     "workers.3.attack_params: given without workers.3.attack"),
])
def test_bad_attack_one_line_naming_the_worker(base_config, mutate, expected):
    del base_config["workers"][3]["attack_scale"]
    mutate(base_config["workers"][3])
    assert expected in error(base_config)


def test_attack_scale_only_with_sign_flip(base_config):
    base_config["workers"][3]["attack"] = "nan"  # attack_scale: -1.0 is still set
    assert "workers.3.attack_scale: only used by sign_flip, but attack is 'nan'" in \
        error(base_config)
    base_config["workers"][3].update(attack="sign_flip", attack_params={"scale": 2.0})
    assert "workers.3.attack_params.scale: sign_flip's scale is also given" in error(base_config)


def test_alie_z_checked_against_n_and_f(base_config):
    # n = 2, f = 0: s = floor(2/2 + 1) - 0 = 2 = n, so z = Phi^-1(0) is undefined
    base_config["aggregation"] = {"method": "mean"}
    base_config["workers"] = [{"id": 0}, {"id": 1, "attack": "alie"}]
    assert "workers.1.attack: alie: z = Phi^-1((n - s)/n)" in error(base_config)
    base_config["workers"][1]["attack_params"] = {"z": 1.0}
    assert parse_config(base_config).worker(1).attack_params == {"z": 1.0}


@pytest.mark.parametrize("value, expected", [
    (1.0, "training.worker_momentum: Input should be less than 1"),
    (-0.1, "training.worker_momentum: Input should be greater than or equal to 0"),
    ("0.5", "training.worker_momentum: Input should be a valid number"),
    (True, "training.worker_momentum"),
    (float("nan"), "training.worker_momentum"),
])
def test_worker_momentum_range(base_config, value, expected):
    base_config["training"]["worker_momentum"] = value
    assert expected in error(base_config)


def test_worker_momentum_with_server_momentum(base_config):
    base_config["training"].update(worker_momentum=0.9, momentum=0.0)
    t = parse_config(base_config).training
    assert (t.worker_momentum, t.momentum) == (0.9, 0.0)
