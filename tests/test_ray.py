"""byzps on Ray: a real two-node Ray cluster, inside a network namespace this module makes.

Harness (:func:`ray_cluster`, once per module): ``unshare -n`` makes a network namespace that
holds only the loopback interface (``ip link set lo up``), together with a PID and a mount
namespace (``-p -f -m --mount-proc``) whose first process, a ``cat`` reading a pipe from this
test process, holds them; in it ``ray start --head --node-ip-address 127.0.0.1`` and ``ray start
--address 127.0.0.1:PORT`` bring up two Ray nodes (3 logical CPUs each, so that a PS and four
workers fit as actors; custom resources ``bz_head`` / ``bz_worker``), with Ray's token
authentication on (``RAY_AUTH_MODE=token``, as README's recipe says). Commands that use the
cluster run in the namespaces through ``nsenter``. Ray 2.60 binds the machine's primary address
outside such a namespace; in it, loopback is all there is. At the end the pipe is closed:
``cat`` ends, and with the PID namespace's first process the kernel ends every Ray process in
it; so does a test run that is killed outright (the pipe closes with it).

Tests: the same grid gives the same ``results.csv`` numbers as local processes and on the
cluster, and resumes there; ``byzps run --ray`` on the cluster (keys, TLS, workers pinned by
resource) trains to the digest of a local ``byzps run``, and killing a worker actor mid-run
leaves the quorum training, after which Ctrl-C stops every node; the local Ray instance that
``byzps grid --ray`` starts listens on loopback only; cell resources, the cell progress lines
and the pieces of ``run --ray`` (pure logic).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from byzps.grid import CellProgress, cell_resources, load_grid, run_grid
from byzps.progress import Progress

from conftest import ROOT, node_env

RAY_PORT = 6379          # free by construction: the namespace is new
RAY = Path(sys.executable).with_name("ray")
BYZPS = Path(sys.executable).with_name("byzps")


UNSHARE = ["unshare", "--net", "--pid", "--fork", "--mount", "--mount-proc", "--kill-child",
           "--"]


def _namespace_problem() -> str | None:
    """Why this machine cannot make the test's namespaces, or None."""
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (util-linux / iproute2)"
    r = subprocess.run([*UNSHARE, "ip", "link", "set", "lo", "up"], capture_output=True,
                       text=True)
    if r.returncode != 0:
        return f"`{' '.join(UNSHARE)} ip link set lo up` failed: {r.stderr.strip()}"
    return None


class Cluster:
    """A running two-node Ray cluster in the namespaces of ``holder``'s child (their first
    process); :meth:`inside` runs a command there."""

    def __init__(self, holder: subprocess.Popen, env: dict, temp_dir: str) -> None:
        self.holder = holder
        self.first = int(Path(f"/proc/{holder.pid}/task/{holder.pid}/children").read_text()
                         .split()[0])
        self.env = env
        self.temp_dir = temp_dir
        self.address = f"127.0.0.1:{RAY_PORT}"
        self._node_ids: dict[str, str] | None = None

    def node_ids(self) -> dict[str, str]:
        """Custom resource (``bz_head``, ``bz_worker``) -> the Ray node id that has it."""
        if self._node_ids is None:
            r = self.inside(_python(f"""
                import json, ray
                ray.init(address="{self.address}", logging_level="error")
                print(json.dumps({{name: n["NodeID"] for n in ray.nodes() if n["Alive"]
                                  for name in ("bz_head", "bz_worker") if name in n["Resources"]}}))
                """), timeout=120)
            self._node_ids = json.loads(r.stdout.strip().splitlines()[-1])
        return self._node_ids

    def inside(self, cmd: list[str], timeout: float = 300, check: bool = True,
               **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` in the namespaces with the cluster's environment; fail with its output."""
        r = subprocess.run(["nsenter", "-t", str(self.first), "--net", "--pid", "--mount", "--",
                            *cmd], capture_output=True, text=True, env=self.env, cwd=ROOT,
                           timeout=timeout, **kw)
        if check:
            assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        return r

    def stop(self) -> None:
        """Close the pipe: the namespaces' first process ends and the kernel ends the rest."""
        self.holder.stdin.close()
        self.holder.wait(30)
        deadline = time.time() + 30
        while Path(f"/proc/{self.first}").exists() and time.time() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster():
    """A two-node Ray cluster on 127.0.0.1 inside a fresh network namespace (see the module
    docstring); skipped only where the namespace cannot be made."""
    problem = _namespace_problem()
    if problem is not None:
        pytest.skip(f"cannot make the Ray test namespace: {problem}")
    env = node_env()
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_USAGE_STATS_ENABLED="0")
    # a short folder: Ray's unix socket paths must stay under 108 bytes
    temp_dir = tempfile.mkdtemp(prefix="bzray", dir="/tmp")
    holder = subprocess.Popen([*UNSHARE, "sh", "-c", "ip link set lo up && echo up && exec cat"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "up"
    cluster = Cluster(holder, env, temp_dir)
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "3", "--disable-usage-stats",
              "--object-store-memory", str(80 * 1024 * 1024)]
    try:
        cluster.inside([str(RAY), "start", "--head", "--port", str(RAY_PORT),
                        "--include-dashboard", "false", "--temp-dir", temp_dir,
                        "--resources", '{"bz_head": 1}', *common], timeout=120)
        cluster.inside([str(RAY), "start", "--address", cluster.address,
                        "--resources", '{"bz_worker": 1}', *common], timeout=120)
        yield cluster
    finally:
        cluster.stop()


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_cluster_has_two_nodes_and_places_tasks_by_resource(ray_cluster):
    r = ray_cluster.inside(_python(f"""
        import json, os, ray
        ray.init(address="{ray_cluster.address}", logging_level="error")
        nodes = [n for n in ray.nodes() if n["Alive"]]
        @ray.remote(num_cpus=1)
        def node():
            return ray.get_runtime_context().get_node_id()
        on = {{name: ray.get(node.options(resources={{name: 1}}).remote())
              for name in ("bz_head", "bz_worker")}}
        print(json.dumps({{"nodes": len(nodes), "cpus": ray.cluster_resources()["CPU"],
                          "ips": sorted({{n["NodeManagerAddress"] for n in nodes}}),
                          "distinct": on["bz_head"] != on["bz_worker"]}}))
        """), timeout=120)
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info == {"nodes": 2, "cpus": 6.0, "ips": ["127.0.0.1"], "distinct": True}


def _grid_file(tmp_path: Path) -> Path:
    """Two tiny seeded cells (median x 2 attacks, logreg, 3 rounds, 1,000 examples)."""
    grid = {"base": {"training": {"rounds": 3, "batch_size": 16, "learning_rate": 0.05,
                                  "momentum": 0.9, "seed": 1, "model": "logreg",
                                  "eval_every": 1, "train_limit": 1000, "test_limit": 200},
                     "server": {"host": "127.0.0.1", "port": 9000}},
            "honest": 3,
            "sweep": {"aggregator": [{"method": "coordinate_wise_median", "label": "median"}],
                      "attack": ["sign_flip", {"name": "gaussian", "params": {"sigma": 5.0}}],
                      "f": [1]}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


TIMING = ("seconds", "seconds_per_round")


def _numbers(out: Path) -> list[dict]:
    rows = list(csv.DictReader((out / "results.csv").open()))
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _digests(out: Path) -> dict[str, str]:
    return {d.name: json.loads((d / "result.json").read_text())["digest"]
            for d in (out / "cells").iterdir()}


def _grid_on_cluster(cluster: Cluster, path: Path, out: Path) -> subprocess.CompletedProcess:
    return cluster.inside(_python(f"""
        import sys
        from byzps.cli import byzps_main
        sys.exit(byzps_main(["grid", "{path}", "--out", "{out}", "--no-plots",
                             "--ray", "{cluster.address}"]))
        """), timeout=400)


def test_grid_on_the_cluster_gives_the_local_numbers_and_resumes(ray_cluster, tmp_path):
    path = _grid_file(tmp_path)
    local = tmp_path / "local"
    run_grid(load_grid(path), local, jobs=2, plots=False, stream=io.StringIO())
    on_ray = tmp_path / "ray"
    r = _grid_on_cluster(ray_cluster, path, on_ray)
    assert "2 to run on the Ray cluster at 127.0.0.1:6379" in r.stderr, r.stderr
    assert "Ray: 2 node(s), 6 CPU(s), 0 GPU(s)" in r.stderr
    expected = _numbers(local)
    assert len(expected) == 2 and all(row["status"] == "ok" for row in expected)
    assert _numbers(on_ray) == expected
    assert _digests(on_ray) == _digests(local)
    for cell in (on_ray / "cells").iterdir():    # the driver wrote each cell's curve too
        assert len((cell / "metrics.jsonl").read_text().splitlines()) == 3

    # resumable: a lost cell is the only one that runs again; the others stay untouched
    cells = sorted((on_ray / "cells").iterdir())
    (cells[0] / "result.json").unlink()
    stamps = {c.name: (c / "result.json").stat().st_mtime_ns for c in cells[1:]}
    r = _grid_on_cluster(ray_cluster, path, on_ray)
    assert "1 already done, 1 to run" in r.stderr, r.stderr
    assert {c.name: (c / "result.json").stat().st_mtime_ns for c in cells[1:]} == stamps
    assert _numbers(on_ray) == expected


# -- byzps run --ray ----------------------------------------------------------------------------

def _run_config(tmp_path: Path, **training) -> dict:
    """n = 4 (3 honest + 1 sign-flip), f = 1, logreg on 1,000 examples: a fast TCP job."""
    return {"training": {"rounds": 3, "batch_size": 16, "learning_rate": 0.05, "momentum": 0.9,
                         "seed": 1, "model": "logreg", "eval_every": 1, "train_limit": 1000,
                         "test_limit": 200, "round_timeout": 60.0, **training},
            "aggregation": {"method": "coordinate_wise_median"},
            "server": {"host": "127.0.0.1", "port": 9000, "connect_timeout": 120.0},
            "workers": [{"id": i} for i in range(3)] + [{"id": 3, "type": "byzantine"}]}


def _run_on_cluster(cluster: Cluster, config: Path, run_dir: Path, kill: str | None = None,
                    after_rounds: int = 0, missing_rounds: int = 0
                    ) -> subprocess.CompletedProcess:
    """``byzps run CONFIG --ray ADDRESS`` as a driver on the cluster. With ``kill``
    (``worker-<id>``), a thread of the same driver ``ray.kill``s that node's actor once
    ``after_rounds`` rounds are in the run folder's metrics.jsonl and prints ``KILLED <rounds
    then>``; then, once the last ``missing_rounds`` records there show that worker missing (or
    after 120 s), sends the driver SIGINT (Ctrl-C) and prints ``INTERRUPTED <rounds then>``."""
    return cluster.inside(_python(f"""
        import json, os, signal, sys, threading, time
        from pathlib import Path
        from byzps.cli import byzps_main

        metrics = Path("{run_dir}") / "metrics.jsonl"

        def wait_for(rounds):
            while True:
                done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
                if done >= rounds:
                    return done
                time.sleep(0.05)

        def kill():
            import ray
            done = wait_for({after_rounds})
            ray.kill(ray.get_actor("{run_dir.name}/{kill}", namespace="byzps"))
            print("KILLED", done, flush=True)
            wid, give_up = "{(kill or '-').rsplit('-', 1)[-1]}", time.time() + 120
            while time.time() < give_up:
                lines = metrics.read_text().splitlines()[done:]
                last = [json.loads(x)["workers"][wid]["status"] for x in lines[:-1]]
                if len(last) >= {missing_rounds} and set(last[-{missing_rounds}:]) == {{"missing"}}:
                    break
                time.sleep(0.05)
            print("INTERRUPTED", len(metrics.read_text().splitlines()), flush=True)
            os.kill(os.getpid(), signal.SIGINT)

        if {kill is not None}:
            threading.Thread(target=kill, daemon=True).start()
        sys.exit(byzps_main(["run", "{config}", "--run-dir", "{run_dir}",
                             "--ray", "{cluster.address}"]))
        """), timeout=400, check=False)


def test_run_on_the_cluster_trains_to_the_local_digest_with_keys_and_tls(ray_cluster, tmp_path):
    from byzps.launcher import final_digest
    from byzps.net import auth

    cfg = _run_config(tmp_path, close_at="all")      # every answer: bit-exact
    auth.write_keys(tmp_path / "keys.yaml", auth.generate_keys(range(4)))
    cfg["server"]["secrets_file"] = str(tmp_path / "keys.yaml")
    tls = shutil.which("openssl") is not None
    if tls:      # a certificate for 127.0.0.1: the PS's node address on this cluster
        subprocess.run(["bash", str(ROOT / "scripts" / "make_test_certs.sh"),
                        str(tmp_path / "tls")], check=True, capture_output=True)
        cfg["server"]["tls"] = {k: str(tmp_path / "tls" / f) for k, f in
                                (("cert", "server.pem"), ("key", "server.key"), ("ca", "ca.pem"))}
    # workers 0 and 1 pinned to one node each by the cluster's custom resources
    cfg["workers"][0]["resources"] = {"bz_worker": 0.5}
    cfg["workers"][1]["resources"] = {"bz_head": 0.5}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))

    # the local `byzps run` runs meanwhile (both mostly wait for processes to start)
    local = subprocess.Popen([str(BYZPS), "run", str(path), "--run-dir", str(tmp_path / "local")],
                             env=node_env(), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    on_ray = tmp_path / "ray"
    r = _run_on_cluster(ray_cluster, path, on_ray)
    local_out = local.communicate(timeout=300)[0]
    assert local.returncode == 0, local_out
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Ray: 2 node(s), 6 CPU(s), 0 GPU(s)" in r.stderr
    assert "PS + 4 workers as Ray actors (SPREAD), PS on 127.0.0.1:" in r.stderr
    assert "byzps run: OK: 3/3 rounds" in r.stderr
    assert final_digest(on_ray) == final_digest(tmp_path / "local") is not None
    # what the driver gathered: every node's log and the PS's metrics
    assert len((on_ray / "metrics.jsonl").read_text().splitlines()) == 3
    server_log = (on_ray / "server.log").read_text()
    assert server_log.count("(authenticated)") == 4
    assert ("(TLS)" in server_log) == tls
    for i in range(4):
        assert "training finished after 3 rounds" in (on_ray / f"worker-{i}.log").read_text()
    # the keys reached the PS as an in-memory file, never as a path of this machine
    run_cfg = yaml.safe_load((on_ray / "config.yaml").read_text())
    assert run_cfg["server"]["secrets_file"].startswith("/dev/fd/")
    place = json.loads((on_ray / "placement.json").read_text())
    ids = ray_cluster.node_ids()
    assert place["worker-0"]["node_id"] == ids["bz_worker"]
    assert place["worker-1"]["node_id"] == ids["bz_head"]
    assert place["server"]["actor"] == "ray/server" and place["server"]["namespace"] == "byzps"


def test_killed_worker_actor_leaves_the_quorum_training_and_ctrl_c_stops_all(ray_cluster,
                                                                               tmp_path):
    rounds = 5000                    # far more than run before the Ctrl-C
    path = tmp_path / "run.yaml"     # close_at: quorum (the default), quorum n - f = 3
    path.write_text(yaml.safe_dump(_run_config(tmp_path, rounds=rounds, eval_every=1000)))
    on_ray = tmp_path / "ray"
    r = _run_on_cluster(ray_cluster, path, on_ray, kill="worker-1", after_rounds=5,
                        missing_rounds=25)
    out = r.stdout + r.stderr
    assert "KILLED" in r.stdout, out[-4000:]
    killed_at = int(r.stdout.split("KILLED")[1].split()[0])
    interrupted_at = int(r.stdout.split("INTERRUPTED")[1].split()[0])
    records = [json.loads(line) for line in (on_ray / "metrics.jsonl").read_text().splitlines()]
    assert [rec["round"] for rec in records] == list(range(len(records)))
    # killing the actor is killing the worker process: training goes on with the other three;
    # its node process died with the actor, so worker 1 never answers again. (The driver's
    # copy of metrics.jsonl, which the thread counts, lags the PS by up to one poll, so the
    # kill is found in the records: the last round worker 1 was accepted.)
    status = [rec["workers"]["1"]["status"] for rec in records]
    assert "accepted" in status[:killed_at]          # it trained until it was killed
    last = max(i for i, st in enumerate(status) if st == "accepted")
    after = records[last + 1:]
    assert len(after) >= 20, (killed_at, last, interrupted_at, len(records))
    assert all(rec["workers"]["1"]["status"] == "missing" for rec in after)
    assert all(sorted(rec["accepted"]) == [0, 2, 3] for rec in after)
    assert "  worker-1 exited -1: " in r.stderr, out
    assert ("byzps run --ray: the Ray actor of worker-1 is gone"
            in (on_ray / "worker-1.log").read_text().splitlines()[-1])
    # Ctrl-C reached the nodes through their actors: the PS stopped at once (the workers then
    # stop as in a local run), long before the last round, and no node process is left
    assert r.returncode == 130, out
    assert "byzps run: interrupted: " in r.stderr, out
    # 130, or -2 where the second SIGINT (5 s on) found it still shutting down
    assert re.search(r"  server exited (130|-2): interrupted", r.stderr), out
    assert (on_ray / "server.log").read_text().splitlines()[-1] == "interrupted"
    assert interrupted_at <= len(records) < rounds - 1000, len(records)
    left = ray_cluster.inside(["pgrep", "-f", "byzps.cli --config"], check=False)
    assert left.stdout.strip() == "", left.stdout


LISTENERS = """
    import json, os
    from byzps.raycluster import ray_session

    def sockets_of(pids):
        inodes = {}
        for pid in pids:
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes[link[8:-1]] = pid
            except OSError:
                pass
        out = []
        for table, width in (("tcp", 8), ("tcp6", 32)):
            for line in open(f"/proc/net/{table}").read().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in inodes:          # LISTEN
                    out.append(f[1].split(":")[0])
        return out

    def descendants(root):
        kids = {}
        for e in os.listdir("/proc"):
            if e.isdigit():
                try:
                    ppid = int(open(f"/proc/{e}/stat").read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError):
                    continue
                kids.setdefault(ppid, []).append(int(e))
        todo, seen = [root], []
        while todo:
            p = todo.pop()
            seen.append(p)
            todo += kids.get(p, [])
        return seen

    with ray_session(num_cpus=1) as ray:
        @ray.remote
        def one():
            return 1
        assert ray.get(one.remote()) == 1
        print(json.dumps(sockets_of(descendants(os.getpid()))))
"""

LOOPBACK_HEX = ("0100007F", "00000000000000000000000001000000",      # 127.0.0.1, ::1
                "0000000000000000FFFF00000100007F")                  # ::ffff:127.0.0.1


def test_local_ray_instance_listens_on_loopback_only():
    r = subprocess.run(_python(LISTENERS), capture_output=True, text=True, env=node_env(),
                       cwd=ROOT, timeout=180)
    assert r.returncode == 0, r.stderr
    addrs = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(addrs) >= 3, addrs       # GCS, raylet, worker at least
    assert all(a in LOOPBACK_HEX for a in addrs), addrs


# -- pure logic --------------------------------------------------------------------------------

def test_cell_resources():
    cpu = {"training": {"rounds": 1}, "workers": [{"id": 0}]}
    assert cell_resources(cpu) == {"num_cpus": 1, "num_gpus": 0}
    assert cell_resources({"training": {"device": "cuda:0"}}, threads=2) == {"num_cpus": 2,
                                                                             "num_gpus": 1}
    assert cell_resources({"training": {"device": "cpu"},
                           "workers": [{"id": 0, "device": "cuda"}]})["num_gpus"] == 1
    auto = {"training": {"device": "auto"}}
    assert cell_resources(auto)["num_gpus"] == 0                   # a cluster without GPUs
    assert cell_resources(auto, cluster_gpus=2)["num_gpus"] == 1


def test_cell_lines_without_a_terminal():
    s = io.StringIO()
    p = CellProgress(2, s)
    p.finished("a", {"status": "ok", "final_accuracy": 0.5, "seconds": 3.0,
                     "seconds_per_round": 0.25})
    p.crashed("b")
    p.close()
    lines = s.getvalue().splitlines()
    assert lines[0].startswith("[1/2] a: acc 0.5000 (3 s, 0.250 s/round); elapsed ")
    assert lines[1] == "[2/2] b: CRASHED"
    assert len(lines) == 2                      # not a terminal: no bar


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_cell_bar_on_a_terminal():
    s = _Tty()
    p = CellProgress(2, s)
    p.finished("a", {"status": "failed", "final_accuracy": None, "seconds": 1.0,
                     "seconds_per_round": 0.5})
    p.close()
    text = s.getvalue()
    assert "[1/2] a: failed (1 s, 0.500 s/round); elapsed " in text
    assert "1/2" in text.split("[1/2] a:")[-1]          # the bar, drawn after the line
    assert "elapsed" in text.rsplit("\r", 1)[-1]         # its status text: the timing


@given(st.lists(st.integers(0, 12), min_size=1, max_size=8))
def test_progress_bar_shows_the_last_count_and_plain_lines_only_off_a_terminal(counts):
    """One library draws every bar (tqdm): on a terminal the last drawn state names the last
    count; off a terminal nothing but the lines is written."""
    plain, tty = io.StringIO(), _Tty()
    for stream in (plain, tty):
        p = Progress(12, stream, unit="round")
        for k in counts:
            p.advance_to(k, f"status {k}")
        p.line("done")
        p.close()
    assert plain.getvalue() == "done\n"
    last = tty.getvalue().rsplit("\r", 1)[-1]
    assert f"{counts[-1]}/12" in last and f"status {counts[-1]}" in last
    assert "done\n" in tty.getvalue()


def test_grid_ray_without_ray_installed_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    from byzps.cli import byzps_main
    monkeypatch.setitem(sys.modules, "ray", None)       # `import ray` raises ImportError
    path = _grid_file(tmp_path)
    assert byzps_main(["grid", str(path), "--out", str(tmp_path / "o"), "--ray"]) == 2
    err = capsys.readouterr().err
    assert 'grid error: --ray needs Ray' in err and 'pip install -e ".[ray]"' in err
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ   # restored


def test_unreachable_cluster_fails_fast_naming_the_address():
    from byzps.raycluster import probe_head, ray_session

    from conftest import free_port
    port = free_port()                       # nothing listens there
    t0 = time.time()
    with pytest.raises(ConnectionError, match=rf"no Ray cluster answers at 127.0.0.1:{port}: "):
        with ray_session(f"127.0.0.1:{port}"):
            pass
    assert time.time() - t0 < 10
    with pytest.raises(ConnectionError, match="expected HOST:PORT"):
        probe_head("head-without-port")
    probe_head("auto")                       # Ray resolves these itself
    probe_head("ray://10.0.0.1:10001")


def test_a_ray_result_must_be_the_cells_own(tmp_path):
    from byzps.grid import _checked_result
    grid = load_grid(_grid_file(tmp_path))
    a, b = grid.cells
    good = {"spec": a.spec(), "status": "ok", "final_accuracy": 0.5}
    files = {"result.json": json.dumps(good), "metrics.jsonl": ""}
    assert _checked_result(files, a) == good
    for bad, msg in [(None, "did not return"), ({"result.json": "{"}, "did not return"),
                     (dict(files, **{"result.json": "{"}), "not JSON"),
                     (files, "not this cell's"),
                     (dict(files, **{"result.json": json.dumps(dict(good, status="x"))}),
                      "status 'x'")]:
        with pytest.raises(ValueError, match=msg):
            _checked_result(bad, b if bad is files else a)


# -- byzps run --ray: pure logic ------------------------------------------------------------------

def _cfg(**server):
    from byzps.job import parse_config
    data = {"training": {"rounds": 1}, "aggregation": {"method": "mean"},
            "server": {"host": "127.0.0.1", "port": 9000, **server},
            "workers": [{"id": 0}, {"id": 5, "resources": {"GPU": 1, "CPU": 2, "bz": 0.5}}]}
    return parse_config(data), data


def test_bundles_actor_options_and_what_fits():
    from byzps.rayrun import RayPlacementError, actor_options, check_fits, node_bundles, node_names
    cfg, _ = _cfg()
    names, bundles = node_names(cfg), node_bundles(cfg)
    assert names == ["server", "worker-0", "worker-5"]
    assert bundles == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 2.0, "GPU": 1.0, "bz": 0.5}]
    assert actor_options(bundles[2]) == {"num_cpus": 2.0, "num_gpus": 1.0,
                                         "resources": {"bz": 0.5}}
    assert actor_options({"CPU": 1, "memory": 1e9}) == {"num_cpus": 1, "num_gpus": 0,
                                                        "resources": {}, "memory": 1e9}
    check_fits(names, bundles, {"CPU": 4.0, "GPU": 1.0, "bz": 1.0})
    with pytest.raises(RayPlacementError, match=r"^worker-5 asks for Ray resource 'GPU' x 1; "
                                                r"the cluster has 0 "):
        check_fits(names, bundles, {"CPU": 8.0, "bz": 1.0})
    with pytest.raises(RayPlacementError, match=r"^the PS and 2 workers ask for Ray resource "
                                                r"'CPU' x 4 in all \(one actor each\); the "
                                                r"cluster has 3$"):
        check_fits(names, bundles, {"CPU": 3.0, "GPU": 1.0, "bz": 1.0})


def test_node_config_points_each_node_at_the_ps_and_its_own_files():
    from byzps.rayrun import node_config
    _, data = _cfg(secrets_file="keys/ps.yaml", bind_host="0.0.0.0",
                   tls={"cert": "c.pem", "key": "k.pem", "ca": "ca.pem"})
    out = node_config(data, "10.0.0.7", 4321, "/tmp/x/metrics.jsonl", {"secrets": "/dev/fd/9",
                                                                       "ca": "/dev/fd/10"})
    assert out["server"]["host"] == out["server"]["bind_host"] == "10.0.0.7"
    assert out["server"]["port"] == 4321
    assert out["server"]["secrets_file"] == "/dev/fd/9"
    assert out["server"]["tls"] == {"ca": "/dev/fd/10"}
    assert out["training"]["metrics_file"] == "/tmp/x/metrics.jsonl"
    assert data["server"]["host"] == "127.0.0.1" and data["server"]["tls"]["cert"] == "c.pem"
    bare = node_config(_cfg()[1], "h", 1, "m", {})
    assert bare["server"]["secrets_file"] is None and "tls" not in bare["server"]


def test_each_worker_actor_gets_only_its_own_key(tmp_path, monkeypatch):
    from byzps.net import auth
    from byzps.net.transport import TlsError
    from byzps.rayrun import node_files
    keys = auth.generate_keys([0, 5, 7])          # 7: in the PS's file, not in the config
    auth.write_keys(tmp_path / "ps.yaml", keys)
    (tmp_path / "ca.pem").write_bytes(b"CA")
    (tmp_path / "c.pem").write_bytes(b"CERT")
    (tmp_path / "k.pem").write_bytes(b"KEY")
    monkeypatch.delenv("BYZPS_SECRETS", raising=False)
    cfg, _ = _cfg(secrets_file=str(tmp_path / "ps.yaml"),
                  tls={"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem"),
                       "ca": str(tmp_path / "ca.pem")})
    files = node_files(cfg)

    def keys_in(text: bytes) -> dict:
        (tmp_path / "k.yaml").write_bytes(text)
        return auth.load_keys(tmp_path / "k.yaml")

    assert keys_in(files["server"]["secrets"]) == {0: keys[0], 5: keys[5]}
    assert keys_in(files["worker-0"]["secrets"]) == {0: keys[0]}
    assert keys_in(files["worker-5"]["secrets"]) == {5: keys[5]}
    assert {k: v for k, v in files["server"].items() if k != "secrets"} == {"cert": b"CERT",
                                                                           "key": b"KEY"}
    assert {k: v for k, v in files["worker-5"].items() if k != "secrets"} == {"ca": b"CA"}
    # $BYZPS_SECRETS wins, as for a manual run; a worker without a key stops the driver
    auth.write_keys(tmp_path / "env.yaml", {0: keys[0]})
    monkeypatch.setenv("BYZPS_SECRETS", str(tmp_path / "env.yaml"))
    with pytest.raises(auth.AuthError, match=r"env.yaml has no key for worker\(s\) \[5\]"):
        node_files(cfg)
    monkeypatch.delenv("BYZPS_SECRETS")
    (tmp_path / "ca.pem").unlink()
    with pytest.raises(TlsError, match=r"^server.tls.ca: cannot read .*ca.pem"):
        node_files(cfg)
    assert node_files(_cfg()[0]) == {"server": {}, "worker-0": {}, "worker-5": {}}


@pytest.mark.parametrize("resources, problem", [
    ({"GPU": 1.5}, "resources.GPU: expected an amount > 0 that is below 1 or a whole number"),
    ({"GPU": 0}, "resources.GPU: expected an amount > 0"),
    ({"bad name": 1}, "resources: name 'bad name' is not a Ray resource name"),
    ({f"r{i}": 1 for i in range(17)}, "resources: at most 16 entries, got 17"),
    ({"GPU": "1"}, "workers.0.resources.GPU"),
])
def test_worker_resources_are_checked_at_load_time(resources, problem):
    from byzps.config import ConfigError
    from byzps.job import parse_config
    data = {"training": {"rounds": 1}, "aggregation": {"method": "mean"},
            "server": {"host": "127.0.0.1", "port": 9000},
            "workers": [{"id": 0, "resources": resources}]}
    with pytest.raises(ConfigError, match=re.escape(problem)):
        parse_config(data)
    data["workers"][0]["resources"] = {"GPU": 1, "node:10.0.0.2": 0.01, "CPU": 0.5}
    assert parse_config(data).workers[0].resources == {"GPU": 1.0, "node:10.0.0.2": 0.01,
                                                       "CPU": 0.5}


def test_run_ray_without_ray_installed_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    from byzps.cli import byzps_main
    monkeypatch.setitem(sys.modules, "ray", None)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_run_config(tmp_path)))
    assert byzps_main(["run", str(path), "--run-dir", str(tmp_path / "r"), "--ray"]) == 2
    err = capsys.readouterr().err
    assert "run error: --ray needs Ray" in err and 'pip install -e ".[ray]"' in err


def test_scratch_folders_of_dead_actors_are_removed_and_live_ones_kept(tmp_path):
    from byzps.raynode import LIVE_LOCK, SCRATCH_PREFIX, remove_orphans
    hold = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(600)\n")
    folders = {k: tmp_path / f"{SCRATCH_PREFIX}{k}-x" for k in ("live", "dead", "new", "old")}
    for d in folders.values():
        d.mkdir()
        (d / "node.log").write_text("log")
    holders = {k: subprocess.Popen([sys.executable, "-c", hold, str(folders[k] / LIVE_LOCK)],
                                   stdout=subprocess.PIPE, text=True) for k in ("live", "dead")}
    try:
        for p in holders.values():
            assert p.stdout.readline().strip() == "held"
        holders["dead"].kill()                  # an actor that died without stop()
        holders["dead"].wait()
        os.utime(folders["old"], (time.time() - 3600, time.time() - 3600))
        other = tmp_path / "someone-else"
        other.mkdir()
        removed = remove_orphans(str(tmp_path))
        assert sorted(removed) == sorted(str(folders[k]) for k in ("dead", "old"))
        assert folders["live"].exists() and folders["new"].exists() and other.exists()
    finally:
        holders["live"].kill()
        holders["live"].wait()
    assert remove_orphans(str(tmp_path)) == [str(folders["live"])]

