"""The attack interface: what a Byzantine worker may see, and what it returns.

Threat model (non-omniscient). In a real TCP deployment a Byzantine worker sees only what any
worker sees: the current model (through :attr:`AttackContext.gradient`), its own data shard
(the current minibatch :attr:`AttackContext.batch` and further minibatches from
:attr:`AttackContext.sample_batch`), the public config (n, f, the worker momentum) and its own
seed. It never sees other workers' gradients. Attacks that the papers define on statistics of
the honest gradients (ALIE, IPM, mimic) therefore *estimate* those statistics from several
minibatches of the worker's own shard; see :mod:`byzps.attacks._estimate`.

Collusion. Byzantine workers exchange no messages. Workers whose ``attack_params`` carry the
same ``collude_seed`` draw the same random numbers in the same round (every random draw of an
attack is seeded from ``(collude_seed, round)`` instead of the worker's own seed): gaussian
workers send the very same noise vector, and estimating attacks sample the same positions
within their own shards (which hold different examples, so their estimates still differ).
Deterministic choices coincide whenever the config parameters coincide: ALIE's z (from n and
f), IPM's epsilon, mimic's target class (given, or derived from the shared ``collude_seed``).

Omniscient variants (simulation only). ALIE, IPM, Min-Max, Min-Sum, Fang and the optimised
ALIE/IPM take ``omniscient: true``: they then use the vectors the honest workers send in the
same round (:attr:`AttackContext.honest_gradients`), as the papers and ByzFL define them. Only
``byzps simulate`` / ``byzps grid`` can provide that field (the simulator hands the honest
workers' vectors of the round to the Byzantine workers before they answer); a worker process
over TCP refuses to start with an omniscient attack.

Knowledge of the rule. The config is public, so every Byzantine worker can run the configured
robust pipeline itself (:attr:`AttackContext.aggregate`): the optimised ALIE/IPM search their
scale against it. Over TCP it starts from the pipeline's initial state each time (a worker does
not see the PS's rule state); in simulation an omniscient attacker gets the PS's state of the
round (e.g. centered clipping's centre, the bucketing call counter).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

#: Names an attack may list in ``needs``: the :class:`AttackContext` fields it reads.
CONTEXT_FIELDS = frozenset({"honest_gradient", "batch", "gradient", "sample_batch", "n", "f",
                            "honest_gradients", "aggregate"})

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class AttackContext:
    """What a non-omniscient Byzantine worker knows when it answers a round.

    Only ``round`` and ``honest_gradient`` are required; an attack that needs another field
    declares it in :attr:`Attack.needs` and gets a ValueError naming the field when it is None.

    Attributes:
        round: the round number r (>= 0).
        honest_gradient: ``(d,)`` float32, the vector an honest worker would send from this
            worker's shard: the minibatch gradient, or, with ``training.worker_momentum`` > 0,
            this worker's momentum vector m_t.
        batch: the current minibatch ``(x, y)``: ``(B, *input_shape)`` inputs and ``(B,)``
            int64 labels (the one ``honest_gradient`` was computed on).
        gradient: callable ``(x, y) -> (d,)`` float32, the loss gradient on any minibatch at
            the current model (a raw gradient, no momentum). Raises what the model raises on
            malformed inputs.
        sample_batch: callable ``(generator: Optional[torch.Generator]) -> (x, y)`` drawing a
            further minibatch of B examples (uniformly without replacement) from this worker's
            own shard; with a generator the draw is a pure function of the generator's state,
            without one it uses the worker's own estimation stream.
        n: number of workers in the config.
        f: number of Byzantine workers the aggregator tolerates (``Config.f``).
        seed: this worker's own seed (distinct per worker, fixed by ``training.seed``).
        worker_momentum: beta of ``training.worker_momentum`` in [0, 1) (0 = off).
        honest_gradients: ``(h, d)`` float32, the vectors the h honest workers send in this
            round (omniscient attacks only; set by the simulator, never over TCP).
        aggregate: callable ``(m, d) float32 -> (d,) float32``, the config's robust pipeline
            (pre-aggregators, then the aggregator) as the PS would run it on m rows this round,
            without changing any state: from the PS's state of the round for omniscient
            attackers in simulation, from the pipeline's initial state otherwise. Raises
            ValueError when the pipeline cannot run on m rows.
    """

    round: int
    honest_gradient: torch.Tensor
    batch: Optional[Batch] = None
    gradient: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    sample_batch: Optional[Callable[[Optional[torch.Generator]], Batch]] = None
    n: Optional[int] = None
    f: Optional[int] = None
    seed: int = 0
    worker_momentum: float = 0.0
    honest_gradients: Optional[torch.Tensor] = None
    aggregate: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @property
    def d(self) -> int:
        """Model dimension d (the length of ``honest_gradient``)."""
        return self.honest_gradient.numel()

    def _given(self, name: str) -> Any:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"this AttackContext has no {name} (round {self.round}); declare "
                             f"it in the attack's needs")
        return value

    def minibatch(self) -> Batch:
        """``batch``, which must be set. Raises ValueError naming the field otherwise."""
        return self._given("batch")

    def gradient_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``gradient``, which must be set. Raises ValueError naming the field otherwise."""
        return self._given("gradient")

    def batch_sampler(self) -> Callable[[Optional[torch.Generator]], Batch]:
        """``sample_batch``, which must be set. Raises ValueError naming the field otherwise."""
        return self._given("sample_batch")

    def aggregate_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``aggregate``, which must be set. Raises ValueError naming the field otherwise."""
        return self._given("aggregate")

    def n_and_f(self) -> tuple[int, int]:
        """``(n, f)``, which must be set. Raises ValueError naming the field otherwise."""
        return self._given("n"), self._given("f")


class Attack:
    """Base class of attacks. Subclasses set ``name`` and ``needs`` and implement ``__call__``.

    ``__call__(ctx) -> (d,)`` float32: the vector the Byzantine worker sends in round
    ``ctx.round``.

    Class attributes:
        name: the config name.
        needs: the :class:`AttackContext` fields (names from :data:`CONTEXT_FIELDS`) the attack
            reads; :meth:`require` checks them.
        output_is_gradient: True when the returned vector is a raw gradient on (poisoned)
            data rather than a transform of ``honest_gradient``; the worker then runs it
            through its own momentum (a separate buffer) like an honest worker would, so that
            with worker momentum the attack still looks like an honest worker on bad data.
    """

    name: ClassVar[str] = "attack"
    needs: frozenset[str] = frozenset({"honest_gradient"})
    output_is_gradient: ClassVar[bool] = False

    def __call__(self, ctx: AttackContext) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def omniscient(self) -> bool:
        """True when the attack reads the honest workers' vectors (``honest_gradients``), which
        only the simulator can provide."""
        return "honest_gradients" in self.needs

    def check(self, n: int, f: int) -> None:
        """Check that the attack can run with n workers and tolerance f (default: always).

        Raises:
            ValueError: it cannot (the message says why).
        """

    def require(self, ctx: AttackContext) -> None:
        """Check that every field in ``needs`` is set in ``ctx``.

        Raises:
            ValueError: naming the missing fields.
        """
        missing = sorted(k for k in self.needs if getattr(ctx, k) is None)
        if missing:
            raise ValueError(f"attack {self.name!r} needs {', '.join(missing)} in its "
                             f"AttackContext (round {ctx.round})")


def round_generator(seed: int, round_: int, salt: str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by a hash of ``(salt, seed, round_)``.

    The same arguments give the same stream on every machine; different rounds or salts give
    unrelated streams.

    Args:
        seed: any int (the worker's seed or a collusion seed).
        round_: the round number.
        salt: separates the streams of different uses (e.g. the attack name).
    """
    h = hashlib.blake2b(f"{salt}:{seed}:{round_}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & (2 ** 63 - 1))


# ---------------------------------------------------------------------------------------------
# Parameter checks shared by the attack constructors (config values come from YAML/JSON).


def finite_float(name: str, value: Any) -> float:
    """``value`` as a finite float.

    Raises:
        ValueError: a bool, a non-number or a non-finite number.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def int_at_least(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    """``value`` as an int >= ``low`` (and <= ``high`` when given).

    Raises:
        ValueError: a bool, a non-int, a value below ``low`` or above ``high``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r:.80}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {bound}, got {value!r:.80}")
    return value


#: most minibatches an attack may draw per round for its estimate (``estimate_batches``):
#: each is one forward/backward pass and one (d,) row held at once
MAX_ESTIMATE_BATCHES = 64


def estimate_batches_param(value: Any, low: int) -> int:
    """``estimate_batches`` as an int in ``low``..:data:`MAX_ESTIMATE_BATCHES`.

    Raises:
        ValueError: not an integer, or out of that range (the message names the parameter).
    """
    return int_at_least("estimate_batches", value, low, MAX_ESTIMATE_BATCHES)


def flag(name: str, value: Any) -> bool:
    """``value`` as a bool.

    Raises:
        ValueError: anything but True or False.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def optional_seed(name: str, value: Any) -> Optional[int]:
    """``value`` as None or an int >= 0 (a collusion seed).

    Raises:
        ValueError: anything else.
    """
    return None if value is None else int_at_least(name, value, 0)
