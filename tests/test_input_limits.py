"""Bounds on what a user's files and flags may ask for: sizes that would exhaust memory, numbers
that overflow later, duplicate keys; each refused at load time with a one-line message naming
the field (issue: fresh-user hardening)."""

from __future__ import annotations

import copy
import re

import pytest

from byzps.config import MAX_WORKERS, ConfigError, validate_config
from byzps.grid import MAX_CELLS, GridError, parse_grid

from conftest import BASE_CONFIG


def tiny_grid() -> dict:
    base = {k: copy.deepcopy(v) for k, v in BASE_CONFIG.items()
            if k not in ("workers", "aggregation")}
    base["training"] = dict(base["training"], model="logreg", rounds=2)
    return {"base": base, "honest": 3,
            "sweep": {"aggregator": ["mean"], "attack": ["sign_flip"], "f": [1]}}


@pytest.mark.parametrize("change, match", [
    ({"honest": 100_000_000}, rf"honest: expected an integer in 1\.\.{MAX_WORKERS}"),
    ({"honest": MAX_WORKERS + 1}, rf"honest: expected an integer in 1\.\.{MAX_WORKERS}"),
    ({"sweep": {"f": [MAX_WORKERS - 2]}}, rf"sweep\.f: expected at most {MAX_WORKERS - 3}"),
    ({"sweep": {"f": [1_000_000_000]}}, rf"sweep\.f: expected at most {MAX_WORKERS - 3}"),
    ({"sweep": {"seed": list(range(MAX_CELLS + 1))}}, rf"{MAX_CELLS + 1} cells .*at most "
                                                      rf"{MAX_CELLS}"),
    ({"sweep": {"aggregator": [{"method": "mean", "label": "x" * 5000}]}},
     r"sweep\.aggregator\.0\.label: expected a non-empty string of at most 64"),
    ({"sweep": {"attack": [{"name": "sign_flip", "params": {"scale": -1.0},
                            "label": "y" * 64}],
                "aggregator": [{"method": "mean", "label": "x" * 64}],
                "distribution": [{"name": "dirichlet", "alpha": 0.5}] * 1}},
     None),
])
def test_grid_sizes_are_bounded_at_load(change, match):
    g = tiny_grid()
    for k, v in change.items():
        if k == "sweep":
            g["sweep"].update(v)
        else:
            g[k] = v
    if match is None:      # long but legal labels: the key stays a valid folder name
        assert all(len(c.key) <= 200 for c in parse_grid(g).cells)
        return
    with pytest.raises(GridError, match=match) as e:
        parse_grid(g, "g.yaml")
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_grid_key_too_long_for_a_folder_name():
    g = tiny_grid()
    g["sweep"]["attack"] = [{"name": "sign_flip", "params": {"scale": -1.0 - 1e-12}}]
    g["sweep"]["pre_aggregators"] = [[{"name": "clipping"}] * 30]
    with pytest.raises(GridError, match="expected at most 200; give the rule or attack a shorter"):
        parse_grid(g, "g.yaml")


@pytest.mark.parametrize("path, value, match", [
    (("workers", 0, "id"), 10**19, r"workers\.0\.id: Input should be less than 2147483648"),
    (("training", "seed"), 2**63, r"training\.seed: Input should be less than 2147483648"),
])
def test_ids_and_seeds_fit_the_wire_and_torch(path, value, match):
    cfg = copy.deepcopy(BASE_CONFIG)
    node = cfg
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)


def test_too_many_workers_is_one_short_line():
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["workers"] = [{"id": i} for i in range(MAX_WORKERS + 1)]
    with pytest.raises(ConfigError, match=rf"workers: List should have at most {MAX_WORKERS}"):
        validate_config(cfg)


@pytest.mark.parametrize("name", ["alie", "ipm", "mimic", "minmax", "fang"])
def test_estimate_batches_has_an_upper_bound(name):
    from byzps import attacks
    from byzps.attacks.base import MAX_ESTIMATE_BATCHES

    assert attacks.build(name, estimate_batches=MAX_ESTIMATE_BATCHES).estimate_batches == 64
    with pytest.raises(ValueError, match=r"estimate_batches must be in \d\.\.64, got 1000000000"):
        attacks.build(name, estimate_batches=10**9)


def test_estimate_batches_bound_names_the_worker_field(tmp_path):
    from byzps.job import load_config

    from conftest import write_config

    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["workers"][3] = {"id": 3, "type": "byzantine", "attack": "alie",
                         "attack_params": {"estimate_batches": 10**9}}
    with pytest.raises(ConfigError, match=r"workers\.3\.attack: attack 'alie': estimate_batches "
                                          r"must be in 2\.\.64"):
        load_config(write_config(tmp_path / "c.yaml", cfg))


# -- metrics files: read incrementally and with bounds ------------------------------------------

def test_line_follower_reads_only_what_was_appended(tmp_path):
    from byzps.safeio import LineFollower

    p = tmp_path / "m.jsonl"
    f = LineFollower(p, max_line_bytes=100)
    assert f.read_new() == []                       # not there yet
    p.write_bytes(b'{"round": 0}\n{"round": 1')     # a partial last line waits
    assert f.read_new() == [b'{"round": 0}']
    with p.open("ab") as fh:
        fh.write(b'}\n' + b"x" * 150)               # a line over the limit, still growing
    assert f.read_new() == [b'{"round": 1}']
    with p.open("ab") as fh:
        fh.write(b"x" * 150 + b'\n{"round": 2}\n')
    assert f.read_new() == [b'{"round": 2}'] and f.skipped == 1
    offset = f.offset
    assert offset == p.stat().st_size and f.read_new() == []
    p.write_bytes(b'{"round": 9}\n')                # replaced by a shorter file: from the start
    assert f.read_new() == [b'{"round": 9}']


def test_jsonl_follower_parses_new_records_only(tmp_path):
    from byzps.metrics import JsonlFollower

    p = tmp_path / "m.jsonl"
    p.write_text('{"round": 0}\nnot json\n')
    f = JsonlFollower(p)
    assert f.read_new() == [{"round": 0}]
    with p.open("r+") as fh:                        # earlier bytes are never read again
        fh.write('{"round": 7}')
        fh.seek(0, 2)
        fh.write('{"round": 1}\n')
    assert f.read_new() == [{"round": 1}]


def test_launcher_watch_prints_each_evaluated_round_once(tmp_path):
    """A real process appends records (one in two writes) while watch() polls the file."""
    import io
    import subprocess
    import sys

    from byzps.launcher import LocalNode, watch

    script = (
        "import json, time, sys\n"
        "p = sys.argv[1]\n"
        "for r in range(4):\n"
        "    line = json.dumps({'round': r, 'seconds_round': 0.1, 'rejected': {},\n"
        "                       'test_accuracy': 0.5 + r / 10 if r % 2 else None})\n"
        "    with open(p, 'a') as fh:\n"
        "        fh.write(line[:5]); fh.flush(); time.sleep(0.05)\n"
        "        fh.write(line[5:] + '\\n')\n"
        "    time.sleep(0.05)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "metrics.jsonl")],
                            start_new_session=True)
    out = io.StringIO()
    assert watch({"server": LocalNode(proc)}, tmp_path, 4, out, poll=0.02) is False
    text = out.getvalue()
    assert text.count("round 2/4") == 1 and text.count("round 4/4") == 1
    assert "acc 0.6000" in text and "acc 0.8000" in text


@pytest.mark.parametrize("target, match", [
    ("/dev/zero", r"metrics file /dev/zero: is a character device; expected a regular file"),
    ("DIR", r"is a folder; expected a regular file"),
    ("LONG", r"line 2 is longer than the limit of"),
])
def test_plot_refuses_what_it_cannot_read_whole(tmp_path, capsys, target, match):
    from byzps.cli import byzps_main
    from byzps.metrics import MAX_RECORD_BYTES

    if target == "DIR":
        target = str(tmp_path)
    elif target == "LONG":
        p = tmp_path / "m.jsonl"
        p.write_bytes(b'{"round": 0}\n' + b" " * (MAX_RECORD_BYTES + 1) + b"\n")
        target = str(p)
    assert byzps_main(["plot", target, "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(match, err)


def test_plot_into_a_folder_says_the_file_it_wrote(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from byzps.cli import byzps_main

    m = tmp_path / "m.jsonl"
    m.write_text('{"round": 0, "test_accuracy": 0.5, "reported_loss": 1.0}\n')
    out_dir = tmp_path / "plots"
    out_dir.mkdir()
    assert byzps_main(["plot", str(m), "-o", str(out_dir)]) == 0
    assert capsys.readouterr().out == f"wrote {out_dir / 'curves.png'}\n"
    assert (out_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert byzps_main(["plot", str(m), "-o", str(tmp_path / "noext")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'noext.png'}\n"
    assert (tmp_path / "noext.png").exists()


# -- messages instead of tracebacks ----------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_5000_digit_number_is_a_config_error(tmp_path, suffix):
    import json

    from byzps.config import read_config

    p = tmp_path / f"c{suffix}"
    p.write_text(json.dumps(BASE_CONFIG).replace('"rounds": 3', '"rounds": ' + "9" * 5000))
    with pytest.raises(ConfigError, match="a number has more digits than Python converts"):
        read_config(p)


def test_a_5000_digit_number_in_a_grid_file_is_a_grid_error(tmp_path):
    from byzps.grid import load_grid

    p = tmp_path / "g.yaml"
    p.write_text("honest: " + "9" * 5000 + "\n")
    with pytest.raises(GridError, match="a number has more digits than Python converts"):
        load_grid(p)


@pytest.mark.parametrize("target", ["DIR", "/dev/full"])
def test_simulate_metrics_that_cannot_be_written(tmp_path, capsys, target):
    import os

    from byzps.cli import byzps_main

    from conftest import write_config

    if target == "/dev/full" and not os.path.exists(target):
        pytest.skip("no /dev/full here")
    target = str(tmp_path) if target == "DIR" else target
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["training"].update(rounds=1, model="logreg", train_limit=200, test_limit=50)
    path = write_config(tmp_path / "c.yaml", cfg)
    assert byzps_main(["simulate", str(path), "--metrics", target]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("simulate: cannot ") and f"metrics file {target}: " in err[-1]


# -- duplicate keys ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text, match", [
    ("c.yaml", "DOC\ntraining:\n  rounds: 5\n",
     r"not valid YAML: duplicate key 'training' at line \d+ \(first at line 1\)"),
    ("c.yaml", "DOC_NO_TRAINING\ntraining: {rounds: 1, rounds: 2}\n",
     r"duplicate key 'rounds' at line \d+ \(first at line \d+\)"),
    ("c.json", '{"training": {"rounds": 1}, "training": {"rounds": 2}}',
     r"not usable JSON: duplicate key 'training'"),
])
def test_duplicate_keys_in_a_config_are_refused(tmp_path, name, text, match):
    import yaml

    from byzps.config import read_config

    doc = yaml.safe_dump(BASE_CONFIG, sort_keys=False)
    no_training = yaml.safe_dump({k: v for k, v in BASE_CONFIG.items() if k != "training"})
    p = tmp_path / name
    p.write_text(text.replace("DOC_NO_TRAINING", no_training).replace("DOC", doc))
    with pytest.raises(ConfigError, match=match) as e:
        read_config(p)
    assert len(str(e.value).splitlines()) == 1


def test_duplicate_keys_in_a_grid_file_are_refused(tmp_path):
    from byzps.grid import load_grid

    p = tmp_path / "g.yaml"
    p.write_text("honest: 3\nsweep:\n  f: [1]\n  f: [2]\n")
    with pytest.raises(GridError, match=r"duplicate key 'f' at line 4 \(first at line 3\)"):
        load_grid(p)


@pytest.mark.parametrize("value, hint", [("1e3", "1.0e+3"), ("5E-4", "5.0e-4"),
                                         ("2.5e6", "2.5e+6")])
def test_exponent_hint_is_valid_yaml_1_1(value, hint):
    import yaml

    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["training"]["learning_rate"] = value
    with pytest.raises(ConfigError, match=rf"write {re.escape(hint)}$"):
        validate_config(cfg)
    assert isinstance(yaml.safe_load(f"x: {hint}")["x"], float)


@pytest.mark.parametrize("command", ["simulate", "run", "grid"])
def test_a_data_root_that_does_not_exist_is_an_error(tmp_path, capsys, command):
    from byzps.cli import byzps_main

    missing = tmp_path / "dta"
    assert byzps_main([command, "nodes_example.yaml", "--data-root", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"usage error: --data-root: {missing}: no such folder (expected the folder " \
                  f"holding the dataset's files)\n"
