"""The validation split (``training.validation``): training examples no worker's shard holds,
which the PS evaluates on instead of the test set, so hyperparameters are tuned without
looking at the test set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from byzps import job as jobmod
from byzps.cli import byzps_main
from byzps.config import ConfigError
from byzps.grid import parse_grid, run_grid
from byzps.job import Job, parse_config
from byzps.partition import holdout_indices, make_shards, sample_pool

from conftest import write_config


def test_holdout_exact():
    # np.random.default_rng(3).permutation(10) == [9 6 0 2 1 4 7 5 3 8]: the pool is its head,
    # the validation split its last `holdout` entries (sorted)
    assert holdout_indices(10, 3, 3).tolist() == [3, 5, 8]
    assert sample_pool(10, 3, None, 3).tolist() == [9, 6, 0, 2, 1, 4, 7]
    assert sample_pool(10, 3, 4, 3).tolist() == [9, 6, 0, 2]
    assert sample_pool(10, 3).tolist() == [9, 6, 0, 2, 1, 4, 7, 5, 3, 8]   # as before


def test_holdout_zero_leaves_every_split_as_before():
    labels = np.arange(500) % 10
    for dist, kw in (("iid", {}), ("gamma", {"gamma": 0.33}), ("dirichlet", {"alpha": 2.0})):
        a = make_shards(labels, 5, 7, None, distribution=dist, **kw)
        b = make_shards(labels, 5, 7, None, distribution=dist, holdout=0, **kw)
        assert [s.tolist() for s in a] == [s.tolist() for s in b]


@pytest.mark.parametrize("dist, kw", [("iid", {}), ("label_sorted", {}),
                                      ("gamma", {"gamma": 0.33}),
                                      ("dirichlet", {"alpha": 5.0})])
@pytest.mark.parametrize("limit", [None, 1500])
def test_no_shard_holds_a_validation_example(dist, kw, limit):
    labels = np.random.default_rng(1).integers(0, 10, 3000)
    held = holdout_indices(3000, 4, 600)
    shards = make_shards(labels, 6, 4, limit, distribution=dist, min_size=8, holdout=600, **kw)
    used = np.concatenate(shards)
    assert not set(used.tolist()) & set(held.tolist())
    assert len(used) == (2400 if limit is None else 1500)
    if limit is None:   # together they are the whole training set
        assert sorted(used.tolist() + held.tolist()) == list(range(3000))


def test_bad_holdouts_fail_clearly():
    with pytest.raises(ValueError, match=r"10 examples held out of a training set of 10; "
                                         r"expected 0 \.\. 9"):
        sample_pool(10, 0, None, 10)
    with pytest.raises(ValueError, match="at least 1 example"):
        holdout_indices(10, 0, 0)


def _task_config(validation=None, **training) -> dict:
    t = {"rounds": 4, "batch_size": 16, "learning_rate": 0.05, "momentum": 0.9, "seed": 2,
         "eval_every": 2, "close_at": "all", **training}
    if validation is not None:
        t["validation"] = validation
    return {"task": {"ref": "synthetic", "params": {"model": "mlp_bn", "features": 6,
                                                    "classes": 3, "hidden": 8,
                                                    "train_size": 600, "test_size": 100}},
            "training": t,
            "aggregation": {"method": "trimmed_mean", "f": 1},
            "server": {"host": "127.0.0.1", "port": 9000},
            "workers": [{"id": 0}, {"id": 1}, {"id": 2},
                        {"id": 3, "type": "byzantine", "attack": "sign_flip"}]}


def test_the_ps_evaluates_on_the_held_out_training_examples():
    job = Job(parse_config(_task_config(validation=120)), "./data")
    train = job.task.train_data()
    x, y = job.test_set()
    held = holdout_indices(600, 2, 120)
    want_x, want_y = train.batch(torch.from_numpy(held))
    assert torch.equal(x, want_x) and torch.equal(y, want_y) and len(y) == 120
    used = set(np.concatenate(job.shard_indices()).tolist())
    assert len(used) == 480 and not used & set(held.tolist())
    # BatchNorm recalibration draws its inputs from the training examples outside the split
    calib = job.calibration_set()
    assert len(calib) == 480
    flat = {tuple(r.tolist()) for r in x.reshape(len(x), -1)}
    assert not flat & {tuple(r.tolist()) for r in calib.reshape(len(calib), -1)}
    # without the field the PS evaluates on the test set, and every example is in a shard
    plain = Job(parse_config(_task_config()), "./data")
    tx, ty = plain.test_set()
    assert len(ty) == 100 and torch.equal(tx, plain.task.test_data().batch(torch.arange(100))[0])
    assert sum(map(len, plain.shard_indices())) == 600
    assert jobmod.eval_split(plain.cfg) == "test" and jobmod.eval_split(job.cfg) == "validation"


def test_a_validation_split_without_training_examples_left_names_the_field():
    job = Job(parse_config(_task_config(validation=600)), "./data")
    with pytest.raises(ValueError, match=r"training.validation: 600 examples held out, but the "
                                         r"training set has 600: hold out fewer, so that every "
                                         r"worker's shard keeps at least one batch"):
        job.shard_indices()
    with pytest.raises(ConfigError, match=r"training.validation"):
        parse_config(_task_config(validation=0))
    # a split that leaves too little: the shard error says so
    job = Job(parse_config(_task_config(validation=590)), "./data")
    with pytest.raises(ValueError, match=r"fewer than one batch of 16; .*; 590 of the 600 "
                                         r"examples are held out for validation"):
        job.shard_indices()


def test_simulate_and_grid_say_validation(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", _task_config(validation=150))
    assert byzps_main(["simulate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "final validation accuracy: " in out and "test accuracy" not in out
    base = _task_config(validation=150)
    base.pop("workers")
    base.pop("aggregation")
    grid = parse_grid({"base": base, "honest": 3, "rounds": 2,
                       "sweep": {"aggregator": ["trimmed_mean"], "attack": ["sign_flip"],
                                 "f": [1]}})
    results = run_grid(grid, tmp_path / "g", jobs=1, plots=False)
    assert [r["status"] for r in results] == ["ok"]
    table = (tmp_path / "g" / "table.md").read_text()
    assert "### Worst-case validation accuracy over attacks (iid)" in table
    assert "### Final validation accuracy, f = 1 (iid)" in table and "test accuracy" not in table
