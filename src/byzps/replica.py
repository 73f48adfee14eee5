"""The model replica: flat parameters, the one optimizer step, gradients and evaluation.

Every process (the PS and each worker) holds a :class:`Replica`. Its parameters live in one
flat float32 vector theta of length d; the module's weights are views into it, evaluated with
``torch.func.functional_call``. The server and every worker call the same
:meth:`Replica.apply` (``torch.optim.SGD`` on theta, with the configured learning rate and
momentum), so replicas that start equal and receive the same aggregate stay bit-identical;
:meth:`Replica.digest` lets a worker check that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Union

import torch
from torch import nn
from torch.func import functional_call

from byzps.models import builder, seeded

DIGEST_BYTES = 16


class Replica:
    """One copy of the model and its optimizer state.

    Args:
        model: a model name (:func:`byzps.models.model_names`) or a function that builds a
            fresh ``nn.Module`` from torch's global RNG (a task's ``build_model``); it is
            called with that RNG seeded by ``seed``, so equal seeds give bit-identical
            initial weights.
        seed: initial-weight seed.
        learning_rate: SGD step size.
        momentum: SGD momentum (PyTorch convention: buf = momentum * buf + a; theta -= lr * buf).

    Attributes:
        theta: ``(d,)`` float32 parameters (an ``nn.Parameter``).
        d: number of parameters.
    """

    def __init__(self, model: Union[str, Callable[[], nn.Module]], seed: int,
                 learning_rate: float, momentum: float):
        self.module = seeded(builder(model) if isinstance(model, str) else model, seed)
        self.module.requires_grad_(False)
        named = list(self.module.named_parameters())
        flat = torch.cat([p.detach().reshape(-1) for _, p in named]).to(torch.float32)
        self.theta = nn.Parameter(flat)
        self.d = flat.numel()
        self._layout = [(name, p.shape, p.numel()) for name, p in named]
        self.optimizer = torch.optim.SGD([self.theta], lr=learning_rate, momentum=momentum,
                                         foreach=False)
        if momentum != 0:
            # An explicit zero buffer from the start, as a replica that loaded STATE has: torch
            # SGD's first step otherwise copies the gradient (keeping -0.0 entries) while a
            # replica with a zero buffer computes 0.9 * 0 + g (giving +0.0), and the digests
            # of the PS and its workers then differ in the sign of zero after round 0.
            self.optimizer.state[self.theta]["momentum_buffer"] = torch.zeros(self.d)

    def _views(self) -> dict[str, torch.Tensor]:
        views, offset = {}, 0
        for name, shape, numel in self._layout:
            views[name] = self.theta[offset:offset + numel].view(shape)
            offset += numel
        return views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output ``(B, C)`` (logits of C classes) for a batch of inputs
        ``(B, *input_shape)``."""
        return functional_call(self.module, self._views(), (x,))

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Cross-entropy gradient on one minibatch.

        Args:
            x: ``(B, *input_shape)`` inputs.
            y: ``(B,)`` int64 labels.

        Returns:
            ``(d,)`` float32 gradient with respect to theta (a new tensor) and the mean loss.

        The gradient is taken with respect to each layer's view of theta (leaves of their own)
        and concatenated, instead of back through theta: autograd would otherwise build one
        ``(d,)`` zero tensor per layer and add them up (about 15% of a small CNN's
        forward/backward). The result is bit-identical to the gradient through theta: there
        every entry is its layer's value plus exact zeros, which is the value itself except
        that -0.0 turns into +0.0, so the concatenation gets ``+ 0.0`` once to do the same.
        """
        flat = self.theta.detach()
        leaves, offset = {}, 0
        for name, shape, numel in self._layout:
            leaves[name] = flat[offset:offset + numel].view(shape).detach().requires_grad_()
            offset += numel
        with torch.enable_grad():
            loss = nn.functional.cross_entropy(functional_call(self.module, leaves, (x,)), y)
            grads = torch.autograd.grad(loss, list(leaves.values()))
        grad = torch.cat([g.reshape(-1) for g in grads])
        if len(grads) > 1:   # as the sum with the other layers' zeros: -0.0 -> +0.0
            grad.add_(0.0)
        return grad, float(loss.detach())

    def apply(self, aggregate: torch.Tensor) -> None:
        """Take the optimizer step with the aggregated gradient.

        Args:
            aggregate: ``(d,)`` float32, finite.

        Raises:
            ValueError: wrong shape or dtype.
        """
        if aggregate.shape != (self.d,) or aggregate.dtype != torch.float32:
            raise ValueError(f"aggregate must be ({self.d},) float32, got "
                             f"{tuple(aggregate.shape)} {aggregate.dtype}")
        self.theta.grad = aggregate
        self.optimizer.step()
        self.theta.grad = None

    def momentum_buffer(self) -> torch.Tensor:
        """``(d,)`` float32 SGD momentum buffer (zeros before the first step)."""
        buf = self.optimizer.state.get(self.theta, {}).get("momentum_buffer")
        return torch.zeros(self.d) if buf is None else buf

    def state(self) -> torch.Tensor:
        """``(2, d)`` float32 copy of [theta, momentum buffer]: what a joining worker needs."""
        return torch.stack([self.theta.detach(), self.momentum_buffer()])

    def load_state(self, state: torch.Tensor) -> None:
        """Overwrite theta and the momentum buffer from :meth:`state`'s ``(2, d)`` tensor.

        Raises:
            ValueError: wrong shape or dtype.
        """
        if state.shape != (2, self.d) or state.dtype != torch.float32:
            raise ValueError(f"state must be (2, {self.d}) float32, got {tuple(state.shape)} "
                             f"{state.dtype}")
        with torch.no_grad():
            self.theta.copy_(state[0])
        if self.optimizer.defaults["momentum"] != 0:
            self.optimizer.state[self.theta]["momentum_buffer"] = state[1].clone()

    def digest(self) -> str:
        """Hex digest (16 bytes of BLAKE2b, 32 hex chars) of the replica's state: theta's raw
        float32 bytes, then the momentum buffer's when SGD momentum is not 0.

        With momentum 0 the optimizer keeps no buffer (it is zeros by definition and cannot
        differ between replicas), so only theta is hashed: half the bytes. With momentum != 0
        the digest is that of [theta, momentum buffer] exactly as before issue 14.
        """
        h = hashlib.blake2b(digest_size=DIGEST_BYTES)
        h.update(self.theta.detach().contiguous().numpy().data.cast("B"))  # no copy
        if self.optimizer.defaults["momentum"] != 0:
            h.update(self.momentum_buffer().contiguous().numpy().data.cast("B"))
        return h.hexdigest()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> tuple[float, float]:
        """Mean cross-entropy loss and accuracy in [0, 1] on ``(m, *input_shape)`` inputs and
        ``(m,)`` int64 labels, in batches of ``batch`` items."""
        total_loss, correct = 0.0, 0
        for i in range(0, len(y), batch):
            logits = self.forward(x[i:i + batch])
            total_loss += float(nn.functional.cross_entropy(logits, y[i:i + batch],
                                                            reduction="sum"))
            correct += int((logits.argmax(1) == y[i:i + batch]).sum())
        return total_loss / len(y), correct / len(y)
