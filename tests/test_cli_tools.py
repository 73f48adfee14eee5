"""The `byzps` command: list, keygen, plot, simulate, grid; the robust pipeline; round records."""

from __future__ import annotations

import csv
import json
import stat
import subprocess
import sys
import time

import pytest
import torch
import yaml

from byzps import aggregators
from byzps.cli import byzps_main, list_text
from byzps.config import ConfigError
from byzps.core.rounds import RoundClosed
from byzps.grid import GridError, load_grid, markdown_tables, parse_grid, run_grid
from byzps.job import build_robust, default_quorum, parse_config
from byzps.metrics import round_record, round_status
from byzps.net.auth import load_keys

from conftest import write_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- build_robust ----------------------------------------------------------------------------

def test_build_robust_without_pre_aggregators_is_the_bare_rule(base_config):
    cfg = parse_config(base_config)
    robust = build_robust(cfg)
    x = torch.randn(4, 50)
    agg = aggregators.build("coordinate_wise_median", f=1)
    assert torch.equal(robust(x), agg(x))
    assert robust.name == "coordinate_wise_median" and default_quorum(cfg, robust) == 3


def test_build_robust_chains_pre_aggregators_in_order(base_config):
    base_config["aggregation"] = {"method": "mean", "f": 1, "pre_aggregators": [
        {"name": "clipping", "threshold": 1.0}, {"name": "nnm"}]}
    robust = build_robust(parse_config(base_config))
    assert robust.name == "clipping+nnm>mean"
    assert [p.f for p in robust.pre] == [1, 1]    # f defaults to the config's f
    x = torch.randn(4, 30) * 10
    clip = aggregators.build_pre("clipping", threshold=1.0, f=1)
    nnm = aggregators.build_pre("nnm", f=1)
    assert torch.equal(robust(x), aggregators.build("mean", f=1)(nnm(clip(x))))


@pytest.mark.parametrize("pres, match", [
    ([{"name": "nope"}], r"aggregation.pre_aggregators.0: unknown pre-aggregator 'nope'"),
    ([{"name": "clipping", "threshold": -1.0}], r"pre_aggregators.0: clipping: parameter "
                                                r"'threshold'"),
    ([{"threshold": 1.0}], r"needs a string 'name'"),
    ([{"name": "bucketing", "s": 4}], r"trimmed_mean cannot run with n=1 rows"),
])
def test_bad_pre_aggregators_are_config_errors(base_config, pres, match):
    base_config["aggregation"] = {"method": "trimmed_mean", "pre_aggregators": pres}
    with pytest.raises(ConfigError, match=match):
        parse_config(base_config)


# -- round_record ----------------------------------------------------------------------------

def test_round_record_exact():
    closed = RoundClosed(round=4, accepted=(0, 2), rejected={3: "non-finite values"},
                         missing=(1,), losses={0: 1.0, 2: 2.0, 3: 9.0}, seconds_aggregate=0.5)
    rows = {0: torch.tensor([3.0, 4.0]), 2: torch.tensor([0.0, 0.0]),
            3: torch.tensor([float("nan"), 0.0])}
    rec = round_record(closed, worker_ids=[0, 1, 2, 3], seconds_round=1.25, test_loss=0.3,
                       test_accuracy=0.9, rows=rows, aggregate=torch.tensor([0.0, 0.0]),
                       latencies={0: 0.1}, now=100.0)
    assert rec == {
        "round": 4, "time": 100.0, "seconds_round": 1.25, "seconds_aggregate": 0.5,
        "accepted": [0, 2], "rejected": {"3": "non-finite values"}, "missing": [1],
        "reported_loss": 1.5, "test_loss": 0.3, "test_accuracy": 0.9,
        "workers": {"0": {"status": "accepted", "loss": 1.0, "distance": 5.0, "latency": 0.1},
                    "1": {"status": "missing"},
                    "2": {"status": "accepted", "loss": 2.0, "distance": 0.0},
                    "3": {"status": "rejected", "reason": "non-finite values", "loss": 9.0}}}
    json.dumps(rec)
    bare = round_record(closed, now=1.0)
    assert "test_accuracy" not in bare and "seconds_round" not in bare
    assert set(bare["workers"]) == {"0", "1", "2", "3"}
    assert round_status(rec, 10, 0.5) == ("round 5/10  acc 0.9000  loss 1.500  rejected 1  "
                                          "0.50 s/round")
    assert round_status(bare, 10, None, 0.8, show_round=False) == \
        "acc 0.8000  loss 1.500  rejected 1"


# -- byzps list / keygen / plot / simulate -----------------------------------------------------

def test_list_names_everything(capsys):
    assert byzps_main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == list_text()
    for name in ("multi_krum", "centered_clipping", "nnm", "bucketing", "alie", "label_flip",
                 "cnn_mnist", "small_cnn", "dirichlet", "gamma"):
        assert name in out
    assert "tau=10.0" in out and "estimate_batches=5" in out


def test_list_shows_real_defaults_and_says_where_f_comes_from():
    text = list_text()
    rows = {line.split()[0]: line.split(None, 1)[1] if len(line.split()) > 1 else ""
            for line in text.splitlines() if line.startswith("  ")}
    assert "f=0" not in text                       # f is not a per-rule default
    assert "f comes from aggregation.f" in text and "f defaults to aggregation.f" in text
    assert rows["multi_krum"] == "q=<n - f>"
    assert rows["mean"] == "-" and rows["nnm"] == "-"
    assert rows["centered_clipping"] == "tau=10.0, iterations=1, init='median'"
    assert rows["bucketing"] == "s=2, seed=0"
    assert rows["alie"].startswith("z=<derived from n and f>, estimate_batches=5, "
                                   "collude_seed=<own seed>")
    assert rows["sign_flip"] == "scale=-1.0"
    assert rows["dnc"] == "niters=5, b=10000, c=1.0, seed=0"
    for name in ("caf", "smea", "monna", "cge", "minmax", "minsum", "fang"):
        assert name in rows, name
    assert "estimate_batches=<n - f>" in rows["opt_alie"] and "evals=20" in rows["opt_ipm"]
    assert "=None" not in text                     # every None default says what it means


def test_keygen_writes_one_file_for_the_ps_and_one_per_worker(tmp_path, base_config):
    cfg = write_config(tmp_path / "c.yaml", base_config)
    assert byzps_main(["keygen", str(cfg), "--out", str(tmp_path / "keys")]) == 0
    ps = load_keys(tmp_path / "keys" / "ps.secrets.yaml")
    assert sorted(ps) == [0, 1, 2, 3] and len(set(ps.values())) == 4
    for i in range(4):
        p = tmp_path / "keys" / f"worker-{i}.secrets.yaml"
        assert load_keys(p) == {i: ps[i]}
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert byzps_main(["keygen", str(cfg), "--out", str(tmp_path / "keys")]) == 2  # no overwrite


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "m.jsonl"
    closed = RoundClosed(0, (0, 1), {}, (), {0: 2.0, 1: 2.2}, 0.01)
    with metrics.open("w") as fh:
        for r in range(5):
            rec = round_record(closed, now=float(r))
            rec["round"] = r
            rec["test_accuracy"] = 0.1 + 0.2 * r
            fh.write(json.dumps(rec) + "\n")
    out = tmp_path / "plots" / "out.png"
    assert byzps_main(["plot", str(metrics), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000
    (tmp_path / "empty.jsonl").write_text("")
    assert byzps_main(["plot", str(tmp_path / "empty.jsonl"), "-o", str(out)]) == 1


def test_plot_creates_missing_parent_folders_and_a_valid_png(tmp_path):
    pytest.importorskip("matplotlib")
    import struct
    import zlib

    metrics = tmp_path / "m.jsonl"
    closed = RoundClosed(0, (0, 1), {}, (), {0: 2.0, 1: 2.2}, 0.01)
    with metrics.open("w") as fh:
        for r in range(3):
            rec = round_record(closed, now=float(r), test_accuracy=0.5 + 0.1 * r,
                               test_loss=1.0 - 0.2 * r)
            rec["round"] = r
            fh.write(json.dumps(rec) + "\n")
    out = tmp_path / "out" / "deeper" / "dir" / "x.png"
    assert not out.parent.parent.parent.exists()
    assert byzps_main(["plot", str(metrics), "-o", str(out)]) == 0
    data = out.read_bytes()
    assert out.stat().st_size > 0 and data[:8] == PNG_MAGIC
    # first chunk IHDR with a positive size and a correct CRC; last chunk IEND
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert width > 0 and height > 0
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"


def test_run_min_accuracy_flag(monkeypatch, tmp_path, capsys):
    import io

    from byzps import launcher

    s = launcher.RunSummary({"server": 0, "worker-0": 0}, 5, 0.95, 1.0, tmp_path,
                            min_accuracy=0.97)
    assert not s.accuracy_ok and not s.ok
    assert launcher.RunSummary({"server": 0}, 5, 0.97, 1.0, tmp_path, min_accuracy=0.97).ok
    assert not launcher.RunSummary({"server": 0}, 5, None, 1.0, tmp_path, min_accuracy=0.0).ok
    assert launcher.RunSummary({"server": 0}, 5, None, 1.0, tmp_path).ok
    buf = io.StringIO()
    launcher._print_summary(s, 5, buf)
    assert buf.getvalue().startswith("byzps run: FAILED: 5/5 rounds, final test accuracy "
                                     "0.9500 (below --min-accuracy 0.97)")
    seen = {}

    def fake_launch(config, run_dir, **kw):
        seen.update(kw)
        return launcher.RunSummary({"server": 0}, 5, 0.96, 1.0, tmp_path,
                                   min_accuracy=kw["min_accuracy"])

    monkeypatch.setattr(launcher, "launch", fake_launch)
    assert byzps_main(["run", "x.yaml", "--run-dir", str(tmp_path), "--min-accuracy",
                       "0.97"]) == 1
    assert seen["min_accuracy"] == 0.97
    assert byzps_main(["run", "x.yaml", "--run-dir", str(tmp_path), "--min-accuracy",
                       "0.9"]) == 0
    assert byzps_main(["run", "x.yaml", "--run-dir", str(tmp_path)]) == 0
    assert seen["min_accuracy"] is None
    for bad in ("1.5", "nan", "x"):
        with pytest.raises(SystemExit) as e:
            byzps_main(["run", "x.yaml", "--min-accuracy", bad])
        assert e.value.code == 2
    assert "expected a number in [0, 1]" in capsys.readouterr().err


def test_simulate_command(tmp_path, base_config, capsys):
    base_config["training"]["rounds"] = 2
    cfg = write_config(tmp_path / "c.yaml", base_config)
    assert byzps_main(["simulate", str(cfg), "--metrics", str(tmp_path / "m.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "final test accuracy" in out and "after 2 rounds" in out and "digest" in out
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2
    bad = dict(base_config, aggregation={"method": "nope"})
    assert byzps_main(["simulate", str(write_config(tmp_path / "b.yaml", bad))]) == 2


# -- byzps grid --------------------------------------------------------------------------------

def tiny_grid(base_config) -> dict:
    base = {k: v for k, v in base_config.items() if k not in ("workers", "aggregation")}
    base["training"] = dict(base["training"], model="logreg", rounds=2, eval_every=1,
                            train_limit=1000, test_limit=200, batch_size=16)
    return {"base": base, "honest": 3, "sweep": {
        "aggregator": ["mean", {"method": "coordinate_wise_median", "label": "median"}],
        "attack": ["sign_flip"], "f": [1]}}


def test_grid_file_errors(base_config):
    g = tiny_grid(base_config)
    assert len(parse_grid(g).cells) == 2
    with pytest.raises(GridError, match="sweep.f: expected a non-empty list"):
        parse_grid(dict(g, sweep=dict(g["sweep"], f=[])))
    with pytest.raises(GridError, match="unknown key"):
        parse_grid(dict(g, extra=1))
    with pytest.raises(GridError, match=r"bulyan cannot run with n=4 rows and f=1"):
        parse_grid(dict(g, sweep=dict(g["sweep"], aggregator=["bulyan"])))


def test_grid_runs_resumes_and_reports(tmp_path, base_config):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(tiny_grid(base_config)))
    out = tmp_path / "out"
    results = run_grid(load_grid(path), out, data_root="./data", jobs=2, plots=True)
    assert len(results) == 2 and all(r["status"] == "ok" for r in results)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["rule"], r["attack"], r["f"]) for r in rows] == [
        ("mean", "sign_flip", "1"), ("median", "sign_flip", "1")]
    assert all(0.0 <= float(r["final_accuracy"]) <= 1.0 for r in rows)
    table = (out / "table.md").read_text()
    assert "Worst-case test accuracy over attacks (iid)" in table
    assert "| median |" in table and "| f = 1 |" in table
    if any(out.glob("*.png")):
        assert (out / "heatmap_f1_iid.png").read_bytes()[:8] == PNG_MAGIC
        assert (out / "curves_f1_iid.png").read_bytes()[:8] == PNG_MAGIC
    # resumable: a second run skips every cell
    stamp = (out / "cells" / results[0]["key"] / "result.json").stat().st_mtime_ns
    again = run_grid(load_grid(path), out, data_root="./data", jobs=1, plots=False)
    assert [r["final_accuracy"] for r in again] == [r["final_accuracy"] for r in results]
    assert (out / "cells" / results[0]["key"] / "result.json").stat().st_mtime_ns == stamp
    assert "PARTIAL" not in (out / "table.md").read_text()
    # --report runs nothing and writes the reports of the finished cells, saying what is missing
    (out / "cells" / results[1]["key"] / "result.json").unlink()
    assert byzps_main(["grid", str(path), "--out", str(out), "--report", "--no-plots"]) == 0
    assert not (out / "cells" / results[1]["key"] / "result.json").exists()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["rule"] for r in rows] == ["mean"]
    table = (out / "table.md").read_text()
    assert table.startswith("**PARTIAL**: 1 of 2 cells finished (")
    assert "Not finished:\n\n- sign_flip: median\n" in table and "| mean |" in table
    # another --rounds into the same folder would overwrite finished cells: refused
    other = load_grid(path)
    other.rounds = 3
    for report_only in (False, True):
        with pytest.raises(GridError, match=r"holds finished results of 1 cell\(s\) of this "
                                            r"grid made with another config, e\.g\. mean__"
                                            r"\S+ \(2 rounds there, 3 here\)"):
            run_grid(other, out, plots=False, report_only=report_only)
    assert json.loads((out / "cells" / results[0]["key"] / "result.json").read_text()
                      )["rounds"] == 2
    # a finished result.json whose config is not even a mapping of mappings: another config
    odd = out / "cells" / results[0]["key"] / "result.json"
    odd.write_text(json.dumps({"status": "ok", "spec": {}, "config": {"training": 5}}))
    with pytest.raises(GridError, match=r"e\.g\. mean__\S+ \(another config\)"):
        run_grid(load_grid(path), out, plots=False)
    # an output folder that cannot be one, or has never held a grid
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(GridError, match=r"output folder .*afile: cannot create .*afile/cells: "
                                        r"Not a directory"):
        run_grid(load_grid(path), afile, plots=False)
    with pytest.raises(GridError, match=r"no grid has run there"):
        run_grid(load_grid(path), tmp_path / "never", plots=False, report_only=True)
    assert not (tmp_path / "never").exists()


def test_markdown_worst_case_picks_the_minimum_over_attacks():
    def row(rule, attack, acc, f=1, status="ok"):
        return {"rule": rule, "attack": attack, "f": f, "distribution": "iid", "seed": 0,
                "status": status, "final_accuracy": acc}
    md = markdown_tables([row("mean", "a", 0.9), row("mean", "b", 0.2),
                          row("median", "a", 0.8), row("median", "b", None, status="failed")])
    assert "| mean | 0.2000 (b) |" in md
    assert "| median | 0.0000 (b) |" in md        # a failed run counts as 0
    assert "| median | 0.8000 | failed |" in md


def test_after_ctrl_c_a_node_that_lost_the_first_sigint_gets_it_again_then_sigterm(tmp_path):
    import signal as sig

    from byzps.launcher import LocalNode, _wait_all
    # real processes: one exits 130 on the second SIGINT (the first one lost, as a cancelled
    # asyncio.wait_for can lose it), one ignores SIGINT and ends only on SIGTERM
    code = ("import signal, sys, time\n"
            "seen = []\n"
            "def on_int(*_):\n"
            "    seen.append(1)\n"
            "    if len(seen) == 2 and sys.argv[1] == 'twice': sys.exit(130)\n"
            "signal.signal(signal.SIGINT, on_int)\nprint('up', flush=True)\n"
            "while True: time.sleep(0.05)\n")
    procs = {name: subprocess.Popen([sys.executable, "-c", code, mode], stdout=subprocess.PIPE,
                                    text=True, start_new_session=True)
             for name, mode in (("server", "twice"), ("worker-0", "never"))}
    for p in procs.values():
        assert p.stdout.readline().strip() == "up"
    nodes = {name: LocalNode(p) for name, p in procs.items()}
    for node in nodes.values():
        node.signal(sig.SIGINT)                     # what Ctrl-C sends first
    t0 = time.monotonic()
    _wait_all(nodes, interrupted=True, again=0.5, term=1.5)
    assert time.monotonic() - t0 < 10
    assert procs["server"].returncode == 130          # ended by the second SIGINT
    assert procs["worker-0"].returncode == -sig.SIGTERM


def test_simulate_names_the_config_in_a_task_error(tmp_path, capsys):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(yaml.safe_dump({
        "task": {"ref": str(tmp_path / "missing_task.py") + ":make"},
        "training": {"rounds": 2}, "aggregation": {"method": "mean"},
        "server": {"host": "127.0.0.1", "port": 9000}, "workers": [{"id": 0}, {"id": 1}]}))
    assert byzps_main(["simulate", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"config error: {cfg}: task '"), err
    assert "no such file" in err[0]
