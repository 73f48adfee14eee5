"""Fault injection with real processes on 127.0.0.1: crashes, silence, slow readers, hostile
frames, impersonation, duplicate ids, and a killed-and-resumed PS."""

from __future__ import annotations

import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

from byzps.net import auth
from byzps.net.wire import Auth, Challenge, Hello, Limits, MsgType, Refuse, decode_frame, encode

from conftest import model_signature, start_node, wait_for_port, write_config

TIMEOUT = 180


def wait_for_log(log: Path, pattern: str, limit: float = 90,
                 proc: subprocess.Popen | None = None) -> re.Match:
    """Wait until ``pattern`` appears in ``log``; fail early if ``proc`` exits first."""
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            time.sleep(0.2)
            text = log.read_text() if log.exists() else ""
            if re.search(pattern, text):
                return re.search(pattern, text)
            raise AssertionError(f"process exited ({proc.returncode}) before {pattern!r}:\n"
                                 f"{text}")
        m = re.search(pattern, log.read_text() if log.exists() else "")
        if m:
            return m
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in {log}:\n{log.read_text()}")


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def send(s: socket.socket, msg, **kw) -> None:
    s.sendall(b"".join(bytes(b) for b in encode(msg, **kw)))


def read_frame(s: socket.socket, d: int, allowed) -> object:
    head = b""
    while len(head) < 20:
        chunk = s.recv(20 - len(head))
        assert chunk, "closed"
        head += chunk
    hlen, plen = struct.unpack("<IQ", head[8:20])
    body = b""
    while len(body) < hlen + plen:
        body += s.recv(hlen + plen - len(body))
    return decode_frame(head + body, Limits(d, frozenset(allowed)))


def finish(server, workers, tmp_path, expect_rounds: int) -> str:
    assert server.wait(TIMEOUT) == 0, (tmp_path / "ps.log").read_text()
    for i, w in workers.items():
        assert w.wait(TIMEOUT) == 0, (tmp_path / f"w{i}.log").read_text()
    ps_log = (tmp_path / "ps.log").read_text()
    assert re.search(rf"final test accuracy: [0-9.]+ .* after {expect_rounds} rounds", ps_log), \
        ps_log
    return ps_log


def start_workers(cfg, tmp_path, ids, env=None):
    return {i: start_node(cfg, "worker", worker_id=i, log=tmp_path / f"w{i}.log") for i in ids}


def test_kill_9_worker_mid_run_training_goes_on(tmp_path, base_config):
    t = base_config["training"]
    t.update(rounds=30, round_timeout=3.0, eval_every=10)
    cfg = write_config(tmp_path / "c.yaml", base_config)
    server = start_node(cfg, "server", log=tmp_path / "ps.log")
    workers = start_workers(cfg, tmp_path, range(4))
    wait_for_log(tmp_path / "ps.log", r"round 10/30", proc=server)
    workers[2].send_signal(signal.SIGKILL)
    workers[2].wait()
    del workers[2]
    ps_log = finish(server, workers, tmp_path, 30)
    assert "worker 2" in ps_log and ("connection lost" in ps_log or "closed the connection"
                                      in ps_log)
    assert re.search(r"round 30/30: .* accepted \[0, 1, 3\]", ps_log), ps_log


def test_silent_worker_and_slowloris_reader_are_dropped(tmp_path, base_config):
    """Worker 3 registers and then neither answers nor reads; the round closes at its deadline
    with the quorum, and after max_missed_rounds the silent peer is dropped."""
    t = base_config["training"]
    t.update(rounds=8, round_timeout=1.5, eval_every=4, max_missed_rounds=2,
             model="cnn_mnist")           # 1.7 MB frames fill the socket buffers quickly
    base_config["server"]["write_timeout"] = 2.0
    cfg = write_config(tmp_path / "c.yaml", base_config)
    port = base_config["server"]["port"]
    server = start_node(cfg, "server", log=tmp_path / "ps.log")
    wait_for_port(port, server, tmp_path / "ps.log")
    silent = connect(port)
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    send(silent, Hello(3, None, model_signature(base_config)))
    wait_for_log(tmp_path / "ps.log", r"worker 3 .*registered")
    workers = start_workers(cfg, tmp_path, range(3))
    started = time.time()
    ps_log = finish(server, workers, tmp_path, 8)
    silent.close()
    assert "worker 3 dropped: missed 2 round deadlines in a row" in ps_log or \
        "dropped as too slow" in ps_log or "took no frame within" in ps_log, ps_log
    assert re.search(r"accepted \[0, 1, 2\]", ps_log)
    # bounded: 8 rounds, at most a few deadlines of 1.5 s, not a hang
    assert time.time() - started < 90


def test_hostile_frames_impersonation_and_duplicate_ids(tmp_path, base_config):
    """With authentication on: every bad frame closes only its own connection."""
    base_config["training"].update(rounds=6, eval_every=3)
    base_config["server"]["hello_timeout"] = 2.0
    keys = auth.generate_keys(range(4))
    auth.write_keys(tmp_path / "ps.secrets.yaml", keys)
    base_config["server"]["secrets_file"] = str(tmp_path / "ps.secrets.yaml")
    cfg = write_config(tmp_path / "c.yaml", base_config)
    port = base_config["server"]["port"]
    server = start_node(cfg, "server", log=tmp_path / "ps.log")
    wait_for_port(port, server, tmp_path / "ps.log")
    log = tmp_path / "ps.log"
    socks = []

    def hostile(data: bytes) -> socket.socket:
        s = connect(port)
        s.sendall(data)
        socks.append(s)
        return s

    hostile(b"\x00" * 7 + b"garbage")                                          # garbage bytes
    hostile(struct.pack("<4sBBHIQ", b"BZPS", 1, 1, 0, 20, 2 ** 40))             # 2^40 body
    hostile(struct.pack("<4sBBHIQ", b"BZPS", 1, 77, 0, 2, 0) + b"{}")           # unknown type
    hostile(pickle.dumps({"worker_id": 0}))                                    # a pickle
    cut = hostile(b"".join(bytes(b) for b in encode(Hello(0, "ab" * 32)))[:15])  # cut short
    cut.close()
    trickle = connect(port)                                                   # one byte at a time
    socks.append(trickle)
    for byte in b"".join(bytes(b) for b in encode(Hello(1, "cd" * 32)))[:6]:
        trickle.sendall(bytes([byte]))
        time.sleep(0.1)
    # no key: refused with a reason
    s = connect(port)
    send(s, Hello(0))
    reply = read_frame(s, 1, {MsgType.REFUSE})
    assert isinstance(reply, Refuse) and "requires authentication" in reply.reason
    # impersonator: claims worker 0, answers the challenge with a wrong key
    s = connect(port)
    send(s, Hello(0, "11" * 32))
    ch = read_frame(s, 1, {MsgType.CHALLENGE})
    assert isinstance(ch, Challenge)
    bad = auth.auth_tag(bytes(32), 0, bytes.fromhex("11" * 32), bytes.fromhex(ch.nonce))
    send(s, Auth(bad.hex()))
    reply = read_frame(s, 1, {MsgType.REFUSE})
    assert isinstance(reply, Refuse) and "wrong key" in reply.reason
    # the real workers, each with only its own key
    for i in range(4):
        auth.write_keys(tmp_path / f"w{i}.secrets.yaml", {i: keys[i]})
    workers = {}
    for i in range(4):
        env_cfg = dict(base_config, server=dict(base_config["server"],
                       secrets_file=str(tmp_path / f"w{i}.secrets.yaml")))
        wcfg = write_config(tmp_path / f"c{i}.yaml", env_cfg)
        workers[i] = start_node(wcfg, "worker", worker_id=i, log=tmp_path / f"w{i}.log")
    wait_for_log(log, r"worker 0 .*registered \(authenticated\)")
    # a second connection for a live id, with the right key: refused (retry later)
    s = connect(port)
    cn = auth.new_nonce()
    send(s, Hello(0, cn.hex(), model_signature(base_config)))
    ch = read_frame(s, 1, {MsgType.CHALLENGE})
    send(s, Auth(auth.auth_tag(keys[0], 0, cn, bytes.fromhex(ch.nonce)).hex()))
    reply = read_frame(s, 1, {MsgType.REFUSE})
    assert isinstance(reply, Refuse) and "already connected" in reply.reason and reply.retry
    ps_log = finish(server, workers, tmp_path, 6)
    for s in socks:
        s.close()
    for expected in ("bad magic", "expected exactly 0", "unknown message type 77",
                     "hello_timeout=2", "wrong key", "requires authentication",
                     "already connected", "accepted [0, 1, 2, 3]"):
        assert expected in ps_log, (expected, ps_log)
    assert "NO AUTHENTICATION" not in ps_log


def test_kill_9_ps_and_resume_gives_the_uninterrupted_model(tmp_path, base_config):
    t = base_config["training"]
    t.update(rounds=24, eval_every=24, checkpoint_every=2, round_timeout=10.0)
    # reference: an uninterrupted run
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    t["checkpoint_dir"] = str(ref_dir / "ckpt")
    cfg = write_config(ref_dir / "c.yaml", base_config)
    server = start_node(cfg, "server", log=ref_dir / "ps.log")
    workers = start_workers(cfg, ref_dir, range(4))
    ref_log = finish(server, workers, ref_dir, 24)
    ref_digest = re.search(r"PS replica digest ([0-9a-f]{32})", ref_log).group(1)
    # interrupted: kill -9 the PS after a checkpoint, resume it; the workers reconnect
    t["checkpoint_dir"] = str(tmp_path / "ckpt")
    cfg = write_config(tmp_path / "c.yaml", base_config)
    server = start_node(cfg, "server", log=tmp_path / "ps1.log")
    workers = start_workers(cfg, tmp_path, range(4))
    wait_for_log(tmp_path / "ps1.log", r"checkpoint of round ([4-9]|1[0-9]) written",
                 proc=server)
    server.send_signal(signal.SIGKILL)
    server.wait()
    killed_log = (tmp_path / "ps1.log").read_text()
    assert "final test accuracy" not in killed_log
    server = start_node(cfg, "server", "--resume", log=tmp_path / "ps.log")
    ps_log = finish(server, workers, tmp_path, 24)
    assert re.search(r"resumed from .* at round \d+", ps_log)
    digest = re.search(r"PS replica digest ([0-9a-f]{32})", ps_log).group(1)
    assert digest == ref_digest
    for i in range(4):   # the workers end on the same model too
        assert ref_digest in (tmp_path / f"w{i}.log").read_text()


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, base_config):
    t = base_config["training"]
    t.update(rounds=2, checkpoint_every=1, checkpoint_dir=str(tmp_path / "ckpt"))
    base_config["workers"] = base_config["workers"][:3]
    cfg = write_config(tmp_path / "c.yaml", base_config)
    server = start_node(cfg, "server", log=tmp_path / "ps.log")
    finish(server, start_workers(cfg, tmp_path, range(3)), tmp_path, 2)
    t["learning_rate"] = 0.01
    cfg = write_config(tmp_path / "c2.yaml", base_config)
    r = subprocess.run([os.sys.executable, "ps_node.py", "--config", str(cfg), "--role",
                        "server", "--resume"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent,
                       env={**os.environ, "PYTHONPATH": "src"})
    assert r.returncode == 2, r.stderr
    assert "training.learning_rate: checkpoint 0.05, config 0.01" in r.stderr


def test_ps_exits_after_retries_without_quorum_while_workers_stay_connected(tmp_path,
                                                                           base_config):
    """Worker 3 never comes; quorum is 4: the PS retries, gives up, stops the three connected
    workers and exits 1 (it must not idle after shutdown)."""
    base_config["training"].update(rounds=5, round_timeout=1.0, round_retries=2, quorum=4)
    # long enough for three workers to start on a busy machine (the suite runs two test
    # processes at once)
    base_config["server"].update(connect_timeout=25.0, min_workers=3)
    cfg = write_config(tmp_path / "c.yaml", base_config)
    server = start_node(cfg, "server", log=tmp_path / "ps.log")
    workers = start_workers(cfg, tmp_path, range(3))
    assert server.wait(TIMEOUT) == 1, (tmp_path / "ps.log").read_text()
    log = (tmp_path / "ps.log").read_text()
    assert "starting without workers [3]" in log
    assert "gave up after training.round_retries=2 retries" in log
    for i, w in workers.items():
        assert w.wait(60) == 1
        assert "the PS aborted" in (tmp_path / f"w{i}.log").read_text()
