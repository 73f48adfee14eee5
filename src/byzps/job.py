"""The job builder: the one place that reads a whole :class:`byzps.config.Config` and turns it
into the objects of a run.

* :func:`load_config` / :func:`parse_config`: the schema (:mod:`byzps.config`) plus the checks
  that need the registries, all at load time: the aggregator's and every pre-aggregator's name,
  parameters and precondition on n and f, every worker's attack (built once and checked on n
  and f), the learning-rate schedule's ranges. Errors are :class:`byzps.config.ConfigError`
  lines naming the field.
* :func:`check_over_tcp`: what a config needs to run over TCP (no omniscient attack).
* :class:`Job`: the data of the run (a task object that carries its data root), the replicas,
  the robust pipeline and quorum, the PS core (:class:`byzps.core.ps.PsCore`) and the worker
  cores (:class:`byzps.core.worker.WorkerCore`). The TCP server and worker
  (:mod:`byzps.net`) and the simulator (:mod:`byzps.simulate`) get everything from here.

The task is the config's ``task`` (:func:`byzps.task.load_task`: a user's file or module, or a
built-in), or without one the built-in MNIST task with ``training.model``; a user's task is
tried on a few items at start-up (:func:`byzps.task.validate_task`), so bad user code fails
before any round. ``training.optimizer``, ``lr_schedule`` and ``device`` (``workers[].device``)
become every replica's step and compute device (:meth:`Job.replica`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from byzps import aggregators, attacks, checkpoint, optimizers
from byzps.config import Config, ConfigError, WorkerConfig, read_config, validate_config
from byzps.core.ps import PsCore
from byzps.core.rounds import ServerRounds
from byzps.core.worker import WorkerCore
from byzps.metrics import JsonlWriter, truncate_records
from byzps.partition import holdout_indices, make_shards, sample_pool
from byzps.replica import Replica, resolve_device
from byzps.robust import RobustPipeline, build_pipeline, quorum_for
from byzps.safeio import FileRefused
from byzps.task import (
    LabeledTensors,
    Task,
    TaskError,
    as_labeled,
    build_model_seeded,
    check_labels,
    load_task,
    validate_task,
)
from byzps.tasks import names as builtin_task_names
from byzps.tasks import params as builtin_task_params
from byzps.tasks.mnist import MnistTask

#: Training inputs the PS recomputes running statistics (BatchNorm) from before each
#: evaluation (:meth:`byzps.replica.Replica.evaluate`); a fixed sample of the training set.
CALIBRATION_ITEMS = 1024
#: Most evaluation items the PS gathers into memory (``training.test_limit`` cuts a larger set).
MAX_TEST_ITEMS = 10_000_000

log = logging.getLogger(__name__)

#: Why a config with omniscient attacks cannot run over TCP (``ids``: the worker ids, e.g.
#: "3, 4").
OMNISCIENT_ONLY_IN_SIMULATION = (
    "attack_params.omniscient is true for worker id(s) {ids}, which needs the honest workers' "
    "gradients; over TCP a worker never sees them. Run this config with `byzps simulate` or "
    "`byzps grid`, or remove attack_params.omniscient")


# ---------------------------------------------------------------------------------------------
# Reading the config's registry-backed fields


def aggregator_params(cfg: Config) -> dict[str, Any]:
    """Keyword parameters for ``aggregators.build(aggregation.method, **params)``: the
    configured ``params``, ``f`` (the config's f) when the rule takes one, and ``q`` from
    ``krum_q``."""
    a = cfg.aggregation
    params = dict(a.params)
    if "f" in aggregators.params(a.method):
        params.setdefault("f", cfg.f)
    if a.krum_q is not None:
        params["q"] = a.krum_q
    return params


def build_robust(cfg: Config) -> RobustPipeline:
    """The config's pipeline: ``aggregation.pre_aggregators`` then ``aggregation.method``
    (:func:`byzps.robust.build_pipeline`); a callable ``(m, d) -> (d,)`` with ``check(n)``,
    ``warning(n)``, ``state_dict()``/``load_state_dict()``.

    Raises:
        ValueError: a stage cannot be built (cannot happen for a config that loaded).
    """
    a = cfg.aggregation
    return build_pipeline(a.method, aggregator_params(cfg), a.pre_aggregators or [], cfg.f)


def default_quorum(cfg: Config, rule: Any) -> int:
    """The quorum of a round: ``training.quorum`` (default n - f), never fewer than ``rule``
    needs (:func:`byzps.robust.quorum_for`)."""
    return quorum_for(cfg.n, cfg.f, cfg.training.quorum, rule)


def build_attack(worker: WorkerConfig, num_classes: Optional[int] = None) -> attacks.Attack:
    """The attack a worker entry runs when Byzantine (:meth:`WorkerConfig.attack_spec`, built).

    Args:
        num_classes: the task's C, given to an attack that takes ``num_classes`` when the
            config leaves it unset (None: the attack's default).

    Raises:
        ValueError: unknown attack or bad parameter (from :func:`byzps.attacks.build`).
    """
    name, params = worker.attack_spec()
    if num_classes is not None and "num_classes" in attacks.params(name) and \
            "num_classes" not in params:
        params = {**params, "num_classes": num_classes}
    return attacks.build(name, **params)


def omniscient_workers(cfg: Config) -> list[int]:
    """Ids of the Byzantine workers whose attack is omniscient (``attack_params.omniscient``):
    such a config runs only in simulation (``byzps simulate`` / ``byzps grid``)."""
    return [w.id for w in cfg.workers if w.type == "byzantine" and build_attack(w).omniscient]


def check_over_tcp(cfg: Config, source: str = "<config>") -> None:
    """Refuse a config that cannot run over TCP: an omniscient attack needs the honest
    workers' vectors, which a worker over TCP never sees.

    Raises:
        ConfigError: naming the workers and what to do instead.
    """
    ids = omniscient_workers(cfg)
    if ids:
        raise ConfigError(source, [OMNISCIENT_ONLY_IN_SIMULATION.format(
            ids=", ".join(map(str, ids)))])


def registry_problems(cfg: Config) -> list[str]:
    """The load-time checks that need the registries, in order; the first problem found
    (one line naming the field), or an empty list.

    Checks: ``aggregation.method`` is a known rule; the rule builds with its parameters and
    accepts n and f; the pre-aggregator chain builds and runs on n rows; every worker's attack
    fields agree, the attack builds and accepts n and f; the learning-rate schedule's ranges.
    """
    a = cfg.aggregation
    if a.method not in aggregators.names():
        return [f"aggregation.method: unknown aggregator {a.method!r}; expected one of "
                f"{', '.join(aggregators.names())}"]
    try:
        aggregators.build(a.method, **aggregator_params(cfg)).check(cfg.n)
    except ValueError as e:
        return [f"aggregation: {e}"]
    if a.pre_aggregators:
        try:
            build_robust(cfg).check(cfg.n)
        except ValueError as e:
            return [f"aggregation.{e}" if str(e).startswith("pre_aggregators.")
                    else f"aggregation.pre_aggregators: {e}"]
    for k, w in enumerate(cfg.workers):
        problem = _attack_problem(cfg, k, w)
        if problem:
            return [problem]
    try:
        build_optimizer(cfg)
    except optimizers.OptimizerError as e:
        return [f"training.optimizer: {e}"]
    try:
        lr_schedule(cfg)
    except optimizers.OptimizerError as e:
        return [f"training.lr_schedule: {e}"]
    return []


def build_optimizer(cfg: Config) -> optimizers.Optimizer:
    """The step of ``training.optimizer`` (SGD with ``training.momentum`` when none is
    configured; :mod:`byzps.optimizers`).

    Raises:
        byzps.optimizers.OptimizerError: a parameter out of range.
    """
    name, params = cfg.training.optimizer_spec()
    return optimizers.build_optimizer(name, **params)


def lr_schedule(cfg: Config) -> optimizers.LrSchedule:
    """The learning-rate schedule of ``training.lr_schedule`` (constant when none is
    configured), a pure function of the round (:mod:`byzps.optimizers`).

    Raises:
        byzps.optimizers.OptimizerError: a parameter out of range.
    """
    sched = cfg.training.lr_schedule
    if sched is None:
        return optimizers.build_schedule("constant")
    return optimizers.build_schedule(sched.name, **sched.params())


def _attack_problem(cfg: Config, k: int, w: WorkerConfig) -> Optional[str]:
    """Worker ``k``'s attack fields, and its attack built once and checked on n and f."""
    if w.attack is None and w.attack_params:
        return (f"workers.{k}.attack_params: given without workers.{k}.attack; name the attack "
                f"(one of {', '.join(attacks.names())})")
    explicit_scale = "attack_scale" in w.model_fields_set
    if w.attack is not None and w.attack != "sign_flip" and explicit_scale:
        return (f"workers.{k}.attack_scale: only used by sign_flip, but attack is "
                f"{w.attack!r}; remove it (parameters go in attack_params)")
    if w.attack == "sign_flip" and explicit_scale and "scale" in w.attack_params:
        return (f"workers.{k}.attack_params.scale: sign_flip's scale is also given as "
                f"workers.{k}.attack_scale; give it once")
    try:
        build_attack(w).check(cfg.n, cfg.f)
    except ValueError as e:
        return f"workers.{k}.attack: {e}"
    return None


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate an already-parsed mapping: the schema (:func:`byzps.config.validate_config`),
    then :func:`registry_problems`.

    Args:
        data: the object from ``yaml.safe_load`` / ``json.load``.
        source: name used in error lines (usually the file path).

    Raises:
        ConfigError: one line per problem, naming the field and what was expected.
    """
    cfg = validate_config(data, source)
    problems = registry_problems(cfg)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read a YAML or JSON config file (:func:`byzps.config.read_config`) and run
    :func:`registry_problems` on it.

    Raises:
        ConfigError: the file is missing, unreadable, not valid YAML/JSON, or fails validation.
    """
    cfg = read_config(path)
    problems = registry_problems(cfg)
    if problems:
        raise ConfigError(str(Path(path)), problems)
    return cfg


def shards(cfg: Config, labels: np.ndarray) -> list[np.ndarray]:
    """The shards of a config: :func:`byzps.partition.make_shards` with
    ``training.distribution``, ``training.seed``, ``training.train_limit``,
    ``holdout = training.validation`` and ``min_size = training.batch_size``. Shard k belongs to the worker whose
    ``cfg.shard_of(id) == k``.

    Args:
        labels: ``(N,)`` integer labels of the whole training set.

    Raises:
        ValueError: a shard smaller than one batch, or a validation split as large as the
            training set (the message says which and why).
    """
    t = cfg.training
    dist = t.distribution
    holdout = _holdout(cfg, len(labels))
    return make_shards(labels, cfg.n, t.seed, t.train_limit, distribution=dist.name,
                       alpha=dist.alpha, gamma=dist.gamma, min_size=t.batch_size,
                       holdout=holdout)


def _holdout(cfg: Config, num_samples: int) -> int:
    """``training.validation`` (0 when unset), checked against the training set's size.

    Raises:
        ValueError: naming the field, when it leaves no training example.
    """
    v = cfg.training.validation or 0
    if v >= num_samples:
        raise ValueError(f"training.validation: {v} examples held out, but the training set "
                         f"has {num_samples}: hold out fewer, so that every worker's shard "
                         f"keeps at least one batch")
    return v


def eval_split(cfg: Config) -> str:
    """What the PS evaluates on: ``"validation"`` (``training.validation`` set) or
    ``"test"``; the word summaries and grid reports use."""
    return "validation" if cfg.training.validation else "test"


# ---------------------------------------------------------------------------------------------
# The objects of a run


class Job:
    """A loaded config turned into the objects of a run.

    Args:
        cfg: a config from :func:`load_config` / :func:`parse_config`.
        data_root: the folder searched first for a built-in task's data (see
            :mod:`byzps.data`); passed to a built-in task as its ``data_root`` unless
            ``task.params`` sets one.
        task: the task to run instead of the config's (tests, programmatic use).
        rounds: the run's planned rounds R (``--rounds``; default ``training.rounds``): the
            horizon of a cosine schedule, so every node of a run must get the same R.
        source: the config's name in error lines (its path).

    Attributes:
        cfg: the config.
        task: the task whose model, data, loss and metrics the run uses.
        rounds: R.

    Raises:
        byzps.task.TaskError: the config's task does not import, its factory raises, or it
            fails :func:`byzps.task.validate_task` (a user's task; built-in tasks are not
            re-checked).

    Data is loaded on first use (the PS loads only the test split, and for a model with
    running statistics a sample of the training split; a TCP worker only the training split).
    """

    def __init__(self, cfg: Config, data_root: str = "./data", task: Optional[Task] = None,
                 rounds: Optional[int] = None, source: str = "config"):
        self.cfg = cfg
        self.source = source
        self.rounds = rounds if rounds is not None else cfg.training.rounds
        self._name = "mnist"
        self._shards: Optional[list[np.ndarray]] = None
        self._splits: dict[str, LabeledTensors] = {}
        if task is not None:
            self.task: Task = task
            self._name = getattr(task, "ref", type(task).__name__)
        elif cfg.task is None:
            self.task = MnistTask(model=cfg.training.model, data_root=data_root)
        else:
            ref, params = cfg.task.ref, dict(cfg.task.params)
            self._name = ref
            builtin = ref in builtin_task_names()
            if builtin and "data_root" in builtin_task_params(ref):
                params.setdefault("data_root", data_root)
            self.task = load_task(ref, params)
            if not builtin:
                validate_task(self.task, ref, seed=cfg.training.seed)

    def _split(self, which: str) -> LabeledTensors:
        """The task's ``train`` or ``test`` data, as :class:`byzps.task.LabeledTensors`-like
        (``targets`` and ``batch``; any other map-style dataset is adapted by
        :func:`byzps.task.as_labeled`), loaded once.

        Raises:
            byzps.task.TaskError: the split is not a usable map-style dataset.
        """
        if which not in self._splits:
            ds = self.task.train_data() if which == "train" else self.task.test_data()
            self._splits[which] = as_labeled(ds, self._name, f"{which}_data()")
        return self._splits[which]

    def device(self, worker_id: Optional[int] = None) -> torch.device:
        """The compute device of the PS (``worker_id`` None: ``training.device``) or of a
        worker (``workers[].device``, else ``training.device``).

        Raises:
            ConfigError: a CUDA device this machine cannot use (the field and why).
        """
        spec, field = self.cfg.training.device, "training.device"
        if worker_id is not None:
            k = next(i for i, w in enumerate(self.cfg.workers) if w.id == worker_id)
            own = self.cfg.workers[k].device
            if own is not None:
                spec, field = own, f"workers.{k}.device"
        try:
            return resolve_device(spec)
        except ValueError as e:
            raise ConfigError(self.source, [f"{field}: {e}"]) from None

    def replica(self, worker_id: Optional[int] = None) -> Replica:
        """A fresh replica: the task's model with the seeded initial weights, loss and
        metrics, the configured optimizer and schedule over R rounds, on the PS's
        (``worker_id`` None) or that worker's device; every replica of a job is bit-identical
        at start and takes bit-identical steps.

        Raises:
            byzps.task.TaskError: the task's model cannot be built or is not float32.
            ConfigError: the device cannot be used here.
        """
        t = self.cfg.training
        task = self.task
        device = self.device(worker_id)
        try:
            return Replica(lambda: build_model_seeded(task, t.seed), t.seed,
                           t.learning_rate, t.momentum, optimizer=build_optimizer(self.cfg),
                           schedule=lr_schedule(self.cfg), rounds=self.rounds,
                           loss=_overridden(task, "loss"), metrics=_overridden(task, "metrics"),
                           device=device)
        except TaskError:
            raise
        except ValueError as e:    # a parameter that is not float32
            raise TaskError(self._name, str(e)) from None

    def pipeline(self) -> RobustPipeline:
        """The robust pipeline (:func:`build_robust`); logs its warnings (paper guarantee not
        met for this n and f) once."""
        robust = build_robust(self.cfg)
        warning = robust.warning(self.cfg.n)
        if warning:
            log.warning("%s", warning)
        return robust

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluation set: the test set cut to ``training.test_limit``, or, when
        ``training.validation`` is set, the validation split (training examples no shard
        holds, :func:`byzps.partition.holdout_indices`): ``(m, *input_shape)`` inputs and
        ``(m,)`` int64 labels.

        Raises:
            byzps.data.DatasetNotFound / IdxFormatError: no usable copy of the data.
            ValueError: a validation split as large as the training set.
        """
        if self.cfg.training.validation:
            train = self._split("train")
            idx = holdout_indices(len(train), self.cfg.training.seed,
                                  _holdout(self.cfg, len(train)))
            return train.batch(torch.from_numpy(idx))
        test = self._split("test")
        limit = min(self.cfg.training.test_limit or len(test), len(test))
        if limit > MAX_TEST_ITEMS:
            raise TaskError(self._name, f"test_data() has {len(test)} items; the PS holds the "
                                        f"evaluation set in memory: set training.test_limit "
                                        f"(at most {MAX_TEST_ITEMS})")
        return test.batch(torch.arange(limit))

    def calibration_set(self) -> torch.Tensor:
        """``(c, *input_shape)`` training inputs, c = min(:data:`CALIBRATION_ITEMS`, training
        examples), drawn without replacement with ``training.seed`` (never from the
        validation split): what the PS recomputes running statistics from before each
        evaluation."""
        train = self._split("train")
        gen = torch.Generator().manual_seed(self.cfg.training.seed)
        holdout = _holdout(self.cfg, len(train))
        if not holdout:
            idx = torch.randperm(len(train), generator=gen)[:CALIBRATION_ITEMS]
        else:
            pool = torch.from_numpy(sample_pool(len(train), self.cfg.training.seed, None,
                                                holdout))
            idx = pool[torch.randperm(len(pool), generator=gen)[:CALIBRATION_ITEMS]]
        return train.batch(idx)[0]

    def shard_indices(self) -> list[np.ndarray]:
        """Every worker's shard as indices into the training set (:func:`shards`), computed
        once.

        Raises:
            ValueError: a shard smaller than one batch.
            byzps.data.DatasetNotFound / IdxFormatError: no usable copy of the data.
        """
        if self._shards is None:
            self._shards = shards(self.cfg, self._split("train").targets.numpy())
        return self._shards

    def ps_core(self, rounds: Optional[int] = None, resume: bool = False,
                close_at: Optional[str] = None, metrics_file: Optional[str] = None,
                checkpoints: bool = True) -> PsCore:
        """The PS's replica, robust pipeline, round machine, test set and after-close step.

        Args:
            rounds: total rounds R (absolute; default the job's R).
            resume: continue from ``training.checkpoint_dir``'s latest checkpoint; the metrics
                file loses its records of the rounds the run will do again.
            close_at: overrides ``training.close_at`` (the simulator, which has no arrival
                times, passes ``"all"``).
            metrics_file: JSON Lines output (default ``training.metrics_file``; None there =
                no file).
            checkpoints: write ``training.checkpoint_every``'s checkpoints (the simulator,
                which cannot resume, passes False).

        Raises:
            byzps.data.DatasetNotFound: no copy of the test data.
            byzps.task.TaskError: a test label outside 0..C-1.
            byzps.checkpoint.CheckpointError: no usable checkpoint, or one of another config.
        """
        cfg, t = self.cfg, self.cfg.training
        if rounds is not None and rounds != self.rounds:
            self.rounds = rounds
        rounds = self.rounds
        test_x, test_y = self.test_set()
        replica = self.replica()
        check_labels(self._name, "test_data()" if eval_split(cfg) == "test" else "train_data()",
                     test_y, replica.output_width(test_x[:2]))
        calibration = self.calibration_set() if replica.has_running_stats else None
        robust = self.pipeline()
        start_round = 0
        if resume:
            ckpt = checkpoint.load(t.checkpoint_dir, cfg, replica.d, replica.state_rows)
            replica.load_state(ckpt.state, ckpt.round)
            try:
                robust.load_state_dict(ckpt.aggregator_state)
            except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
                raise checkpoint.CheckpointError(
                    f"{t.checkpoint_dir}/{checkpoint.FILENAME}: field aggregator_state: "
                    f"{str(e)[:300]}") from None
            torch.random.set_rng_state(ckpt.rng_state)
            start_round = ckpt.round
            log.info("resumed from %s/%s at round %d", t.checkpoint_dir, checkpoint.FILENAME,
                     start_round)
            out = metrics_file if metrics_file is not None else t.metrics_file
            if out is not None:
                try:
                    dropped = truncate_records(out, start_round)
                except (OSError, FileRefused) as e:
                    log.warning("metrics file %s: could not drop the records of rounds >= %d "
                                "(they will appear twice): %s", out, start_round, e)
                else:
                    if dropped:
                        log.info("metrics file %s: dropped %d records of rounds >= %d, which "
                                 "this run writes again", out, dropped, start_round)
        machine = ServerRounds([w.id for w in cfg.workers], replica, robust, rounds,
                               default_quorum(cfg, robust), start_round=start_round,
                               max_missed=t.max_missed_rounds,
                               close_at=t.close_at if close_at is None else close_at)
        return PsCore(replica, robust, machine, test_x, test_y, rounds=rounds,
                      eval_every=t.eval_every,
                      metrics=JsonlWriter(metrics_file if metrics_file is not None
                                          else t.metrics_file),
                      checkpoint_every=t.checkpoint_every if checkpoints else 0,
                      checkpoint_dir=t.checkpoint_dir,
                      fingerprint=checkpoint.fingerprint(cfg),
                      calibration=calibration, calibration_batch=t.batch_size,
                      eval_split=eval_split(cfg))

    def worker_core(self, worker_id: int, worker_type: Optional[str] = None) -> WorkerCore:
        """Worker ``worker_id``'s core: its replica, shard, sampler, momentum and attack.

        An attack with a ``num_classes`` parameter that the config leaves unset (label_flip,
        mimic) gets the task's C, the width of the model's output.

        Args:
            worker_id: one of the config's worker ids.
            worker_type: ``honest`` or ``byzantine`` (overrides the config's type), or None.

        Raises:
            KeyError: unknown worker id.
            ValueError: a shard smaller than one batch.
            byzps.task.TaskError: a label of the shard outside 0..C-1.
            byzps.data.DatasetNotFound: no copy of the training data.
        """
        cfg, t = self.cfg, self.cfg.training
        wcfg = cfg.worker(worker_id)
        kind = worker_type or wcfg.type
        train = self._split("train")
        idx = torch.from_numpy(self.shard_indices()[cfg.shard_of(worker_id)])
        shard = train.batch(idx)
        replica = self.replica(worker_id)
        classes = replica.output_width(shard[0][:2])
        check_labels(self._name, f"worker {worker_id}'s shard of train_data()", shard[1],
                     classes)
        attack = None
        if kind == "byzantine":
            attack = build_attack(wcfg, classes)
            log.info("worker %d is Byzantine: attack %s %s", worker_id, *wcfg.attack_spec())
        return WorkerCore(worker_id, replica, shard, t.batch_size, t.seed, cfg.n, cfg.f,
                          worker_momentum=t.worker_momentum, attack=attack,
                          pipeline=build_robust(cfg))


def _overridden(task: Task, method: str):
    """The task's ``loss``/``metrics`` when it defines its own, else None (the replica's
    defaults: cross-entropy, and accuracy counted exactly)."""
    inner = getattr(task, "inner", None)      # a duck-typed task wrapped by load_task
    if inner is not None:
        fn = getattr(inner, method, None)
        return fn if callable(fn) else None
    if getattr(type(task), method, None) is getattr(Task, method):
        return None
    return getattr(task, method)
