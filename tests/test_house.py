"""The house rules of issue 12: import layering, the pinned model digest of the example job
(in simulation and over TCP), and a worker that stops on its own local error."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import yaml

from byzps.job import parse_config
from byzps.launcher import final_digest, launch
from byzps.simulate import simulate

from conftest import ROOT, free_port, start_node, wait_for_port, write_config

SRC = ROOT / "src" / "byzps"

#: PS replica digest after 3 rounds of nodes_example.yaml (cnn_mnist, median, 3 honest + 1
#: sign-flip), taken on the commit before the restructuring (main 8dcfa1b) with
#: `byzps simulate nodes_example.yaml --rounds 3` and with `byzps run` on the same config with
#: close_at: all; the 50-round digest of both was 435763845d94cfaf6c0745b4b6d765c0.
PINNED_3_ROUNDS = "61963bd038c2de5c2e016782d339dda6"


# -- imports ---------------------------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (lazy imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            out.add(base)
            # `from byzps import x` imports the module byzps.x when there is one
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    return {name: {m for m in _imports(p) if m in modules and m != name}
            for name, p in modules.items()}


def test_no_import_cycle_among_byzps_modules():
    """Package __init__ files aside (a package imports its own modules), no module reaches
    itself through imports."""
    graph = _graph()
    pkgs = {m for m in graph if (SRC.parent / m.replace(".", "/") / "__init__.py").exists()}
    edges = {m: {d for d in deps if d not in pkgs} for m, deps in graph.items() if m not in pkgs}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges.get(m, ())):
            assert state.get(d) != 1, f"import cycle: {' -> '.join(stack + [m, d])}"
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])


def test_core_does_no_io_and_simulate_uses_no_network_code():
    graph = _graph()
    for name, path in ((n, p) for n, p in ((_module_name(p), p) for p in SRC.rglob("*.py"))
                       if n.startswith("byzps.core")):
        raw = _imports(path)
        bad = sorted(m for m in raw if m.split(".")[0] in ("asyncio", "socket", "ssl")
                     or m.startswith("byzps.net"))
        assert not bad, f"{name} imports {bad}"
    # simulate, and everything it reaches, never touches byzps.net
    seen, todo = set(), ["byzps.simulate"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(graph[m])
    assert not [m for m in seen if m.startswith("byzps.net")], sorted(seen)
    # the schema imports no registry: only the safe file reader, itself a leaf
    assert "byzps.config" in seen and graph["byzps.config"] <= {"byzps.safeio"}, \
        graph["byzps.config"]
    assert not graph["byzps.safeio"]


# -- the pinned digest -----------------------------------------------------------------------

def _example(rounds: int) -> dict:
    cfg = yaml.safe_load((ROOT / "nodes_example.yaml").read_text())
    cfg["training"].update(rounds=rounds, close_at="all", test_limit=1000)   # eval: no effect on the model
    cfg["server"]["port"] = free_port()
    return cfg


def test_example_digest_is_pinned_in_simulation():
    assert simulate(parse_config(_example(3)), "./data").digest == PINNED_3_ROUNDS


def test_example_digest_is_pinned_over_tcp(tmp_path):
    path = write_config(tmp_path / "c.yaml", _example(3))
    out = io.StringIO()
    summary = launch(path, tmp_path / "run", data_root="./data", out=out, poll=0.2)
    assert summary.ok, out.getvalue() + (tmp_path / "run" / "server.log").read_text()
    assert final_digest(tmp_path / "run") == PINNED_3_ROUNDS


# -- local errors stop a worker --------------------------------------------------------------

def test_a_local_error_stops_the_worker_with_its_message(tmp_path, base_config):
    """Worker 3's attack refuses MNIST's labels (label_flip with 5 classes): the worker process
    exits 1 at its first round with the attack's message instead of reconnecting to the PS
    forever. It is the job's only worker (n = 1, f = 0), so the PS starts as soon as it comes."""
    base_config["training"].update(model="logreg", rounds=20, eval_every=20)
    base_config["aggregation"] = {"method": "mean", "f": 0}
    base_config["workers"] = [{"id": 3, "type": "byzantine", "data_shard": 0,
                               "attack": "label_flip", "attack_params": {"num_classes": 5}}]
    path = write_config(tmp_path / "c.yaml", base_config)
    ps = start_node(path, "server", log=tmp_path / "ps.log")
    wait_for_port(base_config["server"]["port"], ps, tmp_path / "ps.log")
    bad = start_node(path, "worker", worker_id=3, log=tmp_path / "w3.log")
    assert bad.wait(timeout=120) == 1
    log = (tmp_path / "w3.log").read_text()
    assert "worker error: worker 3 (byzantine): ValueError: label_flip: labels must be in " \
           "0..4" in log, log
    assert "reconnecting" not in log, log
