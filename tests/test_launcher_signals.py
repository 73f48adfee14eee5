"""`byzps run` under signals and early failures, with real processes: SIGTERM to the launcher
stops every node it started (none is orphaned)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port, node_env, start_node, wait_for_port, write_config

BYZPS = [sys.executable, "-c", "import sys; from byzps.cli import byzps_main; "
                               "sys.exit(byzps_main())"]


def tiny(cfg: dict, rounds: int = 100_000) -> dict:
    """PS + 2 honest logreg workers on a few hundred examples: starts fast, runs long."""
    cfg["training"].update(rounds=rounds, model="logreg", train_limit=400, test_limit=100,
                           eval_every=1000, batch_size=16)
    cfg["workers"] = [{"id": 0, "type": "honest"}, {"id": 1, "type": "honest"}]
    return cfg


def children(pid: int) -> set[int]:
    """The direct children of ``pid`` (Linux /proc)."""
    out: set[int] = set()
    task = Path(f"/proc/{pid}/task")
    for t in task.iterdir() if task.exists() else []:
        try:
            out |= {int(c) for c in (t / "children").read_text().split()}
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_all(proc: subprocess.Popen, pids: set[int]) -> None:
    """SIGKILL whatever a test left running: ``pids`` and ``proc``."""
    for k in pids:
        if alive(k):
            os.kill(k, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()


def wait_for(cond, what: str, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def test_sigterm_to_byzps_run_stops_every_node(tmp_path, base_config):
    cfg = write_config(tmp_path / "c.yaml", tiny(base_config))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*BYZPS, "run", str(cfg), "--run-dir", str(run_dir)],
                            env=node_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    kids: set[int] = set()
    try:
        # the nodes are up once the PS has written a round record
        wait_for(lambda: proc.poll() is not None or (
            (run_dir / "metrics.jsonl").exists()
            and (run_dir / "metrics.jsonl").stat().st_size > 0), "the first round")
        assert proc.poll() is None, proc.communicate()[0]
        kids = children(proc.pid)
        assert len(kids) == 3
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 143, out
        assert "byzps run: terminated (SIGTERM)" in out
        assert "PS failed" not in out
        survivors = [k for k in kids if alive(k)]
        assert not survivors, f"nodes left running: {survivors}\n{out}"
    finally:
        kill_all(proc, kids)


def test_a_shard_smaller_than_a_batch_stops_byzps_run_before_any_node(tmp_path, base_config,
                                                                       capsys):
    from byzps.cli import byzps_main

    base_config["training"].update(train_limit=40, batch_size=32)   # 10 examples a shard
    cfg = write_config(tmp_path / "c.yaml", base_config)
    run_dir = tmp_path / "run"
    assert byzps_main(["run", str(cfg), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"config error: {cfg}: ") and "batch" in err[0]
    assert not (run_dir / "server.log").exists()
    assert not run_dir.exists()   # no run folder is left behind when no node started


def test_when_every_worker_fails_the_launcher_says_so_and_stops_the_ps(tmp_path, base_config):
    """The only worker stops on its own local error (label_flip with 5 classes refuses MNIST's
    labels): the launcher stops the PS at once and blames the worker, not the PS."""
    import io

    from byzps.launcher import launch

    base_config["training"].update(model="logreg", rounds=20, eval_every=20, train_limit=400,
                                   test_limit=100)
    base_config["server"]["connect_timeout"] = 600.0
    base_config["training"]["round_timeout"] = 600.0
    base_config["aggregation"] = {"method": "mean", "f": 0}
    base_config["workers"] = [{"id": 3, "type": "byzantine", "data_shard": 0,
                               "attack": "label_flip", "attack_params": {"num_classes": 5}}]
    out = io.StringIO()
    started = time.monotonic()
    summary = launch(write_config(tmp_path / "c.yaml", base_config), tmp_path / "run",
                     out=out, poll=0.2)
    text = out.getvalue()
    assert not summary.ok and summary.stopped == ["server"], text
    assert "byzps run: every worker has exited (exit status: worker-3 1); stopping the PS" in text
    # 143: the PS had installed its SIGTERM handler (it shuts down as on Ctrl-C); -15: the
    # signal came while it was still loading
    assert re.search(r"server exited (143|-15): stopped by byzps run after every worker had "
                     r"exited", text), text
    assert "worker-3 exited 1: worker error: worker 3 (byzantine): ValueError" in text
    assert "because the PS failed" not in text
    assert time.monotonic() - started < 300   # far below the 600 s timeouts


def test_test_local_sh_reads_relative_paths_from_the_callers_folder(tmp_path, base_config):
    from conftest import ROOT

    cfg = tiny(base_config, rounds=1)
    cfg["aggregation"] = {"method": "mean", "f": 0}
    write_config(tmp_path / "mine.yaml", cfg)
    env = dict(node_env(), MIN_ACC="0")
    res = subprocess.run([str(ROOT / "test_local.sh"), "mine.yaml", "--run-dir", "r"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "r" / "metrics.jsonl").exists()
    assert "byzps run: OK: 1/1 rounds" in res.stderr


def test_sigterm_to_a_hand_started_ps_tells_its_workers_to_stop(tmp_path, base_config):
    """ps_node.py --role server under SIGTERM (e.g. systemd, kill): it sends STOP to every
    worker, as on Ctrl-C, and exits 143; the workers end at once instead of waiting out
    server.connect_timeout (120 s here) for a PS that is gone."""
    data = tiny(base_config)
    data["server"].update(port=free_port(), connect_timeout=120.0)
    data["training"]["metrics_file"] = str(tmp_path / "m.jsonl")
    cfg = write_config(tmp_path / "c.yaml", data)
    ps = start_node(cfg, "server", log=tmp_path / "ps.log")
    wait_for_port(data["server"]["port"], ps, tmp_path / "ps.log")
    workers = [start_node(cfg, "worker", worker_id=i, log=tmp_path / f"w{i}.log")
               for i in (0, 1)]
    metrics = tmp_path / "m.jsonl"
    wait_for(lambda: ps.poll() is not None or (metrics.exists() and metrics.stat().st_size > 0),
             "the first round")
    assert ps.poll() is None, (tmp_path / "ps.log").read_text()
    ps.send_signal(signal.SIGTERM)
    assert ps.wait(timeout=30) == 143, (tmp_path / "ps.log").read_text()
    assert "terminated (SIGTERM): the workers were told to stop" in (tmp_path / "ps.log"
                                                                     ).read_text()
    t0 = time.monotonic()
    for i, w in enumerate(workers):
        code = w.wait(timeout=30)
        log = (tmp_path / f"w{i}.log").read_text()
        assert code == 1 and "the PS aborted: server shutting down" in log, log
    assert time.monotonic() - t0 < 30


def _long_grid(tmp_path, base_config, rounds: int = 100_000) -> Path:
    """Two logreg cells that run for a long time (each far beyond the test's waits)."""
    base = {k: v for k, v in base_config.items() if k not in ("workers", "aggregation")}
    base["training"] = dict(base["training"], model="logreg", rounds=rounds, eval_every=10**6,
                            train_limit=400, test_limit=100, batch_size=16)
    grid = {"base": base, "honest": 3, "sweep": {"aggregator": ["mean", "trimmed_mean"],
                                                 "attack": ["sign_flip"], "f": [1]}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _cells_of(pid: int) -> set[int]:
    """The grid's cell processes (its spawned children, not multiprocessing's tracker)."""
    out = set()
    for k in children(pid):
        try:
            cmd = Path(f"/proc/{k}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            out.add(k)
    return out


def _start_grid(path: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*BYZPS, "grid", str(path), "--out", str(out), "--jobs", "2",
                             "--no-plots", *extra], env=node_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.parametrize("how", ["SIGTERM to the grid", "Ctrl-C to the group",
                                 "SIGINT to the grid"])
def test_sigterm_and_ctrl_c_stop_byzps_grid_and_its_cells(tmp_path, base_config, how):
    path = _long_grid(tmp_path, base_config)
    out = tmp_path / "out"
    proc = _start_grid(path, out)
    cells: set[int] = set()
    try:
        wait_for(lambda: proc.poll() is not None or len(_cells_of(proc.pid)) == 2,
                 "two running cells")
        assert proc.poll() is None, proc.communicate()[0]
        cells = _cells_of(proc.pid)
        wait_for(lambda: len(list(out.glob("cells/*/metrics.jsonl"))) == 2, "both cells")
        if how.startswith("SIGTERM"):
            proc.send_signal(signal.SIGTERM)
        elif how.startswith("Ctrl-C"):
            os.killpg(proc.pid, signal.SIGINT)   # what a terminal sends the foreground
        else:
            proc.send_signal(signal.SIGINT)
        text, _ = proc.communicate(timeout=60)
        if how.startswith("SIGTERM"):
            assert proc.returncode == 143, text
            assert "byzps grid: terminated (SIGTERM); the running cells were stopped" in text
        else:
            assert proc.returncode == 130 and "interrupted" in text, text
        assert "Traceback" not in text, text
        wait_for(lambda: not any(alive(k) for k in cells), f"{how}: the cells to end", 10)
        assert not list(out.glob("cells/*/result.json"))   # none finished: none reported
    finally:
        kill_all(proc, cells)


def test_a_cell_process_that_dies_is_reported_and_the_grid_goes_on(tmp_path, base_config):
    path = _long_grid(tmp_path, base_config, rounds=300)
    out = tmp_path / "out"
    proc = _start_grid(path, out)
    try:
        wait_for(lambda: proc.poll() is not None or len(_cells_of(proc.pid)) == 2,
                 "two running cells")
        victim = min(_cells_of(proc.pid))
        os.kill(victim, signal.SIGKILL)
        text, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, text
    assert "CRASHED" in text and "without a result (killed? out of memory?)" in text, text
    assert "ended with exit code -9" in text, text
    assert len(list(out.glob("cells/*/result.json"))) == 1, text   # the other one finished
    # a rerun runs only the crashed cell
    rerun = subprocess.run([*BYZPS, "grid", str(path), "--out", str(out), "--no-plots"],
                           env=node_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "2 cells, 1 already done, 1 to run" in rerun.stderr
