"""The PS and the workers as separate hosts: network namespaces made by this test.

Topology (all inside namespaces this test creates and deletes; nothing in the root namespace
is touched): a hub namespace holding a bridge, and one namespace per node joined to it by a
veth pair, addresses 10.231.0.0/24. The PS binds its own address, so ``server.host`` and
``server.bind_host`` are exercised for real. Mid-run one worker's link is cut (its bridge port
goes down: packets vanish, no reset), and training must go on without it. Where the kernel has
``sch_netem``, the PS's link also gets 20 ms of latency.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from test_faults import wait_for_log

from conftest import ROOT, node_env, write_config

SUFFIX = str(os.getpid() % 100000)
HUB = f"bzh{SUFFIX}"
NODES = {"ps": "10.231.0.1", "w0": "10.231.0.10", "w1": "10.231.0.11", "w2": "10.231.0.12"}


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def ns(node: str) -> str:
    return f"bz{node}{SUFFIX}"


def _can_make_namespaces() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"bzprobe{SUFFIX}"
    r = ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


REASON = _can_make_namespaces()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"cannot make test hosts: {REASON}")


@pytest.fixture
def hosts():
    """Create the hub and one namespace per node; yield whether netem latency is on."""
    ip("netns", "add", HUB)
    try:
        ip("-n", HUB, "link", "add", "br0", "type", "bridge")
        ip("-n", HUB, "link", "set", "br0", "up")
        for node, addr in NODES.items():
            ip("netns", "add", ns(node))
            ip("link", "add", f"v{node}{SUFFIX}", "type", "veth", "peer", "name",
               f"p{node}{SUFFIX}")
            ip("link", "set", f"v{node}{SUFFIX}", "netns", ns(node))
            ip("link", "set", f"p{node}{SUFFIX}", "netns", HUB)
            ip("-n", HUB, "link", "set", f"p{node}{SUFFIX}", "master", "br0", "up")
            ip("-n", ns(node), "addr", "add", f"{addr}/24", "dev", f"v{node}{SUFFIX}")
            ip("-n", ns(node), "link", "set", f"v{node}{SUFFIX}", "up")
            ip("-n", ns(node), "link", "set", "lo", "up")
        netem = subprocess.run(["ip", "netns", "exec", ns("ps"), "tc", "qdisc", "add", "dev",
                                f"vps{SUFFIX}", "root", "netem", "delay", "20ms"],
                               capture_output=True, text=True)
        yield netem.returncode == 0
    finally:
        for node in NODES:
            ip("netns", "del", ns(node), check=False)
        ip("netns", "del", HUB, check=False)


def start_in(node: str, cfg, role: str, log, worker_id: int | None = None):
    cmd = ["ip", "netns", "exec", ns(node), sys.executable, str(ROOT / "ps_node.py"),
           "--config", str(cfg), "--role", role]
    if worker_id is not None:
        cmd += ["--worker-id", str(worker_id)]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True,
                            env=node_env(), cwd=ROOT)


def test_separate_hosts_and_a_cut_link(tmp_path, base_config, hosts):
    base_config["workers"] = base_config["workers"][:3]
    base_config["aggregation"] = {"method": "coordinate_wise_median", "f": 1}
    base_config["training"].update(rounds=16, round_timeout=3.0, eval_every=4,
                                   max_missed_rounds=2)
    base_config["server"].update(host=NODES["ps"], bind_host=NODES["ps"], port=9000)
    cfg = write_config(tmp_path / "c.yaml", base_config)
    server = start_in("ps", cfg, "server", tmp_path / "ps.log")
    workers = {i: start_in(f"w{i}", cfg, "worker", tmp_path / f"w{i}.log", worker_id=i)
               for i in range(3)}
    try:
        wait_for_log(tmp_path / "ps.log", r"round 4/16", limit=180, proc=server)
        ip("-n", HUB, "link", "set", f"pw2{SUFFIX}", "down")   # worker 2's cable is pulled
        assert server.wait(240) == 0, (tmp_path / "ps.log").read_text()
        for i in (0, 1):
            assert workers[i].wait(60) == 0, (tmp_path / f"w{i}.log").read_text()
    finally:
        for p in [server, *workers.values()]:
            if p.poll() is None:
                p.kill()
    log = (tmp_path / "ps.log").read_text()
    assert re.search(r"listening on 10\.231\.0\.1:9000", log)
    assert re.search(r"worker 0 \(\('10\.231\.0\.10', \d+\)\) registered", log)
    assert "worker 2 dropped: missed 2 round deadlines in a row" in log
    assert re.search(r"round 16/16: .* accepted \[0, 1\]", log), log
    if not hosts:
        print("note: tc netem is not available in this kernel; ran without added latency")
