"""byzps on Ray: a real two-node Ray cluster, inside a network namespace this module makes.

Harness (:func:`ray_cluster`, once per module): ``unshare -n`` makes a network namespace that
holds only the loopback interface (``ip link set lo up``), together with a PID and a mount
namespace (``-p -f -m --mount-proc``) whose first process, a ``cat`` reading a pipe from this
test process, holds them; in it ``ray start --head --node-ip-address 127.0.0.1`` and
``ray start --address 127.0.0.1:PORT`` bring up two Ray nodes (1 CPU each, custom resources
``bz_head`` / ``bz_worker``), with Ray's token authentication on (``RAY_AUTH_MODE=token``, as
README's recipe says). Commands that use the cluster run in the namespaces through ``nsenter``.
Ray 2.60 binds the machine's primary address outside such a namespace; in it, loopback is all
there is. At the end the pipe is closed: ``cat`` ends, and with the PID namespace's first
process the kernel ends every Ray process in it; so does a test run that is killed outright
(the pipe closes with it).

Tests: the same grid gives the same ``results.csv`` numbers as local processes and on the
cluster, and resumes there; the local Ray instance that ``byzps grid --ray`` starts listens on
loopback only; cell resources and the cell progress lines (pure logic).
"""

from __future__ import annotations

import csv
import io
import json
import os
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
from hypothesis import given, strategies as st

from conftest import ROOT, node_env

from byzps.grid import CellProgress, cell_resources, load_grid, run_grid
from byzps.metrics import progress_bar

RAY_PORT = 6379          # free by construction: the namespace is new
RAY = Path(sys.executable).with_name("ray")


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
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats",
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
    assert info == {"nodes": 2, "cpus": 2.0, "ips": ["127.0.0.1"], "distinct": True}


def _grid_file(tmp_path: Path) -> Path:
    """Two tiny seeded cells (median x 2 attacks, logreg, 3 rounds, 1,000 examples): one per
    node of the cluster at a time."""
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
    assert "Ray: 2 node(s), 2 CPU(s), 0 GPU(s)" in r.stderr
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


@given(st.integers(-5, 200), st.integers(1, 100), st.integers(1, 40))
def test_progress_bar_has_a_fixed_width_and_fills_monotonically(done, total, width):
    bar = progress_bar(done, total, width)
    assert len(bar) == width + 2 and bar[0] == "[" and bar[-1] == "]"
    assert set(bar[1:-1]) <= {"#", "."} and "." + "#" not in bar   # filled part comes first
    assert bar.count("#") <= progress_bar(done + 1, total, width).count("#")
    if done <= 0:
        assert bar.count("#") == 0
    if done >= total:
        assert bar.count("#") == width


def test_progress_bar_and_cell_lines():
    assert progress_bar(0, 4, width=8) == "[........]"
    assert progress_bar(3, 4, width=8) == "[######..]"
    assert progress_bar(9, 4, width=8) == "[########]"
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


def test_progress_bar_redrawn_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    s = Tty()
    p = CellProgress(2, s)
    p.finished("a", {"status": "failed", "final_accuracy": None, "seconds": 1.0,
                     "seconds_per_round": 0.5})
    p.close()
    text = s.getvalue()
    assert text.startswith("\r\x1b[K[1/2] a: failed (1 s, 0.500 s/round); elapsed ")
    assert "\n[##########..........] 1/2 cells  elapsed " in text and text.endswith("\n")


def test_grid_ray_without_ray_installed_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    from byzps.cli import byzps_main
    monkeypatch.setitem(sys.modules, "ray", None)       # `import ray` raises ImportError
    path = _grid_file(tmp_path)
    assert byzps_main(["grid", str(path), "--out", str(tmp_path / "o"), "--ray"]) == 2
    err = capsys.readouterr().err
    assert 'grid error: --ray needs Ray' in err and 'pip install -e ".[ray]"' in err
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ   # restored


def test_unreachable_cluster_fails_fast_naming_the_address():
    from conftest import free_port
    from byzps.raycluster import probe_head, ray_session
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
