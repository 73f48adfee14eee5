"""Bring your own task (issue 13): a task from the config, Adam/SGD with a schedule, models
with BatchNorm buffers, device mirrors, the handshake's model check and clear errors for bad
user code. The TCP tests run real PS and worker processes on 127.0.0.1."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from byzps import optimizers
from byzps.cli import byzps_main
from byzps.job import Job, parse_config
from byzps.replica import Replica
from byzps.simulate import simulate

from conftest import ROOT, free_port, node_env, start_node, wait_for_port, write_config

TIMEOUT = 180
DIGEST = re.compile(r"PS replica digest ([0-9a-f]{32})")


def _config(optimizer: dict, rounds: int = 6, model: str = "mlp_bn") -> dict:
    """Synthetic task with a BatchNorm MLP, 3 honest + 1 sign-flip worker, every answer awaited
    (close_at all: the TCP run is then bit-reproducible)."""
    return {
        "task": {"ref": "synthetic", "params": {"model": model, "features": 12, "classes": 3,
                                                "hidden": 16, "train_size": 800,
                                                "test_size": 200}},
        "training": {"rounds": rounds, "batch_size": 16, "learning_rate": 0.01,
                     "momentum": 0.0 if optimizer["name"] != "sgd" else 0.9, "seed": 3,
                     "eval_every": 3, "round_timeout": 30.0, "close_at": "all",
                     "optimizer": optimizer, "lr_schedule": {"name": "cosine"}},
        "aggregation": {"method": "trimmed_mean", "f": 1},
        "server": {"host": "127.0.0.1", "port": free_port(), "bind_host": "127.0.0.1",
                   "connect_timeout": 150.0},
        "workers": [{"id": 0}, {"id": 1}, {"id": 2},
                    {"id": 3, "type": "byzantine", "attack": "sign_flip"}],
    }


def _cfg(optimizer: dict, **kw) -> dict:
    data = _config(optimizer, **kw)
    if data["training"]["optimizer"]["name"] != "sgd":
        data["training"].pop("momentum")
    return data


def _run_tcp(data: dict, folder: Path, *extra: str) -> tuple[str, list[str]]:
    """PS and workers as processes; returns the PS log and the workers' logs."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = write_config(folder / "c.yaml", data)
    server = start_node(cfg, "server", *extra, log=folder / "ps.log")
    wait_for_port(data["server"]["port"], server, folder / "ps.log")
    workers = [start_node(cfg, "worker", worker_id=w["id"], log=folder / f"w{w['id']}.log")
               for w in data["workers"]]
    code = server.wait(TIMEOUT)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(folder.glob("*.log")))
    assert code == 0, logs
    for w in workers:
        assert w.wait(TIMEOUT) == 0, logs
    return ((folder / "ps.log").read_text(),
            [(folder / f"w{w['id']}.log").read_text() for w in data["workers"]])


@pytest.mark.parametrize("optimizer", [{"name": "sgd", "weight_decay": 0.001},
                                       {"name": "adam"}], ids=["sgd", "adam"])
def test_tcp_digests_equal_every_round_and_equal_the_simulation(tmp_path, optimizer):
    """A BatchNorm model with SGD (momentum, weight decay) or Adam and a cosine schedule: every
    worker's replica equals the PS's before every round (a worker checks the digest each
    ROUND and would ask for a RESYNC), and the TCP run ends on the simulation's exact model."""
    data = _cfg(optimizer)
    sim = simulate(parse_config(copy.deepcopy(data)), "./data")
    ps_log, worker_logs = _run_tcp(data, tmp_path)
    digest = DIGEST.search(ps_log).group(1)
    assert digest == sim.digest
    for log in worker_logs:
        assert "resync" not in log.lower(), log
        assert f"replica digest {digest}" in log
    assert "differs" not in ps_log and "STATE" not in ps_log


def test_kill_9_ps_and_resume_with_adam_is_bit_exact(tmp_path):
    """Adam's moments and step count go into the checkpoint: a PS killed after a checkpoint
    and resumed ends on the uninterrupted run's model (the workers reconnect and resync), and
    so does every worker."""
    data = _cfg({"name": "adam"}, rounds=16)
    data["training"].update(checkpoint_every=2, eval_every=16)
    # the uninterrupted run's model: the simulation's (equal to a TCP run, test above)
    ref_digest = simulate(parse_config(copy.deepcopy(data)), "./data").digest
    data["training"]["checkpoint_dir"] = str(tmp_path / "ckpt")
    data["training"]["metrics_file"] = str(tmp_path / "metrics.jsonl")
    data["server"]["port"] = free_port()
    cfg = write_config(tmp_path / "c.yaml", data)
    server = start_node(cfg, "server", log=tmp_path / "ps1.log")
    wait_for_port(data["server"]["port"], server, tmp_path / "ps1.log")
    workers = [start_node(cfg, "worker", worker_id=w["id"], log=tmp_path / f"w{w['id']}.log")
               for w in data["workers"]]
    _wait_for(tmp_path / "ps1.log", r"checkpoint of round ([4-9]|1[0-3]) written", server)
    server.kill()
    server.wait()
    server = start_node(cfg, "server", "--resume", log=tmp_path / "ps.log")
    assert server.wait(TIMEOUT) == 0, (tmp_path / "ps.log").read_text()
    for w in workers:
        assert w.wait(TIMEOUT) == 0
    ps_log = (tmp_path / "ps.log").read_text()
    assert re.search(r"resumed from .* at round \d+", ps_log)
    assert DIGEST.search(ps_log).group(1) == ref_digest
    # the rounds done again after the resume are recorded once
    rounds = [json.loads(line)["round"] for line in
              (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(16))
    for w in data["workers"]:
        assert f"replica digest {ref_digest}" in (tmp_path / f"w{w['id']}.log").read_text()


def _wait_for(log: Path, pattern: str, proc, limit: float = 90) -> None:
    import time

    end = time.time() + limit
    while time.time() < end:
        if log.exists() and re.search(pattern, log.read_text()):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in {log}:\n{log.read_text() if log.exists() else ''}")


_TWO_ARCHS = textwrap.dedent('''
    import torch
    from torch import nn
    import byzps
    from byzps.task import LabeledTensors

    class Toy(byzps.Task):
        def __init__(self, act="relu", hidden=8):
            self.act, self.hidden = act, hidden
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(400, 6, generator=g)
            self.y = (self.x[:, 0] > 0).long()
        def build_model(self):
            act = nn.ReLU() if self.act == "relu" else nn.Tanh()
            return nn.Sequential(nn.Linear(6, self.hidden), act, nn.Linear(self.hidden, 2))
        def train_data(self):
            return LabeledTensors(self.x, self.y)
        def test_data(self):
            return LabeledTensors(self.x[:100], self.y[:100])

    def make(**params):
        return Toy(**params)
''')


def test_a_user_task_trains_over_tcp_and_workers_with_another_model_are_refused(tmp_path):
    """A task from a user's file over TCP: two processes claiming worker 0 with another model
    (same d and another activation; another d) are refused at the handshake with a message
    naming both models; then worker 0 with the PS's config trains."""
    (tmp_path / "toy.py").write_text(_TWO_ARCHS)
    data = {"task": {"ref": str(tmp_path / "toy.py") + ":make", "params": {}},
            "training": {"rounds": 3, "batch_size": 8, "learning_rate": 0.1, "seed": 0,
                         "round_timeout": 10.0, "eval_every": 3},
            "aggregation": {"method": "mean"},
            "server": {"host": "127.0.0.1", "port": free_port(), "bind_host": "127.0.0.1",
                       "connect_timeout": 150.0},
            "workers": [{"id": 0}]}
    ps_cfg = write_config(tmp_path / "ps.yaml", data)
    server = start_node(ps_cfg, "server", log=tmp_path / "ps.log")
    wait_for_port(data["server"]["port"], server, tmp_path / "ps.log")
    ours = Job(parse_config(copy.deepcopy(data))).replica().signature()
    refused = {}
    for wid, params in ((1, {"act": "tanh"}), (2, {"hidden": 9})):
        other = copy.deepcopy(data)
        other["task"]["params"] = params
        refused[wid] = (start_node(write_config(tmp_path / f"w{wid}.yaml", other), "worker",
                                   worker_id=0, log=tmp_path / f"w{wid}.log"),
                        Job(parse_config(other)).replica().signature())
    for wid, (proc, theirs) in refused.items():
        assert proc.wait(TIMEOUT) == 1
        log = (tmp_path / f"w{wid}.log").read_text()
        assert theirs != ours
        assert "worker 0's model differs from the PS's" in log, log
        assert f"the worker has {theirs!r}, the PS has {ours!r}" in log, log
    assert ours.split()[1] == refused[1][1].split()[1]          # same d, other layers
    assert ours.split()[1] != refused[2][1].split()[1]          # another d
    worker = start_node(ps_cfg, "worker", worker_id=0, log=tmp_path / "w0.log")
    assert server.wait(TIMEOUT) == 0, (tmp_path / "ps.log").read_text()
    assert worker.wait(TIMEOUT) == 0
    ps_log = (tmp_path / "ps.log").read_text()
    assert "final test accuracy" in ps_log and \
        DIGEST.search(ps_log).group(1) in (tmp_path / "w0.log").read_text()


_BAD = {
    "does-not-import": ("def make(:\n", "importing"),
    "factory-raises": ("def make(**kw):\n    raise RuntimeError('no GPU here')\n",
                       "make() raised RuntimeError: no GPU here"),
    "wrong-types": (textwrap.dedent('''
        import numpy as np, torch
        from torch import nn
        class T:
            def build_model(self): return nn.Linear(3, 2)
            def train_data(self): return [(np.zeros(3, dtype=np.float32), 0)] * 50
            def test_data(self): return [(np.zeros(3, dtype=np.float32), 0)] * 10
        def make(): return T()
        '''), "the input is ndarray, expected a torch.Tensor"),
    "label-out-of-range": (textwrap.dedent('''
        import torch
        from torch import nn
        class T:
            def build_model(self): return nn.Linear(3, 2)
            def train_data(self): return [(torch.zeros(3), i % 5) for i in range(50)]
            def test_data(self): return [(torch.zeros(3), 0) for i in range(10)]
        def make(): return T()
        '''), "expected a label in 0..1 (the model has 2 outputs)"),
    "sys-exit": ("import sys\ndef make(**kw):\n    sys.exit(0)\n",
                 "make() raised SystemExit: 0"),
    "test-label-out-of-range": (textwrap.dedent('''
        import torch
        from torch import nn
        class T:
            def build_model(self): return nn.Linear(3, 2)
            def train_data(self): return [(torch.zeros(3), i % 2) for i in range(50)]
            def test_data(self): return [(torch.zeros(3), 7 if i == 50 else 0)
                                         for i in range(100)]
        def make(): return T()
        '''), "test_data() holds label 7, expected labels in 0..1 (the model has 2 outputs)"),
    "huge-length": (textwrap.dedent('''
        import torch
        from torch import nn
        class Huge:
            def __len__(self): return 10**12
            def __getitem__(self, i): return torch.zeros(3), 0
        class T:
            def build_model(self): return nn.Linear(3, 2)
            def train_data(self): return Huge()
            def test_data(self): return Huge()
        def make(): return T()
        '''), "has 1000000000000 items; expected at most 2147483647"),
}


@pytest.mark.parametrize("case", sorted(_BAD))
def test_bad_user_code_fails_at_start_up_with_one_message_and_exit_2(tmp_path, capsys,
                                                                       case):
    source, expected = _BAD[case]
    (tmp_path / "bad.py").write_text(source)
    data = {"task": {"ref": str(tmp_path / "bad.py") + ":make"},
            "training": {"rounds": 2, "batch_size": 4, "learning_rate": 0.1, "seed": 0},
            "aggregation": {"method": "mean"},
            "server": {"host": "127.0.0.1", "port": 9000},
            "workers": [{"id": 0}, {"id": 1}]}
    assert byzps_main(["simulate", str(write_config(tmp_path / "c.yaml", data))]) == 2
    err = capsys.readouterr().err
    assert f"task '{tmp_path / 'bad.py'}:make'" in err and expected in err, err
    assert "Traceback" not in err


def test_a_plain_map_style_dataset_without_targets_trains(tmp_path):
    """A task whose datasets are plain map-style datasets (no ``targets``, no ``batch``):
    the job reads labels and batches item by item."""
    (tmp_path / "plain.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn
        from torch.utils.data import Dataset
        class Points(Dataset):
            def __init__(self, n, seed):
                g = torch.Generator().manual_seed(seed)
                self.x = torch.randn(n, 4, generator=g)
            def __len__(self): return len(self.x)
            def __getitem__(self, i): return self.x[i], int(self.x[i, 0] > 0)
        class T:
            def build_model(self): return nn.Linear(4, 2)
            def train_data(self): return Points(300, 0)
            def test_data(self): return Points(100, 1)
        def make(): return T()
        '''))
    data = {"task": {"ref": str(tmp_path / "plain.py") + ":make"},
            "training": {"rounds": 40, "batch_size": 16, "learning_rate": 0.5, "seed": 0,
                         "eval_every": 40, "distribution": {"name": "dirichlet",
                                                            "alpha": 1.0}},
            "aggregation": {"method": "coordinate_wise_median"},
            "server": {"host": "127.0.0.1", "port": 9000},
            "workers": [{"id": 0}, {"id": 1}, {"id": 2}]}
    res = simulate(parse_config(data), "./data")
    assert res.test_accuracy > 0.9


def test_label_flip_and_mimic_take_the_number_of_classes_from_the_task():
    data = _cfg({"name": "sgd"})
    data["workers"][3] = {"id": 3, "type": "byzantine", "attack": "label_flip"}
    core = Job(parse_config(data)).worker_core(3)
    assert core.attack.num_classes == 3
    data["workers"][3]["attack_params"] = {"num_classes": 3}
    assert Job(parse_config(data)).worker_core(3).attack.num_classes == 3


def _bn_replica(**kw) -> Replica:
    torch.manual_seed(0)
    return Replica(lambda: torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6),
                                               torch.nn.ReLU(), torch.nn.Linear(6, 3)),
                   seed=1, learning_rate=0.1, optimizer=optimizers.Adam(), **kw)


def test_buffers_never_change_and_evaluation_uses_exact_calibrated_statistics():
    r = _bn_replica()
    before = {k: v.clone() for k, v in r.module.named_buffers()}
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    for _ in range(3):
        g, _ = r.gradient(x, y)
        r.apply(g)
    for k, v in r.module.named_buffers():
        assert torch.equal(v, before[k]), k       # training passes wrote only into copies
    cal = torch.randn(64, 5, generator=gen)
    module = r._calibrated(cal, 16)
    bn = module[1]
    hidden = torch.func.functional_call(r.module[0], {"weight": r._views(r.theta)["0.weight"],
                                                      "bias": r._views(r.theta)["0.bias"]},
                                        (cal,))
    batch_means = torch.stack([hidden[i:i + 16].mean(0) for i in range(0, 64, 16)])
    assert torch.allclose(bn.running_mean, batch_means.mean(0), atol=1e-6)
    assert not module.training and int(bn.num_batches_tracked) == 4
    # evaluation in eval mode with those statistics, not the test batch's own
    loss, metrics = r.evaluate(x, y, calibration=cal, calibration_batch=16)
    with torch.no_grad():
        want = torch.func.functional_call(module, r._views(r.theta), (x,))
    assert metrics["accuracy"] == float((want.argmax(1) == y).sum()) / 32
    assert abs(loss - float(torch.nn.functional.cross_entropy(want, y))) < 1e-6


def test_a_device_mirror_computes_the_same_gradients_and_steps():
    """The mirror path (theta copied to the compute device once per version, gradients back to
    the CPU) exercised on the CPU: bit-identical gradients, steps and digests."""
    plain, mirrored = _bn_replica(), _bn_replica(mirror=True)
    assert mirrored._exec is not mirrored.module
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        (g1, l1), (g2, l2) = plain.gradient(x, y), mirrored.gradient(x, y)
        assert torch.equal(g1, g2) and l1 == l2
        plain.apply(g1)
        mirrored.apply(g2)
        assert plain.digest() == mirrored.digest()


def test_adam_state_travels_in_state_and_the_digest_covers_it():
    a, b = _bn_replica(), _bn_replica()
    g = torch.linspace(-1, 1, a.d)
    a.apply(g)
    assert a.state().shape == (3, a.d)
    b.load_state(a.state(), step=1)
    assert b.digest() == a.digest()
    b.load_state(a.state(), step=2)          # same rows, another step: another digest
    assert b.digest() != a.digest()
    b.load_state(a.state() * torch.tensor([[1.0], [1.0], [2.0]]), step=1)
    assert b.digest() != a.digest()


def test_example_task_trains():
    """examples/my_task.yaml (a user file, Adam, cosine, BatchNorm, an ALIE worker) reaches 0.95
    in simulation, which is the TCP run bit for bit (the tests above); the README's
    `byzps run examples/my_task.yaml` figure is in benchmarks/results/issue13.md."""
    import os

    import yaml

    cwd = os.getcwd()
    os.chdir(ROOT)        # the example's task ref is relative to the repository root
    try:
        res = simulate(parse_config(yaml.safe_load(
            (ROOT / "examples" / "my_task.yaml").read_text())), "./data")
    finally:
        os.chdir(cwd)
    assert res.test_accuracy > 0.95


def test_byzps_run_checks_devices_and_the_task_before_any_node_starts(tmp_path):
    """A worker device this machine does not have: `byzps run` stops before any node starts,
    exit 2, naming the config, the field and why."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    data = _cfg({"name": "sgd"})
    data["workers"][1]["device"] = "cuda:7"
    cfg = write_config(tmp_path / "c.yaml", data)
    r = subprocess.run([sys.executable, "-c", "from byzps.cli import byzps_main; import sys; "
                        "sys.exit(byzps_main(sys.argv[1:]))", "run", str(cfg), "--run-dir",
                        str(tmp_path / "run")], cwd=ROOT, env=node_env(), capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{cfg}: workers.1.device: device 'cuda:7': torch sees no CUDA device" in r.stderr
    assert "server exited" not in r.stdout + r.stderr


def test_the_signature_names_the_horizon_of_a_cosine_schedule():
    data = _cfg({"name": "adam"})
    a = Job(parse_config(copy.deepcopy(data)), rounds=60).replica().signature()
    b = Job(parse_config(copy.deepcopy(data)), rounds=200).replica().signature()
    assert a.endswith(" R=60") and b.endswith(" R=200")
    data["training"]["lr_schedule"] = {"name": "constant"}
    assert " R=" not in Job(parse_config(data), rounds=60).replica().signature()


def test_truncate_records_keeps_the_rounds_before_the_checkpoint(tmp_path):
    from byzps.metrics import truncate_records

    path = tmp_path / "m.jsonl"
    lines = [json.dumps({"round": r, "x": r * 2}) for r in range(6)]
    path.write_text("\n".join(lines) + '\n{"round": 6, "x"')     # cut mid-record by a kill -9
    assert truncate_records(path, 4) == 3                        # rounds 4, 5 and the cut one
    assert path.read_text() == "\n".join(lines[:4]) + "\n"
    assert truncate_records(tmp_path / "missing.jsonl", 0) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]
