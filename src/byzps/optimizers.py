"""The one authoritative optimizer step on flat float32 CPU tensors, and learning-rate schedules.

Every replica (the PS's and each worker's) holds its parameters as one flat ``(d,)`` float32
vector theta and applies the PS's aggregate a with the same step, so replicas that start equal
stay bit-identical whatever device computed the gradients. The optimizer's state is explicit:
``(k, d)`` float32 rows plus an integer step count (:class:`OptimizerState`), so it can travel
in STATE, go into checkpoints and be hashed into the replica digest
(:meth:`OptimizerState.digest_update`).

| name | rows k | state rows | paper |
|---|---|---|---|
| ``sgd`` | 1 | momentum buffer (zeros when momentum is 0) | Polyak 1964; Nesterov 1983 (``nesterov``) |
| ``adam`` | 2 | first moment m, second moment v | Kingma & Ba 2015, "Adam" |
| ``adamw`` | 2 | first moment m, second moment v | Loshchilov & Hutter 2019, "Decoupled weight decay regularization" |

Each step performs the same tensor operations, in the same order, as the single-tensor path of
``torch.optim.SGD`` / ``Adam`` / ``AdamW`` (torch 2.13, ``foreach=False``, the default on the
CPU) on a momentum buffer that starts as explicit zeros; the results are bit-identical to
torch's (tests check ``torch.equal`` over many steps). SGD's state row and step match today's
:class:`byzps.replica.Replica` exactly, so wiring this module in leaves SGD digests unchanged.

Learning-rate schedules (:class:`LrSchedule`) are pure functions of the round r (0-based): every
replica computes the same learning rate for round r without carrying scheduler state, and a
resumed run continues exactly. Their closed forms equal ``torch.optim.lr_scheduler``'s
``_get_closed_form_lr`` for StepLR, MultiStepLR and CosineAnnealingLR bit for bit.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


class OptimizerError(ValueError):
    """A bad optimizer or schedule parameter, or state of the wrong shape; names the field."""


# ---------------------------------------------------------------------------------------------
# State


@dataclass
class OptimizerState:
    """The explicit state of one replica's optimizer.

    Attributes:
        rows: ``(k, d)`` float32 CPU tensor, contiguous: SGD's momentum buffer (k = 1) or
            Adam's first and second moments (k = 2). Updated in place by the step.
        step: number of steps taken (Adam's bias correction uses it; SGD ignores it but counts).
    """

    rows: torch.Tensor
    step: int = 0

    def digest_update(self, h: hashlib._Hash, with_step: bool) -> None:
        """Feed the state into a running hash: every row's raw little-endian float32 bytes,
        then (if ``with_step``) the step as 8 little-endian bytes.

        SGD passes ``with_step=False`` so that [theta, momentum buffer] hash exactly as
        :meth:`byzps.replica.Replica.digest` does today.
        """
        for row in self.rows:
            h.update(memoryview(row.contiguous().numpy()).cast("B"))
        if with_step:
            h.update(int(self.step).to_bytes(8, "little", signed=False))

    def clone(self) -> OptimizerState:
        """A deep copy (rows cloned)."""
        return OptimizerState(self.rows.clone(), self.step)


def _check_flat(name: str, t: torch.Tensor, d: Optional[int] = None) -> int:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 1 \
            or t.device.type != "cpu":
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        dtype = getattr(t, "dtype", None)
        raise OptimizerError(f"{name}: expected a flat (d,) float32 CPU tensor, got {shape} "
                             f"{dtype}")
    if d is not None and t.numel() != d:
        raise OptimizerError(f"{name}: expected ({d},), got ({t.numel()},)")
    return t.numel()


# ---------------------------------------------------------------------------------------------
# Optimizers


@dataclass(frozen=True)
class Optimizer:
    """Base class: one optimizer's hyper-parameters and its step on flat tensors.

    Subclasses set :attr:`NAME`, :attr:`ROWS` (state rows k) and :attr:`HASH_STEP`, and
    implement :meth:`_update`.
    """

    NAME = "optimizer"
    ROWS = 0
    HASH_STEP = True

    def init_state(self, d: int) -> OptimizerState:
        """Fresh state for d parameters: ``(k, d)`` zeros and step 0.

        Raises:
            OptimizerError: d < 1.
        """
        if d < 1:
            raise OptimizerError(f"d: expected at least 1 parameter, got {d}")
        return OptimizerState(torch.zeros(self.ROWS, d, dtype=torch.float32), 0)

    def check_state(self, state: OptimizerState, d: int) -> None:
        """Raise :class:`OptimizerError` unless ``state.rows`` is ``(k, d)`` float32 CPU and
        ``state.step >= 0`` (for state loaded from STATE or a checkpoint)."""
        rows = state.rows
        if not isinstance(rows, torch.Tensor) or rows.dtype != torch.float32 or \
                tuple(rows.shape) != (self.ROWS, d) or rows.device.type != "cpu":
            shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise OptimizerError(f"{self.NAME} state: expected ({self.ROWS}, {d}) float32 CPU "
                                 f"rows, got {shape} {getattr(rows, 'dtype', None)}")
        if not isinstance(state.step, int) or state.step < 0:
            raise OptimizerError(f"{self.NAME} state: step must be an integer >= 0, got "
                                 f"{state.step!r}")

    def step(self, theta: torch.Tensor, grad: torch.Tensor, state: OptimizerState,
             lr: float) -> None:
        """Apply one step in place: update ``theta`` and ``state`` with gradient ``grad``.

        Args:
            theta: ``(d,)`` float32 CPU parameters, modified in place.
            grad: ``(d,)`` float32 CPU gradient (the aggregate); not modified.
            state: this optimizer's state for d (see :meth:`init_state`), modified in place.
            lr: learning rate of this round (>= 0; see :class:`LrSchedule`).

        Raises:
            OptimizerError: wrong shapes or dtypes, or lr not a finite number >= 0.
        """
        d = _check_flat("theta", theta)
        _check_flat("gradient", grad, d)
        self.check_state(state, d)
        if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr)
                                        and lr >= 0):
            raise OptimizerError(f"lr: expected a finite number >= 0, got {lr!r}")
        with torch.no_grad():
            self._update(theta, grad, state, float(lr))
        state.step += 1

    def _update(self, theta: torch.Tensor, grad: torch.Tensor, state: OptimizerState,
                lr: float) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class SGD(Optimizer):
    """Stochastic gradient descent with heavy-ball momentum (Polyak 1964), optionally Nesterov's
    variant (Nesterov 1983; as formulated by Sutskever et al. 2013), and L2 weight decay.

    One step with gradient a, buffer b (starts at zeros), momentum mu, weight decay w::

        g = a + w * theta                 (if w != 0)
        b = mu * b + g                    (if mu != 0)
        g = g + mu * b  (nesterov)  or  g = b
        theta = theta - lr * g

    Attributes:
        momentum: mu in [0, 1) (the config's ``training.momentum``).
        nesterov: Nesterov momentum; needs momentum > 0.
        weight_decay: w >= 0 (L2 penalty added to the gradient).

    Raises:
        OptimizerError: a parameter out of range.
    """

    NAME = "sgd"
    ROWS = 1
    HASH_STEP = False
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _in_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _in_range("weight_decay", self.weight_decay, 0.0, math.inf)
        if self.nesterov and self.momentum == 0:
            raise OptimizerError("nesterov: needs momentum > 0 (training.momentum)")

    def _update(self, theta, grad, state, lr):
        g = grad
        if self.weight_decay != 0:
            g = g.add(theta, alpha=self.weight_decay)
        if self.momentum != 0:
            buf = state.rows[0]
            buf.mul_(self.momentum).add_(g, alpha=1)
            g = g.add(buf, alpha=self.momentum) if self.nesterov else buf
        theta.add_(g, alpha=-lr)


@dataclass(frozen=True)
class Adam(Optimizer):
    """Adam (Kingma & Ba 2015, Algorithm 1) with optional L2 weight decay added to the gradient.

    One step t (1-based) with gradient a, moments m, v (start at zeros)::

        g = a + w * theta                         (if w != 0)
        m = m + (1 - beta1) * (g - m)             (= beta1 m + (1 - beta1) g)
        v = beta2 * v + (1 - beta2) * g * g
        theta = theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Attributes:
        beta1, beta2: moment decay rates in [0, 1) (defaults 0.9, 0.999 from the paper).
        eps: added to the denominator, >= 0 (default 1e-8 from the paper).
        weight_decay: w >= 0 (default 0).

    Raises:
        OptimizerError: a parameter out of range.
    """

    NAME = "adam"
    ROWS = 2
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    #: True for AdamW: the weight decay shrinks theta directly instead of entering the gradient.
    DECOUPLED = False

    def __post_init__(self) -> None:
        _in_range("beta1", self.beta1, 0.0, 1.0, hi_open=True)
        _in_range("beta2", self.beta2, 0.0, 1.0, hi_open=True)
        _in_range("eps", self.eps, 0.0, math.inf)
        _in_range("weight_decay", self.weight_decay, 0.0, math.inf)

    def _update(self, theta, grad, state, lr):
        t = state.step + 1
        g = grad
        if self.weight_decay != 0:
            if self.DECOUPLED:
                theta.mul_(1 - lr * self.weight_decay)
            else:
                g = g.add(theta, alpha=self.weight_decay)
        m, v = state.rows[0], state.rows[1]
        m.lerp_(g, 1 - self.beta1)
        v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        # torch computes these in Python floats from a float step; t ** as float is the same
        bias1 = 1 - self.beta1 ** float(t)
        bias2 = 1 - self.beta2 ** float(t)
        step_size = lr / bias1
        denom = (v.sqrt() / bias2 ** 0.5).add_(self.eps)
        theta.addcdiv_(m, denom, value=-step_size)


@dataclass(frozen=True)
class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019, Algorithm 2): Adam whose weight decay is decoupled from
    the gradient: ``theta = theta * (1 - lr * w)`` before the Adam update (PyTorch's form, where
    the schedule multiplier is folded into lr). Default w = 0.01 (PyTorch's default).

    Attributes and errors as :class:`Adam`.
    """

    NAME = "adamw"
    DECOUPLED = True
    weight_decay: float = 0.01


def _in_range(name: str, value: Any, lo: float, hi: float, hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and value >= lo and (value < hi if hi_open else value <= hi)
    if not ok:
        top = f"< {hi}" if hi_open else ("finite" if hi == math.inf else f"<= {hi}")
        raise OptimizerError(f"{name}: expected a number >= {lo} and {top}, got {value!r}")


_OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def optimizer_names() -> list[str]:
    """Names accepted by :func:`build_optimizer`, sorted."""
    return sorted(_OPTIMIZERS)


def optimizer_params(name: str) -> dict[str, Any]:
    """Parameter name -> default of optimizer ``name`` (for ``byzps list``).

    Raises:
        OptimizerError: unknown name.
    """
    return _defaults(_OPTIMIZERS, name, "optimizer")


def build_optimizer(name: str, **params: Any) -> Optimizer:
    """Build optimizer ``name`` with keyword ``params`` (see each class).

    Raises:
        OptimizerError: unknown name, unknown parameter, or a value out of range.
    """
    return _build(_OPTIMIZERS, name, "optimizer", params)


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise OptimizerError(f"unknown {what} {name!r}; expected one of {', '.join(sorted(table))}")
    return table[name]


def _defaults(table: dict, name: str, what: str) -> dict[str, Any]:
    """Field name -> default of the dataclass ``table[name]`` (a factory's value for a
    ``default_factory`` field)."""
    cls = _lookup(table, name, what)
    return {f.name: f.default_factory() if callable(f.default_factory) else f.default
            for f in cls.__dataclass_fields__.values()}


def _build(table: dict, name: str, what: str, params: dict[str, Any]) -> Any:
    """``table[name](**params)`` after refusing unknown parameter names."""
    cls = _lookup(table, name, what)
    known = set(cls.__dataclass_fields__)
    extra = sorted(set(params) - known)
    if extra:
        raise OptimizerError(f"{what} {name}: unknown parameter(s) {', '.join(extra)}; "
                             f"expected some of {', '.join(sorted(known)) or 'none'}")
    return cls(**params)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules: pure functions of the round


@dataclass(frozen=True)
class LrSchedule:
    """Base class: the learning rate of round r as a pure function of (base lr, r, rounds).

    Subclasses implement :meth:`factor_lr`. Rounds are 0-based: round 0 uses the base rate
    (as ``torch.optim.lr_scheduler`` at ``last_epoch = 0``).
    """

    NAME = "schedule"

    def lr(self, base_lr: float, round: int, rounds: int) -> float:
        """The learning rate of ``round`` (0-based) in a run of ``rounds`` rounds.

        Args:
            base_lr: ``training.learning_rate`` (> 0).
            round: r >= 0.
            rounds: R >= 1, the planned rounds of the whole run (cosine's horizon; a resumed
                run passes the same R).

        Returns:
            a Python float (float64) > 0 unless a schedule decays it to its ``eta_min`` of 0.

        Raises:
            OptimizerError: round < 0 or rounds < 1.
        """
        if not isinstance(round, int) or round < 0:
            raise OptimizerError(f"round: expected an integer >= 0, got {round!r}")
        if not isinstance(rounds, int) or rounds < 1:
            raise OptimizerError(f"rounds: expected an integer >= 1, got {rounds!r}")
        return self._lr(float(base_lr), round, rounds)

    def _lr(self, base_lr: float, r: int, rounds: int) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class Constant(LrSchedule):
    """The base learning rate every round (today's behaviour)."""

    NAME = "constant"

    def _lr(self, base_lr, r, rounds):
        return base_lr


@dataclass(frozen=True)
class Step(LrSchedule):
    """Step decay: ``base_lr * gamma ** (r // step_size)`` (He et al. 2016 divide by 10 at fixed
    points; PyTorch's StepLR closed form).

    Attributes:
        step_size: rounds between decays (>= 1).
        gamma: factor per decay in (0, 1] (default 0.1).
    """

    NAME = "step"
    step_size: int = 1
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.step_size, int) or isinstance(self.step_size, bool) or \
                self.step_size < 1:
            raise OptimizerError(f"step_size: expected an integer >= 1, got {self.step_size!r}")
        _check_gamma(self.gamma)

    def _lr(self, base_lr, r, rounds):
        return base_lr * self.gamma ** (r // self.step_size)


@dataclass(frozen=True)
class MultiStep(LrSchedule):
    """Decay by ``gamma`` at each milestone: ``base_lr * gamma ** #{m in milestones : m <= r}``
    (He et al. 2016 train CIFAR ResNets with lr / 10 at 32k and 48k iterations; PyTorch's
    MultiStepLR closed form).

    Attributes:
        milestones: strictly increasing rounds >= 1.
        gamma: factor per milestone in (0, 1] (default 0.1).
    """

    NAME = "multistep"
    milestones: tuple[int, ...] = field(default_factory=tuple)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        ms = tuple(self.milestones)
        if not ms or any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in ms) \
                or any(a >= b for a, b in zip(ms, ms[1:])):
            raise OptimizerError(f"milestones: expected a non-empty, strictly increasing list "
                                 f"of rounds >= 1, got {list(ms)}")
        object.__setattr__(self, "milestones", ms)
        _check_gamma(self.gamma)

    def _lr(self, base_lr, r, rounds):
        return base_lr * self.gamma ** bisect.bisect_right(self.milestones, r)


@dataclass(frozen=True)
class Cosine(LrSchedule):
    """Cosine annealing without restarts (Loshchilov & Hutter 2017, "SGDR", with T_max the
    whole run): ``eta_min + (base_lr - eta_min) * (1 + cos(pi * r / T)) / 2``, T = ``t_max``
    or the run's rounds; rounds past T keep ``eta_min``.

    Attributes:
        eta_min: the final learning rate (>= 0, default 0).
        t_max: the horizon T in rounds (>= 1); None = the run's rounds.
    """

    NAME = "cosine"
    eta_min: float = 0.0
    t_max: Optional[int] = None

    def __post_init__(self) -> None:
        _in_range("eta_min", self.eta_min, 0.0, math.inf)
        if self.t_max is not None and (not isinstance(self.t_max, int) or
                                       isinstance(self.t_max, bool) or self.t_max < 1):
            raise OptimizerError(f"t_max: expected an integer >= 1, got {self.t_max!r}")

    def _lr(self, base_lr, r, rounds):
        horizon = self.t_max if self.t_max is not None else rounds
        r = min(r, horizon)
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * r / horizon)) / 2


def _check_gamma(gamma: Any) -> None:
    ok = isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0 < gamma <= 1
    if not ok:
        raise OptimizerError(f"gamma: expected a number in (0, 1], got {gamma!r}")


_SCHEDULES: dict[str, type[LrSchedule]] = {"constant": Constant, "step": Step,
                                           "multistep": MultiStep, "cosine": Cosine}


def schedule_names() -> list[str]:
    """Names accepted by :func:`build_schedule`, sorted."""
    return sorted(_SCHEDULES)


def schedule_params(name: str) -> dict[str, Any]:
    """Parameter name -> default of schedule ``name`` (for ``byzps list``; a required
    parameter shows its placeholder default, e.g. ``milestones=()``).

    Raises:
        OptimizerError: unknown name.
    """
    return _defaults(_SCHEDULES, name, "lr schedule")


def build_schedule(name: str, **params: Any) -> LrSchedule:
    """Build schedule ``name`` with keyword ``params`` (see each class).

    Raises:
        OptimizerError: unknown name, unknown parameter, or a value out of range.
    """
    if "milestones" in params:
        params = dict(params, milestones=tuple(params["milestones"]))
    return _build(_SCHEDULES, name, "lr schedule", params)
