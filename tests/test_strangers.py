"""Keyless strangers against the PS (issue 11, item 5): connection caps, the descriptor reserve,
the HELLO deadline under a flood, quiet logging, checkpoint write errors and honest error
messages. The flood test runs a real PS process with a low open-file limit on 127.0.0.1."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time

import pytest
import torch

from byzps import checkpoint
from byzps.job import parse_config
from byzps.net import auth

from conftest import ROOT, node_env, start_node, wait_for_port, write_config

FLOOD_NOFILE = 160   # open-file limit (soft = hard) of the PS process in the flood test


def _low_nofile():
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (FLOOD_NOFILE, FLOOD_NOFILE))


def _closed_by_peer(s: socket.socket) -> bool:
    """Whether the PS has closed (or reset) this connection; never blocks."""
    try:
        return s.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_stranger_flood_cannot_exhaust_descriptors_or_stop_checkpoints(tmp_path, base_config):
    """Waves of keyless connections from four source addresses, held open, while a PS with
    per-worker keys, 160 descriptors and a checkpoint every round trains: it finishes every
    round and checkpoint, closes each stranger within hello_timeout, and logs the flood in a
    few lines."""
    rounds = 25
    keys = auth.generate_keys(range(4))
    auth.write_keys(tmp_path / "ps.secrets.yaml", keys)
    t, s = base_config["training"], base_config["server"]
    t.update(rounds=rounds, model="mlp", eval_every=1000, checkpoint_every=1,
             checkpoint_dir=str(tmp_path / "ck"), metrics_file=str(tmp_path / "m.jsonl"),
             round_timeout=20.0)
    s.update(secrets_file=str(tmp_path / "ps.secrets.yaml"), hello_timeout=1.0,
             max_pending_connections=12, max_pending_per_address=6, fd_reserve=16)
    cfg = write_config(tmp_path / "c.yaml", base_config)
    log = tmp_path / "ps.log"
    cmd = [sys.executable, str(ROOT / "ps_node.py"), "--config", str(cfg), "--role", "server"]
    with open(log, "w") as out:
        ps = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=node_env(),
                              cwd=ROOT, preexec_fn=_low_nofile)
    waves: list[tuple[float, list[socket.socket]]] = []
    overdue: list[socket.socket] = []
    try:
        workers = [start_node(cfg, "worker", worker_id=i, log=tmp_path / f"w{i}.log")
                   for i in range(4)]
        deadline = time.time() + 120
        while not (tmp_path / "m.jsonl").exists() or \
                len((tmp_path / "m.jsonl").read_text().splitlines()) < 2:
            assert ps.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        port = s["port"]
        while ps.poll() is None and len(waves) < 40:
            wave = []
            for k in range(100):
                c = socket.socket()
                c.bind((f"127.0.0.{2 + k % 4}", 0))
                c.setblocking(False)
                try:
                    c.connect(("127.0.0.1", port))
                except BlockingIOError:
                    pass
                except OSError:   # the PS ended meanwhile
                    c.close()
                    continue
                wave.append(c)
            waves.append((time.monotonic(), wave))
            time.sleep(0.3)
            for opened, held in waves:   # hello_timeout 1 s (+ slack on a loaded machine)
                if time.monotonic() - opened > 6.0 and ps.poll() is None:
                    overdue += [c for c in held if not _closed_by_peer(c)]
                    held.clear()
        assert ps.wait(120) == 0, log.read_text()[-3000:]
        for w in workers:
            assert w.wait(60) == 0
    finally:
        for c in overdue + [c for _, held in waves for c in held]:
            c.close()
        if ps.poll() is None:
            ps.kill()
            ps.wait()
    text = log.read_text()
    assert not overdue, f"{len(overdue)} stranger connections outlived hello_timeout"
    assert sum(len(w) for _, w in waves) >= 500, "the flood was too short to mean anything"
    assert f"after {rounds} rounds" in text and "Traceback" not in text, text[-3000:]
    d = torch.load(tmp_path / "ck" / checkpoint.FILENAME, weights_only=True)["state"].shape[1]
    assert checkpoint.load(tmp_path / "ck", parse_config(base_config), d).round == rounds
    assert "could not be written" not in text, text[-3000:]
    flood_lines = [ln for ln in text.splitlines() if "refused" in ln or "peer (" in ln
                   or "did not complete" in ln or "accept()" in ln]
    assert 1 <= len(flood_lines) <= 60, "\n".join(flood_lines[:80])
    assert "similar lines left out" in text


# -- the parts, exactly -----------------------------------------------------------------------

def test_admission_caps_exact():
    from byzps.net.admission import Admission

    a = Admission(max_pending=3, max_pending_per_address=2, max_open=4)
    t1, _ = a.admit("10.0.0.1")
    t2, _ = a.admit("10.0.0.1")
    assert a.admit("10.0.0.1") == (None, "per-address cap")
    t3, _ = a.admit("10.0.0.2")
    assert a.admit("10.0.0.3") == (None, "pending cap")
    t1.promote()                       # registered: frees a pending slot, still open
    assert (a.pending, a.open) == (2, 3)
    t4, _ = a.admit("10.0.0.1")
    assert (a.pending, a.open) == (3, 4)
    t2.release()
    t2.release()                       # idempotent
    assert (a.pending, a.open) == (2, 3)
    t5, reason = a.admit("10.0.0.3")
    assert reason == "" and (a.pending, a.open) == (3, 4)
    assert a.admit("10.0.0.4") == (None, "descriptor budget")
    for t in (t1, t3, t4, t5):
        t.release()
    assert (a.pending, a.open) == (0, 0)
    with pytest.raises(ValueError, match="caps must be >= 1"):
        Admission(0, 1, 1)


def test_rate_limited_log_flush_reports_what_was_left_out(caplog):
    from byzps.logutil import RateLimitedLog

    rl = RateLimitedLog(logging.getLogger("byzps.test"), interval=10.0, burst=2,
                        clock=lambda: 100.0)
    with caplog.at_level(logging.WARNING, logger="byzps.test"):
        for i in range(1000):
            rl.log(logging.WARNING, "pending cap" if i % 2 else "per-address cap", "event %d", i)
        rl.flush()
        rl.flush()   # nothing left to report
    assert [r.getMessage() for r in caplog.records] == [
        "event 0", "event 1", "event 2", "event 3",   # two of each key
        "per-address cap: 498 similar lines left out", "pending cap: 498 similar lines left out"]


def test_checkpoint_write_error_is_logged_and_training_goes_on(tmp_path, base_config, caplog):
    from byzps.job import Job

    (tmp_path / "file").write_text("not a folder")
    base_config["training"]["checkpoint_dir"] = str(tmp_path / "file" / "ck")
    core = Job(parse_config(base_config), str(ROOT / "data")).ps_core()
    with caplog.at_level(logging.ERROR, logger="byzps.core.ps"):
        assert core.checkpoint() is False
    assert "could not be written" in caplog.text and "tries again" in caplog.text
    assert "cannot be resumed" in core.checkpoint_problem()
    base_config["training"]["checkpoint_dir"] = str(tmp_path / "ck")
    core = Job(parse_config(base_config), str(ROOT / "data")).ps_core()
    assert core.checkpoint() is True
    assert core.checkpoint_problem() is None
    assert [p.name for p in (tmp_path / "ck").iterdir()] == [checkpoint.FILENAME]


def test_a_run_whose_every_checkpoint_failed_does_not_end_ok(tmp_path, base_config):
    """The PS trains to the end but exits 1 with one line: the run cannot be resumed."""
    (tmp_path / "file").write_text("not a folder")
    base_config["training"].update(rounds=2, checkpoint_every=1, eval_every=2,
                                   checkpoint_dir=str(tmp_path / "file" / "ck"))
    base_config["workers"] = base_config["workers"][:2]
    cfg = write_config(tmp_path / "c.yaml", base_config)
    server = start_node(cfg, "server", log=tmp_path / "ps.log")
    wait_for_port(base_config["server"]["port"], server, tmp_path / "ps.log")
    workers = [start_node(cfg, "worker", worker_id=i, log=tmp_path / f"w{i}.log")
               for i in (0, 1)]
    assert server.wait(120) == 1, (tmp_path / "ps.log").read_text()
    for w in workers:
        w.wait(60)
    log = (tmp_path / "ps.log").read_text()
    assert "final test accuracy" in log
    assert "checkpoint error: no checkpoint could be written to" in log and \
        "2 attempts failed" in log and "cannot be resumed" in log


def test_an_unrelated_os_error_does_not_blame_the_port(tmp_path, base_config, capsys):
    from byzps.cli import main

    (tmp_path / "file").write_text("not a folder")
    base_config["training"]["metrics_file"] = str(tmp_path / "file" / "m.jsonl")
    cfg = write_config(tmp_path / "c.yaml", base_config)
    assert main(["--config", str(cfg), "--role", "server"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("server error: ") and str(tmp_path / "file") in err, err
    assert "port" not in err, err


@pytest.mark.parametrize("case", ["port in use", "address not here"])
def test_listen_errors_name_their_own_cause(tmp_path, base_config, capsys, case):
    """The port is blamed only when the OS says it is in use (EADDRINUSE)."""
    from byzps.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        srv = base_config["server"]
        if case == "port in use":
            srv["port"] = taken.getsockname()[1]
        else:
            srv["bind_host"] = "10.255.255.1"   # not an address of this machine
        assert main(["--config", str(write_config(tmp_path / "c.yaml", base_config)),
                     "--role", "server"]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on {srv['bind_host']}:{srv['port']}" in err, err
    hint = "the port is in use; change server.port" if case == "port in use" else \
        "check server.bind_host and server.port"
    assert hint in err and ("in use" in err) == (case == "port in use"), err
