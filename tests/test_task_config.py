"""The config schema's task / device / optimizer / lr_schedule fields: defaults that keep
today's job exactly, validation naming the field, and what a run does with them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from byzps import checkpoint
from byzps.cli import list_text
from byzps.config import ConfigError
from byzps.job import load_config, lr_schedule, parse_config
from byzps.optimizers import Cosine, MultiStep

from conftest import BASE_CONFIG, write_config

ROOT = Path(__file__).resolve().parent.parent


def _cfg(**training) -> dict:
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["training"].update(training)
    return cfg


def test_defaults_are_todays_job_and_keep_the_checkpoint_fingerprint():
    cfg = parse_config(_cfg())
    t = cfg.training
    assert cfg.task is None and t.device == "cpu" and t.optimizer is None and \
        t.lr_schedule is None and all(w.device is None for w in cfg.workers)
    assert t.optimizer_spec() == ("sgd", {"momentum": 0.9})
    assert lr_schedule(cfg).lr(0.05, 77, 100) == 0.05
    fp = checkpoint.fingerprint(cfg)
    # the new fields add only keys whose value is None: a checkpoint written before they
    # existed (which lacks these keys, read back as None) still matches
    new = {k: v for k, v in fp.items() if k.split(".")[0] == "task" or k in (
        "training.optimizer", "training.lr_schedule")}
    assert new == {"task": None, "training.optimizer": None, "training.lr_schedule": None}
    assert not any(k.endswith("device") for k in fp)


def test_explicit_plain_sgd_and_constant_are_accepted_today():
    cfg = parse_config(_cfg(optimizer={"name": "sgd"}, lr_schedule={"name": "constant"},
                            device="cpu"))
    assert cfg.training.optimizer_spec() == ("sgd", {"momentum": 0.9})


def test_task_section_parses_into_the_fingerprint():
    data = _cfg()
    data["training"].pop("model")
    data["task"] = {"ref": "examples/my_task.py:make_task", "params": {"hidden": 32}}
    cfg = parse_config(data)
    assert cfg.task.ref == "examples/my_task.py:make_task" and cfg.task.params == {"hidden": 32}
    assert checkpoint.fingerprint(cfg)["task.params.hidden"] == 32


@pytest.mark.parametrize("training,workers_device,pattern", [
    ({"device": "gpu"}, None, r"training.device: String should match pattern"),
    ({"device": "cuda:x"}, None, r"training.device"),
    ({}, "tpu", r"workers.0.device: String should match pattern"),
    ({"optimizer": {"name": "rmsprop"}}, None, r"training.optimizer.name"),
    ({"optimizer": {"name": "sgd", "beta1": 0.9}}, None,
     r"beta1 is a parameter of adam and adamw, not of 'sgd'"),
    ({"optimizer": {"name": "adam", "nesterov": True}, "momentum": 0.0}, None,
     r"nesterov is a parameter of sgd, not of 'adam'"),
    ({"optimizer": {"name": "adam", "beta2": 1.0}}, None, r"training.optimizer.beta2"),
    ({"optimizer": {"name": "adam", "weight_decay": -0.1}}, None,
     r"training.optimizer.weight_decay"),
    ({"optimizer": {"name": "sgd", "nesterov": True}, "momentum": 0.0}, None,
     r"training: optimizer.nesterov: needs training.momentum > 0"),
    ({"optimizer": {"name": "adam"}, "momentum": 0.9}, None,
     r"momentum: SGD's momentum, not used by adam"),
    ({"lr_schedule": {"name": "step"}}, None, r"step_size is required by the 'step' schedule"),
    ({"lr_schedule": {"name": "multistep", "milestones": [30, 10]}}, None,
     r"milestones: expected a non-empty, strictly increasing list"),
    ({"lr_schedule": {"name": "cosine", "step_size": 3}}, None,
     r"step_size is not a parameter of the 'cosine' schedule \(its parameters: eta_min, "
     r"t_max\)"),
    ({"lr_schedule": {"name": "cosine", "eta_min": 0.5}}, None,
     r"lr_schedule.eta_min: expected at most learning_rate = 0.05, got 0.5"),
    ({"lr_schedule": {"name": "step", "step_size": 5, "gamma": 2.0}}, None,
     r"training.lr_schedule.gamma"),
    ({"lr_schedule": {"name": "linear"}}, None, r"training.lr_schedule.name"),
])
def test_bad_new_fields_name_the_field(training, workers_device, pattern):
    data = _cfg(**training)
    if workers_device is not None:
        data["workers"][0]["device"] = workers_device
    with pytest.raises(ConfigError, match=pattern):
        parse_config(data)


def test_valid_new_fields_build_their_objects():
    cfg = parse_config(_cfg(device="cuda:1", optimizer={"name": "adamw", "weight_decay": 0.05,
                                                        "beta2": 0.99},
                            lr_schedule={"name": "multistep", "milestones": [2, 4],
                                         "gamma": 0.5}, momentum=0.0))
    assert cfg.training.optimizer_spec() == ("adamw", {"weight_decay": 0.05, "beta2": 0.99})
    assert lr_schedule(cfg) == MultiStep(milestones=(2, 4), gamma=0.5)


def test_training_model_with_a_task_is_ambiguous():
    data = _cfg()
    data["task"] = {"ref": "synthetic"}
    with pytest.raises(ConfigError, match=r"training.model: the model of today's MNIST job; "
                                          r"with task set, name the model in task.params"):
        parse_config(data)


def test_example_config_validates_and_a_cuda_device_is_refused_where_there_is_none(
        tmp_path, capsys):
    path = ROOT / "examples" / "my_task.yaml"
    cfg = load_config(path)
    assert cfg.task.ref == "examples/my_task.py:make_task"
    assert cfg.training.optimizer_spec() == ("adam", {"weight_decay": 0.0})
    assert lr_schedule(cfg) == Cosine()
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    # a worker device this machine does not have: refused at start-up by ps_node.py's flags,
    # naming the field and why
    from byzps.cli import main

    data = _cfg()
    data["workers"][1]["device"] = "cuda"
    assert main(["--config", str(write_config(tmp_path / "c.yaml", data)), "--role",
                 "worker", "--worker-id", str(data["workers"][1]["id"])]) == 2
    err = capsys.readouterr().err
    assert "workers.1.device: device 'cuda': torch sees no CUDA device here" in err


def test_byzps_list_shows_tasks_models_optimizers_and_schedules():
    text = list_text()
    for line in ("  cifar10                  model='resnet20', data_root='data', download=True",
                 "models: cnn_cifar, resnet20",
                 "  synthetic                model='mlp', features=16",
                 "models: logreg, mlp, mlp_bn",
                 "  adamw                    beta1=0.9, beta2=0.999, eps=1e-08, "
                 "weight_decay=0.01",
                 "  sgd                      nesterov=False, weight_decay=0.0",
                 "  cosine                   eta_min=0.0, t_max=<training.rounds>",
                 "  multistep                milestones=<required>, gamma=0.1"):
        assert line in text
