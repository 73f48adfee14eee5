"""Grid attack entries: labels (two parameterisations of one attack in one grid) and omniscient
attacks, which run only in simulation."""

from __future__ import annotations

import copy

import pytest

from byzps.grid import GridError, parse_grid


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
