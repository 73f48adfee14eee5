"""The run configuration: a strict pydantic schema, :func:`validate_config` and :func:`read_config`.

A config file (YAML or JSON, same schema) has four sections::

    training:    {rounds: 300, batch_size: 64, learning_rate: 0.05, momentum: 0.9}
    aggregation: {method: coordinate_wise_median}   # or multi_krum with krum_f / krum_q
    server:      {host: 127.0.0.1, port: 9000, bind_host: 127.0.0.1}
    workers:
      - {id: 0, type: honest, data_shard: 0}
      - {id: 3, type: byzantine, attack_scale: -1.0}
      - {id: 4, type: byzantine, attack: alie, attack_params: {estimate_batches: 5}}

Validation is strict: unknown keys, wrong types (a YAML ``on`` where a number belongs, the
string ``"1e-3"`` that PyYAML reads from an unquoted ``1e-3``), out-of-range values, duplicate
worker ids or shards, and aggregator parameters that the rule cannot run with are all errors.
:class:`ConfigError` carries one line per problem, each naming the field (``workers.2.id``) and
what was expected.

This module is the schema only and imports nothing of byzps. The checks that need the
registries (the aggregator's and pre-aggregators' names and preconditions on n and f, every
worker's attack, the learning-rate schedule's ranges) run at load time too, in one place:
:func:`byzps.job.load_config` / :func:`byzps.job.parse_config`, which every command uses.
:func:`validate_config` / :func:`read_config` here stop after the schema.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from byzps.safeio import (
    MAX_CONFIG_BYTES,
    DuplicateKey,
    FileRefused,
    NoAliasLoader,
    clip,
    first_line,
    load_json,
    load_yaml,
    read_text,
    shorten,
)

MODEL_NAMES = ("cnn_mnist", "small_cnn", "mlp", "logreg")
#: longest line of a :class:`ConfigError` (characters), and most lines shown
MAX_PROBLEM_CHARS = 400
MAX_PROBLEMS = 20
#: most workers a config may list (``workers``); also the bound on n of a grid cell
MAX_WORKERS = 4096
#: bound (exclusive) of worker ids and seeds: the wire's 31-bit worker id, torch's seed range
ID_LIMIT = 2**31


class ConfigError(ValueError):
    """A config file that cannot be used.

    Attributes:
        problems: one human-readable line per problem, each starting with the dotted field path;
            each line is cut to :data:`MAX_PROBLEM_CHARS` characters (with an ellipsis), so a
            hostile value can never make the message large.
    """

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = [clip(p, MAX_PROBLEM_CHARS) for p in problems[:MAX_PROBLEMS]]
        if len(problems) > MAX_PROBLEMS:
            self.problems.append(f"... and {len(problems) - MAX_PROBLEMS} more problems")
        problems = self.problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DistributionConfig(_Strict):
    """``training.distribution``: how the training data is split into the n worker shards.

    Every distribution starts from the same pool: a seeded permutation of the training set,
    cut to ``train_limit`` (so all of them use the same examples). Shards are disjoint, cover
    the pool, and each must hold at least ``batch_size`` examples (else start-up fails).
    See :func:`byzps.data.make_shards`.

    Attributes:
        name: ``iid`` (default: the pool cut into n pieces, as before this option existed),
            ``dirichlet`` (per class, proportions over the shards drawn from Dir(alpha)),
            ``label_sorted`` (the pool sorted by label, cut into n pieces) or ``gamma`` (a
            fraction ``gamma`` of the pool split iid, the rest label-sorted).
        alpha: Dirichlet concentration (> 0); only for ``dirichlet`` (default 1.0).
        gamma: iid fraction in [0, 1]; only for ``gamma`` (default 0.5).
    """

    name: Literal["iid", "dirichlet", "label_sorted", "gamma"] = "iid"
    alpha: Optional[float] = Field(None, gt=0)
    gamma: Optional[float] = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _only_own_parameters(self) -> DistributionConfig:
        if self.alpha is not None and self.name != "dirichlet":
            raise ValueError(f"alpha is a parameter of dirichlet, not of {self.name!r}")
        if self.gamma is not None and self.name != "gamma":
            raise ValueError(f"gamma is a parameter of the gamma distribution, not of "
                             f"{self.name!r}")
        return self


#: ``training.device`` / ``workers[].device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
DEVICE_PATTERN = r"^(cpu|auto|cuda(:[0-9]{1,3})?)$"

#: most entries of ``workers[].resources``
MAX_WORKER_RESOURCES = 16
#: a Ray resource name in ``workers[].resources`` (``GPU``, ``CPU``, ``memory``, a custom name,
#: ``node:10.0.0.2``)
RESOURCE_NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_.:\-]{0,63}"

class TaskConfig(_Strict):
    """The optional ``task`` section: which task (model, data, loss, metrics) to train.

    Without ``task`` a config runs the built-in MNIST task with ``training.model``.

    Attributes:
        ref: ``"file.py:factory"`` (a relative path is resolved against the current
            directory, as the config's other paths), ``"package.module:factory"``, or a
            built-in task name (``mnist``, ``fashion_mnist``, ``cifar10``, ``synthetic``);
            see :func:`byzps.task.load_task`.
        params: keyword arguments of the factory (JSON/YAML values).
    """

    ref: str = Field(min_length=1, max_length=4096)
    params: dict[str, Any] = Field(default_factory=dict)


class OptimizerConfig(_Strict):
    """``training.optimizer``: the one optimizer step every replica takes
    (:mod:`byzps.optimizers`). Absent = ``{name: sgd}`` with ``training.momentum`` (today's).

    Attributes:
        name: ``sgd`` (momentum from ``training.momentum``), ``adam`` or ``adamw``.
        nesterov: sgd only: Nesterov momentum (needs ``training.momentum`` > 0); default false.
        weight_decay: >= 0; default 0 for sgd and adam, 0.01 for adamw.
        beta1, beta2: adam/adamw only: moment decay rates in [0, 1) (defaults 0.9, 0.999).
        eps: adam/adamw only: >= 0 (default 1e-8).
    """

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    nesterov: Optional[bool] = None
    weight_decay: Optional[float] = Field(None, ge=0)
    beta1: Optional[float] = Field(None, ge=0, lt=1)
    beta2: Optional[float] = Field(None, ge=0, lt=1)
    eps: Optional[float] = Field(None, ge=0)

    @model_validator(mode="after")
    def _only_own_parameters(self) -> OptimizerConfig:
        owners = {"nesterov": ("sgd",), "beta1": ("adam", "adamw"),
                  "beta2": ("adam", "adamw"), "eps": ("adam", "adamw")}
        for k, names in owners.items():
            if getattr(self, k) is not None and self.name not in names:
                raise ValueError(f"{k} is a parameter of {' and '.join(names)}, not of "
                                 f"{self.name!r}")
        return self

    def params(self, momentum: float) -> dict[str, Any]:
        """Keyword parameters for :func:`byzps.optimizers.build_optimizer` (the given ones; sgd
        also gets ``momentum``, the config's ``training.momentum``)."""
        out = {k: getattr(self, k) for k in ("nesterov", "weight_decay", "beta1", "beta2", "eps")
               if getattr(self, k) is not None}
        if self.name == "sgd":
            out["momentum"] = momentum
        return out


class LrScheduleConfig(_Strict):
    """``training.lr_schedule``: the learning rate of round r as a pure function of r, the same
    on every replica (:mod:`byzps.optimizers`). Absent = ``constant`` (today's).

    Attributes:
        name: ``constant``, ``step`` (``step_size``, ``gamma``), ``multistep`` (``milestones``,
            ``gamma``) or ``cosine`` (``eta_min``, ``t_max``; default horizon: the run's
            rounds).
        step_size: step: rounds between decays (>= 1), required.
        milestones: multistep: strictly increasing rounds (>= 1), required.
        gamma: step / multistep: factor per decay in (0, 1] (default 0.1).
        eta_min: cosine: final learning rate, >= 0 and at most ``learning_rate`` (default 0).
        t_max: cosine: horizon in rounds (>= 1; default ``training.rounds``).
    """

    name: Literal["constant", "step", "multistep", "cosine"] = "constant"
    step_size: Optional[int] = Field(None, ge=1)
    milestones: Optional[list[int]] = None
    gamma: Optional[float] = Field(None, gt=0, le=1)
    eta_min: Optional[float] = Field(None, ge=0)
    t_max: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> LrScheduleConfig:
        own = {"constant": (), "step": ("step_size", "gamma"),
               "multistep": ("milestones", "gamma"), "cosine": ("eta_min", "t_max")}[self.name]
        for k in ("step_size", "milestones", "gamma", "eta_min", "t_max"):
            if getattr(self, k) is not None and k not in own:
                raise ValueError(f"{k} is not a parameter of the {self.name!r} schedule "
                                 f"(its parameters: {', '.join(own) or 'none'})")
        required = {"step": "step_size", "multistep": "milestones"}.get(self.name)
        if required and getattr(self, required) is None:
            raise ValueError(f"{required} is required by the {self.name!r} schedule")
        return self

    def params(self) -> dict[str, Any]:
        """Keyword parameters for :func:`byzps.optimizers.build_schedule` (the given ones)."""
        return {k: getattr(self, k) for k in ("step_size", "milestones", "gamma", "eta_min",
                                              "t_max") if getattr(self, k) is not None}


class TrainingConfig(_Strict):
    """The ``training`` section.

    Attributes:
        rounds: number of rounds R (>= 1).
        batch_size: samples per worker minibatch (>= 1).
        learning_rate: SGD step size (> 0).
        momentum: server SGD momentum in [0, 1); every replica applies the same step.
        worker_momentum: beta in [0, 1) of worker-side momentum; 0.0 (default) = off. When
            on, every honest worker sends its momentum vector m_t = beta * m_{t-1} +
            (1 - beta) * g_t (m_0 = 0, one step per round) instead of its raw minibatch
            gradient g_t (Karimireddy et al. 2021, "Learning from history for Byzantine robust
            optimization"; El Mhamdi et al. 2021, "Distributed momentum for Byzantine-resilient
            stochastic gradient descent"), which lowers the variance the robust aggregator sees.
            A Byzantine worker's ``honest_gradient`` is then its own momentum vector too.
            Both momenta apply when both are set: the PS aggregates the worker momenta and
            every replica takes its SGD step with server momentum ``momentum`` on top of that
            aggregate. With worker momentum the papers usually set ``momentum: 0.0``.
        seed: seeds the initial model, the data split and the workers' sampling (0 <= seed < 2**31).
        model: model name (``cnn_mnist``, ``small_cnn``, ``mlp``, ``logreg``).
        eval_every: the PS evaluates on the test set every this many rounds and at the end.
        round_timeout: seconds the PS waits for gradients before closing a round with a quorum.
        train_limit: use only this many training samples (after a seeded shuffle); None = all.
        test_limit: evaluate on only the first this many test samples; None = all 10,000.
        validation: hold out this many training examples (a seeded random choice,
            :func:`byzps.partition.holdout_indices`) from every worker's shard, and evaluate
            on them instead of the test set: the validation split to tune hyperparameters on
            (a clipping threshold, centered clipping's tau) without ever looking at the test
            set. Records keep their ``test_accuracy`` / ``test_loss`` fields; the run's
            summary says "validation". None (default) = no split, evaluate on the test set.
        metrics_file: if set, the PS appends one JSON record per round to this path.
        quorum: fewest usable gradients a round may close with at its deadline (default
            n - f, and never fewer than the rule needs).
        round_retries: a round without a quorum at its deadline is retried (the PS asks the
            workers that did not answer again) this many times; then the PS exits non-zero.
        max_missed_rounds: a connected worker that contributes no usable gradient to this
            many rounds in a row is disconnected (it may reconnect): a rejected gradient
            counts, and so does a round that closed at its deadline without its answer.
        close_at: when a round closes before its deadline. ``quorum`` (default): as soon as
            ``quorum`` (default n - f) usable gradients arrived, the "n - f fastest" rule of
            AggregaThor (Damaskinos et al., SysML 2019) and Garfield (Guerraoui et al., DSN
            2021); answers that come later count as missing and are never applied to a later
            round. No worker, Byzantine or slow, can then make a round wait for it. ``all``:
            when every live worker answered (at the deadline, with a quorum, at the latest):
            every honest gradient is used and the run is reproducible bit for bit (the
            simulator always behaves so), but one late-answering worker holds every round
            until ``round_timeout``.
        checkpoint_every: the PS writes a checkpoint every this many rounds (0 = never).
        checkpoint_dir: folder of the PS's checkpoints (``latest.pt`` there).
        distribution: how the data is split into shards (:class:`DistributionConfig`);
            default iid.
        device: where replicas compute forward and backward passes: ``cpu`` (default),
            ``cuda``, ``cuda:N`` or ``auto`` (cuda if available); ``workers[].device``
            overrides it per worker. The optimizer step stays on the CPU in float32 whatever
            the device (:mod:`byzps.replica`).
        optimizer: the optimizer (:class:`OptimizerConfig`); None (default) = SGD with
            ``momentum``, as today.
        lr_schedule: the learning-rate schedule (:class:`LrScheduleConfig`); None (default) =
            constant ``learning_rate``, as today.
    """

    rounds: int = Field(50, ge=1, le=10**9)
    batch_size: int = Field(64, ge=1, le=60000)
    learning_rate: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    worker_momentum: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, ge=0, lt=ID_LIMIT)
    model: Literal["cnn_mnist", "small_cnn", "mlp", "logreg"] = "cnn_mnist"
    eval_every: int = Field(10, ge=1)
    round_timeout: float = Field(60.0, gt=0)
    train_limit: Optional[int] = Field(None, ge=1, le=60000)
    test_limit: Optional[int] = Field(None, ge=1, le=10000)
    validation: Optional[int] = Field(None, ge=1, le=10_000_000)   # job.MAX_TEST_ITEMS
    metrics_file: Optional[str] = None
    quorum: Optional[int] = Field(None, ge=1)
    round_retries: int = Field(3, ge=0)
    max_missed_rounds: int = Field(3, ge=1)
    close_at: Literal["all", "quorum"] = "quorum"
    checkpoint_every: int = Field(0, ge=0)
    checkpoint_dir: str = Field("checkpoints", min_length=1)
    distribution: DistributionConfig = Field(default_factory=DistributionConfig)
    device: str = Field("cpu", pattern=DEVICE_PATTERN)
    optimizer: Optional[OptimizerConfig] = None
    lr_schedule: Optional[LrScheduleConfig] = None

    @model_validator(mode="after")
    def _optimizer_checks(self) -> TrainingConfig:
        opt = self.optimizer
        if opt is not None and opt.name == "sgd" and opt.nesterov and self.momentum == 0:
            raise ValueError("optimizer.nesterov: needs training.momentum > 0")
        if opt is not None and opt.name != "sgd" and "momentum" in self.model_fields_set \
                and self.momentum != 0:
            raise ValueError(f"momentum: SGD's momentum, not used by {opt.name} (its beta1 "
                             f"plays that role); remove training.momentum")
        sched = self.lr_schedule
        if sched is not None and sched.eta_min is not None and \
                sched.eta_min > self.learning_rate:
            raise ValueError(f"lr_schedule.eta_min: expected at most learning_rate = "
                             f"{self.learning_rate}, got {sched.eta_min}")
        return self

    def optimizer_spec(self) -> tuple[str, dict[str, Any]]:
        """``(name, params)`` for :func:`byzps.optimizers.build_optimizer`: the configured
        optimizer, or SGD with ``momentum`` when none is configured."""
        opt = self.optimizer or OptimizerConfig()
        return opt.name, opt.params(self.momentum)


class AggregationConfig(_Strict):
    """The ``aggregation`` section.

    Attributes:
        method: aggregator config name, one of :func:`byzps.aggregators.names`.
        f: number of Byzantine workers the rule must tolerate; defaults to the number of
            workers whose config type is ``byzantine``.
        krum_f: the seed's name for ``f`` (kept as an alias; must agree with ``f`` if both set).
        krum_q: Multi-Krum's q (gradients averaged); default n - f.
        params: further keyword parameters of the rule, passed to ``aggregators.build``.
        pre_aggregators: pre-aggregators applied in order before the rule, each a mapping
            ``{name: <one of aggregators.pre_names()>, <its parameters>}`` (``f`` defaults
            to the config's f); see :func:`byzps.job.build_robust`.
    """

    method: str
    f: Optional[int] = Field(None, ge=0)
    krum_f: Optional[int] = Field(None, ge=0)
    krum_q: Optional[int] = Field(None, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)
    pre_aggregators: list[dict[str, Any]] = Field(default_factory=list)


class TlsConfig(_Strict):
    """The optional ``server.tls`` section (stdlib ``ssl``, TLS 1.2 or newer).

    Attributes:
        cert: PEM certificate chain of the PS (needed on the PS).
        key: PEM private key of the PS (needed on the PS).
        ca: PEM CA bundle the workers verify the PS's certificate against (needed on workers);
            the certificate must name ``server.host`` (as a DNS name or IP address).
    """

    cert: Optional[str] = None
    key: Optional[str] = None
    ca: Optional[str] = None


class ServerConfig(_Strict):
    """The ``server`` section.

    Attributes:
        host: address workers connect to.
        port: TCP port, 1..65535.
        bind_host: address the PS listens on (default: ``host``).
        connect_timeout: seconds the PS waits for all workers to register, and a worker keeps
            retrying its connection to the PS.
        min_workers: the PS starts after ``connect_timeout`` if at least this many workers
            registered (default: the quorum); with all n it starts at once.
        write_timeout: seconds a worker has to take one frame before the PS drops it.
        hello_timeout: seconds a new connection has to introduce and authenticate itself.
        secrets_file: key file (see ``byzps keygen``): on the PS all workers' keys, on a
            worker at least its own. ``$BYZPS_SECRETS`` overrides it. None: no
            authentication (local experiments only; the PS warns at start).
        tls: optional TLS for confidentiality (see :class:`TlsConfig`); None = plain TCP.
        metrics_port: TCP port 1..65535 of the PS's HTTP status endpoint (Prometheus
            ``/metrics`` and JSON ``/status``, see :mod:`byzps.status`); None = off.
        metrics_host: address the status endpoint binds (default 127.0.0.1: this machine
            only; it has no authentication).
        metrics_max_connections: most connections the status endpoint holds open at once;
            more are closed at once (see :mod:`byzps.status`).
        max_pending_connections: most connections the PS holds that have not registered as
            a worker yet (TLS handshake, HELLO, authentication), from all addresses together;
            more are closed at once (see :mod:`byzps.net.admission`).
        max_pending_per_address: most such pending connections from one source address.
        fd_reserve: file descriptors the PS keeps free for checkpoints, the metrics file,
            logs and data files: it refuses new connections before its open-file limit minus
            this reserve is reached.
    """

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    bind_host: Optional[str] = Field(None, min_length=1)
    connect_timeout: float = Field(120.0, gt=0)
    min_workers: Optional[int] = Field(None, ge=1)
    write_timeout: float = Field(10.0, gt=0)
    hello_timeout: float = Field(10.0, gt=0)
    secrets_file: Optional[str] = None
    tls: Optional[TlsConfig] = None
    metrics_port: Optional[int] = Field(None, ge=1, le=65535)
    metrics_host: str = Field("127.0.0.1", min_length=1)
    metrics_max_connections: int = Field(16, ge=1, le=1024)
    max_pending_connections: int = Field(64, ge=1)
    max_pending_per_address: int = Field(16, ge=1)
    fd_reserve: int = Field(64, ge=8)

    @property
    def listen_host(self) -> str:
        """The address to bind: ``bind_host`` if set, else ``host``."""
        return self.bind_host or self.host


class WorkerConfig(_Strict):
    """One entry of ``workers``.

    Attributes:
        id: worker id (0 <= id < 2**31, the wire's range; unique).
        type: ``honest`` or ``byzantine``.
        data_shard: index of this worker's iid shard in 0..n-1 (default: its list position).
        attack_scale: for a Byzantine worker, the factor s of the sign-flip attack (it sends s
            times its own honest gradient); used when ``attack`` is None or ``sign_flip``.
        attack: the attack of this worker when it runs as Byzantine (config type
            ``byzantine`` or ``--worker-type byzantine``), one of
            :func:`byzps.attacks.names`; None = ``sign_flip`` with ``attack_scale``.
        attack_params: keyword parameters of the attack (see :func:`byzps.attacks.params`).
            Checked when the config is loaded by building the attack.
        host, port: where the worker runs (informational).
        device: this worker's compute device (``cpu``, ``cuda``, ``cuda:N``, ``auto``);
            None = ``training.device``.
        resources: for ``byzps run --ray`` only: the Ray resources this worker's actor asks
            for, e.g. ``{GPU: 1}`` or a custom resource a node declared with
            ``ray start --resources`` (``{bz_gpu_box: 1}``), which pins the worker to the
            nodes that have it. ``CPU`` replaces the default of 1 CPU. At most
            :data:`MAX_WORKER_RESOURCES` entries; names as Ray spells them (letters, digits,
            ``_ . : -``, at most 64 characters); each amount finite, > 0, and below 1 or a
            whole number (Ray's rule for resource amounts), at most 1e9. Ignored by local runs.
    """

    id: int = Field(ge=0, lt=ID_LIMIT)
    type: Literal["honest", "byzantine"] = "honest"
    data_shard: Optional[int] = Field(None, ge=0)
    attack_scale: float = -1.0
    attack: Optional[str] = None
    attack_params: dict[str, Any] = Field(default_factory=dict)
    host: Optional[str] = None
    port: Optional[int] = Field(None, ge=1, le=65535)
    device: Optional[str] = Field(None, pattern=DEVICE_PATTERN)
    resources: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_resources(self) -> WorkerConfig:
        if len(self.resources) > MAX_WORKER_RESOURCES:
            raise ValueError(f"resources: at most {MAX_WORKER_RESOURCES} entries, got "
                             f"{len(self.resources)}")
        for name, amount in self.resources.items():
            if not re.fullmatch(RESOURCE_NAME_PATTERN, name):
                raise ValueError(f"resources: name {name[:80]!r} is not a Ray resource name "
                                 f"(letters, digits, _ . : -; at most 64 characters)")
            if not 0 < amount <= 1e9 or (amount > 1 and amount != int(amount)):
                raise ValueError(f"resources.{name}: expected an amount > 0 that is below 1 or "
                                 f"a whole number (at most 1e9), got {amount!r}")
        return self

    def attack_spec(self) -> tuple[str, dict[str, Any]]:
        """``(name, params)`` for ``attacks.build(name, **params)``: the configured attack, or
        ``sign_flip`` with ``scale = attack_scale`` when ``attack`` is None (``attack_scale``
        also supplies sign_flip's scale when ``attack_params`` does not)."""
        if self.attack is None or self.attack == "sign_flip":
            params = dict(self.attack_params)
            params.setdefault("scale", self.attack_scale)
            return "sign_flip", params
        return self.attack, dict(self.attack_params)


class Config(_Strict):
    """A whole validated config. Build it with :func:`byzps.job.load_config` or
    :func:`byzps.job.parse_config` (schema and registry checks).

    ``task`` (optional, :class:`TaskConfig`) names the task to train; without it the job is
    today's MNIST job with ``training.model``. ``workers`` holds 1 to :data:`MAX_WORKERS`
    entries.
    """

    training: TrainingConfig
    aggregation: AggregationConfig
    server: ServerConfig
    workers: list[WorkerConfig] = Field(min_length=1, max_length=MAX_WORKERS)
    task: Optional[TaskConfig] = None

    @property
    def n(self) -> int:
        """Number of workers n."""
        return len(self.workers)

    @property
    def f(self) -> int:
        """Byzantine tolerance f of the rule (explicit, or the count of byzantine workers)."""
        a = self.aggregation
        if a.f is not None:
            return a.f
        if a.krum_f is not None:
            return a.krum_f
        return sum(w.type == "byzantine" for w in self.workers)

    def shard_of(self, worker_id: int) -> int:
        """The data shard of ``worker_id``. Raises KeyError for an unknown id."""
        for pos, w in enumerate(self.workers):
            if w.id == worker_id:
                return pos if w.data_shard is None else w.data_shard
        raise KeyError(worker_id)

    def worker(self, worker_id: int) -> WorkerConfig:
        """The config entry of ``worker_id``. Raises KeyError for an unknown id."""
        for w in self.workers:
            if w.id == worker_id:
                return w
        raise KeyError(worker_id)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        ids = [w.id for w in self.workers]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"workers: duplicate worker id(s) {dup}; each id must be unique")
        shards = [self.shard_of(i) for i in ids]
        bad = [s for s in shards if s >= self.n]
        if bad:
            raise ValueError(f"workers: data_shard {bad[0]} out of range: expected 0..{self.n - 1} "
                             f"(one iid shard per worker)")
        dup = sorted({s for s in shards if shards.count(s) > 1})
        if dup:
            raise ValueError(f"workers: data_shard {dup} used by more than one worker; "
                             f"shards must be disjoint")
        a = self.aggregation
        if a.f is not None and a.krum_f is not None and a.f != a.krum_f:
            raise ValueError(f"aggregation: f={a.f} and its alias krum_f={a.krum_f} disagree")
        if a.krum_q is not None and a.method not in ("multi_krum",):
            raise ValueError(f"aggregation.krum_q: only meaningful for multi_krum, "
                             f"not {a.method!r}")
        t, srv = self.training, self.server
        if t.quorum is not None and t.quorum > self.n:
            raise ValueError(f"training.quorum: expected at most n = {self.n}, got {t.quorum}")
        if srv.metrics_port is not None and srv.metrics_port == srv.port:
            raise ValueError(f"server.metrics_port: expected a port other than server.port "
                             f"({srv.port}), got {srv.metrics_port}")
        if srv.min_workers is not None and srv.min_workers > self.n:
            raise ValueError(f"server.min_workers: expected at most n = {self.n}, got "
                             f"{srv.min_workers}")
        if self.task is not None and "model" in t.model_fields_set:
            raise ValueError("training.model: the model of today's MNIST job; with task set, "
                             "name the model in task.params (e.g. {model: cnn_mnist})")
        if self.f >= self.n:
            raise ValueError(f"aggregation.f: expected f < n = {self.n}, got {self.f}")
        return self


class _StrictLoader(NoAliasLoader):
    """``yaml.SafeLoader`` that refuses aliases (:class:`byzps.safeio.NoAliasLoader`), YAML 1.1
    integers with a leading zero (``0755`` would silently become 493) and sexagesimal numbers
    (``1:30`` would become 90)."""


def _strict_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(node.value).replace("_", "")
    digits = text.lstrip("+-")
    if (len(digits) > 1 and digits[0] == "0" and digits[1:2].isdigit()) or ":" in digits:
        mark = node.start_mark
        raise yaml.constructor.ConstructorError(
            None, None, f"ambiguous number {shorten(node.value)} at line {mark.line + 1} (YAML 1.1 "
            f"reads a leading 0 as octal and a colon as base 60); quote it or drop the 0",
            mark)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _strict_int)


def _describe(err: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
    msg = err.get("msg", "invalid")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    line = f"{loc}: {msg}" if err.get("loc") else msg
    kind = err.get("type", "")
    if kind == "missing":
        return f"{loc}: required field is missing"
    if kind == "extra_forbidden":
        name = str(err["loc"][-1]) if err.get("loc") else ""
        close = difflib.get_close_matches(name, _known_fields(), n=1, cutoff=0.75)
        hint = f"did you mean {close[0]!r}? " if close else "check the spelling; "
        return f"{loc}: unknown field ({hint}see README.md for the schema)"
    if "input" in err and kind not in ("value_error",):
        val = err["input"]
        shown = shorten(val) if not isinstance(val, (dict, list)) else type(val).__name__
        line += f" (got {shown})"
        if isinstance(val, str) and len(val) < 100 and _looks_numeric(val):
            line += ("; YAML 1.1 reads a number with an exponent as a string unless it has a "
                     f"dot and a signed exponent: write {_yaml_float(val)}")
        if isinstance(val, bool):
            line += "; YAML reads on/off/yes/no as booleans"
    return line


def _known_fields() -> list[str]:
    """Every field name of every config section (for "did you mean" hints)."""
    names: set[str] = set()
    for model in _Strict.__subclasses__():
        names.update(model.model_fields)
    return sorted(names)


def _yaml_float(text: str) -> str:
    """``text`` (a number PyYAML left a string, e.g. ``1e3`` or ``5E-4``) written as YAML 1.1
    reads a float: a dot in the mantissa and a signed exponent (``1.0e+3``, ``5.0e-4``)."""
    t = text.strip().lower()
    if "e" not in t:
        return t if "." in t else f"{t}.0"
    mantissa, exp = t.split("e", 1)
    if "." not in mantissa:
        mantissa += ".0"
    if not exp.startswith(("+", "-")):
        exp = "+" + exp
    return f"{mantissa}e{exp}"


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def validate_config(data: Any, source: str = "<config>") -> Config:
    """Validate an already-parsed mapping against the schema (:class:`Config`); the checks that
    need the registries are :func:`byzps.job.parse_config`'s.

    Args:
        data: the object from ``yaml.safe_load`` / ``json.load``.
        source: name used in error lines (usually the file path).

    Raises:
        ConfigError: one line per problem, naming the field and what was expected.
    """
    if not isinstance(data, dict):
        raise ConfigError(source, [f"expected a mapping with sections training, aggregation, "
                                   f"server, workers; got {type(data).__name__}"])
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, [_describe(err) for err in e.errors()]) from None
    return cfg


def read_config(path: str | Path) -> Config:
    """Read a YAML (``.yaml``/``.yml``) or JSON (``.json``) config file and validate it against
    the schema (:func:`validate_config`); :func:`byzps.job.load_config` adds the registry checks.

    The file must be a regular file of at most :data:`byzps.safeio.MAX_CONFIG_BYTES` bytes
    (checked before reading: ``/dev/zero`` or a symlink to it is refused). YAML is read with a
    ``yaml.SafeLoader`` subclass (no object construction) that refuses aliases (they can expand
    exponentially), octal-looking and base-60 integers.

    Raises:
        ConfigError: the file is missing, unreadable, not a regular file, too large, not valid
            YAML/JSON (also: a number of more than 4300 digits, or a duplicate key), or fails
            validation.
    """
    p = Path(path)
    src = str(p)
    try:
        text = read_text(p, MAX_CONFIG_BYTES, "config file")
    except FileRefused as e:
        raise ConfigError(src, [str(e)]) from None
    except OSError as e:
        raise ConfigError(src, [f"cannot read the config file: {e.strerror or e}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(src, ["the config file is not UTF-8 text"]) from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".json":
            data = load_json(text)
        elif suffix in (".yaml", ".yml"):
            data = load_yaml(text, _StrictLoader)
        else:
            raise ConfigError(src, [f"unknown config extension {shorten(suffix)}: expected "
                                    f".yaml, .yml or .json"])
    except (yaml.YAMLError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(src, [f"not valid {suffix[1:].upper()}: {first_line(e)}"]) from None
    except DuplicateKey as e:
        raise ConfigError(src, [f"not usable JSON: {e}"]) from None
    except ValueError as e:   # Python's cap on int-from-str digits (sys.int_info)
        raise ConfigError(src, [f"not usable {suffix[1:].upper()}: {number_problem(e)}"]) from None
    return validate_config(data, src)


def number_problem(err: ValueError) -> str:
    """The one line for a ValueError from parsing a file: a number too long to convert
    (Python refuses int strings of more than 4300 digits) gets a plain message."""
    if "digits" in str(err):
        return "a number has more digits than Python converts (at most 4300); no config value " \
               "needs that many"
    return first_line(err)
