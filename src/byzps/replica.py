"""The model replica: flat parameters, the one optimizer step, gradients and evaluation.

Every process (the PS and each worker) holds a :class:`Replica`. Its parameters live in one
flat float32 CPU vector theta of length d; the module's weights are views into it, evaluated
with ``torch.func.functional_call``. The server and every worker apply the PS's aggregate with
the same step (:mod:`byzps.optimizers`: SGD, Adam or AdamW on flat CPU float32 tensors, the
learning rate a pure function of the round), so replicas that start equal and receive the same
aggregate stay bit-identical, whatever device computed the gradients; :meth:`Replica.digest`
lets a worker check that each round.

Devices: with ``device`` other than the CPU the replica keeps a mirror of the module on that
device for the forward and backward passes (and evaluation): theta is copied there once per
model version, the batch is moved there, and the gradient comes back as CPU float32. The step
and the state stay on the CPU: they are what the digest proves equal.

Buffers (BatchNorm's running statistics, or any ``register_buffer``): the replicated state is
theta and the optimizer's rows only. A training forward pass runs in training mode on copies of
the module's initial buffers, so whatever it writes into them (BatchNorm's running averages of
the worker's own batches) is thrown away: buffers never differ between replicas and never
depend on which worker saw which data. BatchNorm normalises training batches with their own
statistics anyway, so the gradients are what they would be. For evaluation the PS recomputes
the running statistics at the current theta from a fixed calibration set of training inputs
(the exact average over those batches, "precise BN": Ioffe and Szegedy 2015, section 3.1; Wu
and Johnson 2021, "Rethinking 'Batch' in BatchNorm") and evaluates in eval mode with them, so
it never evaluates with a training batch's statistics nor with stale ones.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import Optional, Union

import torch
from torch import nn
from torch.func import functional_call

from byzps import optimizers
from byzps.models import builder, seeded

DIGEST_BYTES = 16

#: ``loss(output (B, C), target (B,)) -> 0-dim tensor`` (a batch mean)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``metrics(output (B, C), target (B,)) -> {name: batch mean}``
MetricsFn = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``(B, C)`` logits against ``(B,)`` int64 labels (the default
    loss)."""
    return nn.functional.cross_entropy(output, target)


def accuracy(output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``{"accuracy": fraction of argmax(output) == target}`` of a batch (the default
    metric)."""
    return {"accuracy": float((output.argmax(1) == target).to(torch.float32).mean())}


def resolve_device(spec: str) -> torch.device:
    """The torch device of a config's ``device`` field: ``cpu``, ``cuda``, ``cuda:N``, or
    ``auto`` (the first CUDA device when torch sees one, else the CPU).

    Raises:
        ValueError: a CUDA device this process cannot use (no CUDA build, no GPU, or an
            index past ``torch.cuda.device_count()``); the message says which.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else \
                f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"device {spec!r}: torch sees no CUDA device here (torch "
                             f"{torch.__version__}, {build}); use cpu or auto")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {spec!r}: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}")
    return dev


def _running_stat_layers(module: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


class Replica:
    """One copy of the model and its optimizer state.

    Args:
        model: a model name (:func:`byzps.models.model_names`) or a function that builds a
            fresh ``nn.Module`` from torch's global RNG (a task's ``build_model``); it is
            called with that RNG seeded by ``seed``, so equal seeds give bit-identical
            initial weights. Its parameters must be float32.
        seed: initial-weight seed.
        learning_rate: base step size (the schedule's ``base_lr``).
        momentum: SGD momentum (PyTorch convention: buf = momentum * buf + a; theta -= lr *
            buf); used when ``optimizer`` is None.
        optimizer: the step (:func:`byzps.optimizers.build_optimizer`); None = SGD with
            ``momentum``.
        schedule: learning rate of each round (:func:`byzps.optimizers.build_schedule`);
            None = constant.
        rounds: the run's planned rounds R (the horizon of a cosine schedule).
        loss: the training loss (default :func:`cross_entropy`).
        metrics: the evaluation metrics (default :func:`accuracy`).
        device: where forward and backward passes run (``torch.device`` or a string); the
            step always runs on the CPU.
        mirror: keep a separate mirror module even on the CPU (tests use it to exercise the
            device path without a GPU).

    Attributes:
        theta: ``(d,)`` float32 CPU parameters.
        d: number of parameters.
        opt_state: the optimizer's :class:`byzps.optimizers.OptimizerState` (``(k, d)``
            rows and the step count, which equals the number of rounds applied).
        state_rows: rows of :meth:`state`: 1 + k.

    Raises:
        ValueError: a parameter that is not float32.
    """

    def __init__(self, model: Union[str, Callable[[], nn.Module]], seed: int,
                 learning_rate: float, momentum: float = 0.0, *,
                 optimizer: Optional[optimizers.Optimizer] = None,
                 schedule: Optional[optimizers.LrSchedule] = None, rounds: int = 1,
                 loss: Optional[LossFn] = None, metrics: Optional[MetricsFn] = None,
                 device: Union[str, torch.device] = "cpu", mirror: bool = False):
        self.module = seeded(builder(model) if isinstance(model, str) else model, seed)
        self.module.requires_grad_(False)
        self.module.train()
        named = list(self.module.named_parameters())
        for name, p in named:
            if p.dtype != torch.float32:
                raise ValueError(f"model parameter {name!r} is {p.dtype}; byzps keeps "
                                 f"parameters in float32")
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
        self.d = self.theta.numel()
        self._layout = [(name, p.shape, p.numel()) for name, p in named]
        self.optimizer = optimizer if optimizer is not None else \
            optimizers.SGD(momentum=momentum)
        self.schedule = schedule if schedule is not None else optimizers.Constant()
        self.learning_rate = float(learning_rate)
        self.rounds = int(rounds)
        self.opt_state = self.optimizer.init_state(self.d)
        self.state_rows = 1 + self.optimizer.ROWS
        # SGD without momentum keeps a row of zeros that no step reads: it cannot differ
        # between replicas, so the digest leaves it out
        self._stateless = isinstance(self.optimizer, optimizers.SGD) and \
            self.optimizer.momentum == 0
        self.loss_fn: LossFn = loss if loss is not None else cross_entropy
        self.metrics_fn: MetricsFn = metrics if metrics is not None else accuracy
        self.device = torch.device(device)
        self._exec = copy.deepcopy(self.module).to(self.device) \
            if (self.device.type != "cpu" or mirror) else self.module
        self._buffers = dict(self._exec.named_buffers())
        self.has_running_stats = bool(_running_stat_layers(self.module))
        self._version = 0               # bumped whenever theta changes
        self._theta_exec: Optional[torch.Tensor] = None
        self._exec_version = -1

    # -- parameters on the compute device ---------------------------------------------------

    def _exec_theta(self) -> torch.Tensor:
        """theta on the compute device (theta itself on the CPU without a mirror)."""
        if self._exec is self.module:
            return self.theta
        if self._exec_version != self._version:
            if self._theta_exec is None:
                self._theta_exec = torch.empty(self.d, dtype=torch.float32, device=self.device)
            self._theta_exec.copy_(self.theta)
            self._exec_version = self._version
        assert self._theta_exec is not None
        return self._theta_exec

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        views, offset = {}, 0
        for name, shape, numel in self._layout:
            views[name] = flat[offset:offset + numel].view(shape)
            offset += numel
        return views

    def _fresh_buffers(self) -> dict[str, torch.Tensor]:
        """Copies of the initial buffers: what a training forward pass may write into."""
        return {k: v.clone() for k, v in self._buffers.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output ``(B, C)`` for a batch of inputs ``(B, *input_shape)``, in the
        module's current mode, on the compute device (the returned tensor lives there)."""
        params = self._views(self._exec_theta())
        return functional_call(self._exec, {**params, **self._fresh_buffers()},
                               (x.to(self.device),))

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Gradient of the loss on one minibatch, in training mode.

        Args:
            x: ``(B, *input_shape)`` inputs.
            y: ``(B,)`` int64 labels.

        Returns:
            ``(d,)`` float32 CPU gradient with respect to theta (a new tensor) and the mean
            loss.

        The gradient is taken with respect to each layer's view of theta (leaves of their own)
        and concatenated, instead of back through theta: autograd would otherwise build one
        ``(d,)`` zero tensor per layer and add them up (about 15% of a small CNN's
        forward/backward). The result is bit-identical to the gradient through theta: there
        every entry is its layer's value plus exact zeros, which is the value itself except
        that -0.0 turns into +0.0, so the concatenation gets ``+ 0.0`` once to do the same.
        The forward pass writes into copies of the buffers (see the module docstring).
        """
        flat = self._exec_theta().detach()
        leaves = {name: v.detach().requires_grad_() for name, v in self._views(flat).items()}
        inputs = (x.to(self.device), y.to(self.device))
        with torch.enable_grad():
            out = functional_call(self._exec, {**leaves, **self._fresh_buffers()},
                                  (inputs[0],))
            loss = self.loss_fn(out, inputs[1])
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        grad = torch.cat([(torch.zeros_like(v) if g is None else g).reshape(-1)
                          for v, g in zip(leaves.values(), grads)])
        if len(grads) > 1:   # as the sum with the other layers' zeros: -0.0 -> +0.0
            grad.add_(0.0)
        if grad.device.type != "cpu" or grad.dtype != torch.float32:
            grad = grad.to("cpu", torch.float32)
        return grad, float(loss.detach())

    # -- the step and the state -------------------------------------------------------------

    def lr(self) -> float:
        """The learning rate of the next step: the schedule at round = steps taken."""
        return self.schedule.lr(self.learning_rate, self.opt_state.step, self.rounds)

    def apply(self, aggregate: torch.Tensor) -> None:
        """Take the optimizer step with the aggregated gradient (on the CPU, in float32).

        Args:
            aggregate: ``(d,)`` float32 CPU, finite.

        Raises:
            ValueError: wrong shape, dtype or device.
        """
        if aggregate.shape != (self.d,) or aggregate.dtype != torch.float32 or \
                aggregate.device.type != "cpu":
            raise ValueError(f"aggregate must be ({self.d},) float32 on the CPU, got "
                             f"{tuple(aggregate.shape)} {aggregate.dtype} {aggregate.device}")
        self.optimizer.step(self.theta, aggregate, self.opt_state, self.lr())
        self._version += 1

    def momentum_buffer(self) -> torch.Tensor:
        """``(d,)`` float32 first state row: SGD's momentum buffer (zeros before the first step
        or without momentum), Adam's first moment."""
        return self.opt_state.rows[0] if self.optimizer.ROWS else torch.zeros(self.d)

    def state(self) -> torch.Tensor:
        """``(1 + k, d)`` float32 copy of [theta, optimizer rows]: what a joining worker
        needs (with the round, which is the step count). SGD: ``(2, d)`` [theta, momentum
        buffer]; Adam/AdamW: ``(3, d)`` [theta, m, v]."""
        return torch.cat([self.theta[None], self.opt_state.rows])

    def load_state(self, state: torch.Tensor, step: Optional[int] = None) -> None:
        """Overwrite theta and the optimizer rows from :meth:`state`'s tensor.

        Args:
            state: ``(1 + k, d)`` float32.
            step: the optimizer's step count (= the round the state is from); None keeps it.

        Raises:
            ValueError: wrong shape or dtype, or a negative step.
        """
        if state.shape != (self.state_rows, self.d) or state.dtype != torch.float32:
            raise ValueError(f"state must be ({self.state_rows}, {self.d}) float32, got "
                             f"{tuple(state.shape)} {state.dtype}")
        if step is not None and step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        with torch.no_grad():
            self.theta.copy_(state[0])
            self.opt_state.rows.copy_(state[1:])
        if step is not None:
            self.opt_state.step = int(step)
        self._version += 1

    def digest(self) -> str:
        """Hex digest (16 bytes of BLAKE2b, 32 hex chars) of the replicated state: theta's raw
        float32 bytes, then the optimizer's (:meth:`byzps.optimizers.OptimizerState.
        digest_update`: its rows, and for Adam/AdamW the step count).

        SGD without momentum keeps no state that a step reads (its row is zeros by
        definition), so only theta is hashed. SGD with momentum hashes [theta, momentum
        buffer], as every version since the first.
        """
        h = hashlib.blake2b(digest_size=DIGEST_BYTES)
        h.update(self.theta.contiguous().numpy().data.cast("B"))  # no copy
        if not self._stateless:
            self.opt_state.digest_update(h, self.optimizer.HASH_STEP)  # type: ignore[arg-type]
        return h.hexdigest()

    def signature(self) -> str:
        """What must be equal between the PS's replica and a worker's for them to train
        together, as one short line: the module's class, d, a hash of the layout (the
        module's ``repr``, which lists its layers and activations, and the parameter and
        buffer names, shapes, dtypes), the optimizer's name and a hash of the step's
        settings (optimizer, schedule, base learning rate and, for a schedule whose horizon
        is the run, R, also shown as ``R=...``). Example: ``Net d=1290 layout=3f9a0c12d4e5
        adam step=7b21c0de R=300``. At most 120 characters of ``[A-Za-z0-9_=. ]``."""
        layout = hashlib.blake2b(digest_size=6)
        layout.update(repr(self.module).encode())   # the layers, activations included
        for name, t in [*self.module.named_parameters(), *self.module.named_buffers()]:
            layout.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        step = hashlib.blake2b(digest_size=4)
        horizon = self.rounds if isinstance(self.schedule, optimizers.Cosine) and \
            self.schedule.t_max is None else None
        step.update(repr((self.optimizer, self.schedule, self.learning_rate, horizon)).encode())
        cls = "".join(c for c in type(self.module).__name__ if c.isalnum() or c == "_")[:40]
        rounds = "" if horizon is None else f" R={horizon}"
        return (f"{cls or 'Module'} d={self.d} layout={layout.hexdigest()} "
                f"{self.optimizer.NAME} step={step.hexdigest()}{rounds}")

    # -- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def output_width(self, x: torch.Tensor) -> int:
        """C, the width of the model's output, from a forward pass in eval mode on a few
        inputs ``(b, *input_shape)``, b >= 1."""
        was_training = self._exec.training
        self._exec.eval()
        try:
            return int(self.forward(x).shape[-1])
        finally:
            self._exec.train(was_training)

    @torch.no_grad()
    def _calibrated(self, calibration: torch.Tensor, batch: int) -> nn.Module:
        """A copy of the module whose running statistics are the exact averages over the
        calibration inputs' batches at the current theta (momentum None = cumulative), in
        eval mode."""
        module = copy.deepcopy(self._exec)
        for layer in _running_stat_layers(module):
            layer.reset_running_stats()
            layer.momentum = None
        module.train()
        params = self._views(self._exec_theta())
        for i in range(0, len(calibration), batch):
            xb = calibration[i:i + batch]
            if len(xb) < 2 and i > 0:     # a batch of one has no batch statistics
                break
            functional_call(module, params, (xb.to(self.device),))
        return module.eval()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch: int = 2000,
                 calibration: Optional[torch.Tensor] = None, calibration_batch: int = 32
                 ) -> tuple[float, dict[str, float]]:
        """Mean loss and metrics on ``(m, *input_shape)`` inputs and ``(m,)`` int64 labels, in
        eval mode, in batches of ``batch`` items (each batch's metrics weighted by its size).

        Args:
            calibration: ``(c, *input_shape)`` training inputs to recompute running
                statistics (BatchNorm) from before evaluating, in batches of
                ``calibration_batch``; None or a model without running statistics: the
                module's own buffers.

        Returns:
            ``(loss, {metric: value})``; the default metric is accuracy in [0, 1].
        """
        if self.has_running_stats and calibration is not None and len(calibration) >= 2:
            module = self._calibrated(calibration, max(2, calibration_batch))
            buffers: dict[str, torch.Tensor] = {}
        else:
            module = self._exec
            buffers = self._fresh_buffers()
        params = self._views(self._exec_theta())
        was_training = module.training
        module.eval()
        total_loss, seen = 0.0, 0
        totals: dict[str, float] = {}
        try:
            for i in range(0, len(y), batch):
                xb, yb = x[i:i + batch].to(self.device), y[i:i + batch].to(self.device)
                out = functional_call(module, {**params, **buffers}, (xb,))
                k = len(yb)
                total_loss += float(self.loss_fn(out, yb)) * k
                if self.metrics_fn is accuracy:   # exact: a count of correct answers
                    totals["accuracy"] = totals.get("accuracy", 0.0) + \
                        int((out.argmax(1) == yb).sum())
                else:
                    for name, value in self.metrics_fn(out, yb).items():
                        totals[name] = totals.get(name, 0.0) + float(value) * k
                seen += k
        finally:
            module.train(was_training)
        return total_loss / max(seen, 1), {k: v / max(seen, 1) for k, v in totals.items()}

