"""TLS (stdlib ssl) with authentication, end to end over 127.0.0.1."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess

import pytest

from byzps.net import auth

from conftest import ROOT, start_node, wait_for_port, write_config

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="openssl is needed to make test certificates")


def test_tls_and_auth_train_and_refuse_plaintext(tmp_path, base_config):
    subprocess.run(["bash", str(ROOT / "scripts" / "make_test_certs.sh"), str(tmp_path / "tls")],
                   check=True, capture_output=True)
    keys = auth.generate_keys(range(3))
    auth.write_keys(tmp_path / "keys.yaml", keys)
    base_config["workers"] = base_config["workers"][:3]
    base_config["training"].update(rounds=3)
    base_config["server"].update(
        secrets_file=str(tmp_path / "keys.yaml"), hello_timeout=3.0,
        tls={"cert": str(tmp_path / "tls" / "server.pem"),
             "key": str(tmp_path / "tls" / "server.key"), "ca": str(tmp_path / "tls" / "ca.pem")})
    cfg = write_config(tmp_path / "c.yaml", base_config)
    server = start_node(cfg, "server", log=tmp_path / "ps.log")
    workers = [start_node(cfg, "worker", worker_id=i, log=tmp_path / f"w{i}.log")
               for i in range(3)]
    # a plaintext byzps client gets no byzps service: only a TLS alert or a closed socket
    port = base_config["server"]["port"]
    wait_for_port(port, server, tmp_path / "ps.log")
    plain = socket.create_connection(("127.0.0.1", port), timeout=10)
    plain.sendall(b"BZPS" + b"\x00" * 40)
    try:
        reply = plain.recv(100)
    except (TimeoutError, ConnectionResetError):
        reply = b""
    plain.close()
    assert not reply.startswith(b"BZPS")
    assert server.wait(180) == 0, (tmp_path / "ps.log").read_text()
    for i, w in enumerate(workers):
        assert w.wait(180) == 0, (tmp_path / f"w{i}.log").read_text()
    log = (tmp_path / "ps.log").read_text()
    assert re.search(r"listening on 127\.0\.0\.1:\d+ \(TLS\)", log)
    assert log.count("(authenticated)") >= 3
    assert "after 3 rounds" in log


def test_worker_with_wrong_ca_cannot_connect(tmp_path, base_config):
    for name in ("a", "b"):
        subprocess.run(["bash", str(ROOT / "scripts" / "make_test_certs.sh"),
                        str(tmp_path / name)], check=True, capture_output=True)
    base_config["workers"] = base_config["workers"][:1]
    base_config["aggregation"] = {"method": "mean"}
    base_config["server"].update(connect_timeout=20.0, tls={
        "cert": str(tmp_path / "a" / "server.pem"), "key": str(tmp_path / "a" / "server.key"),
        "ca": str(tmp_path / "b" / "ca.pem")})          # a CA that did not sign the PS's cert
    cfg = write_config(tmp_path / "c.yaml", base_config)
    server = start_node(cfg, "server", log=tmp_path / "ps.log")
    wait_for_port(base_config["server"]["port"], server, tmp_path / "ps.log")
    worker = start_node(cfg, "worker", worker_id=0, log=tmp_path / "w0.log")
    assert worker.wait(120) == 1
    assert "certificate verify failed" in (tmp_path / "w0.log").read_text()
    assert server.wait(120) == 1
    assert "only 0 of 1 workers registered" in (tmp_path / "ps.log").read_text()
