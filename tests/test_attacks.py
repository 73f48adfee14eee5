"""The attack library: exact values on small hand-made inputs, the registry and its errors."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from byzps import attacks
from byzps.attacks import AttackContext, alie_z
from byzps.attacks.base import round_generator
from byzps.replica import Replica


def vec(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


class Shard:
    """A fake own shard for estimating attacks.

    ``gradient(x, y)`` returns ``x.sum(0)``, so a minibatch whose x is one row IS that
    gradient; ``sample_batch(gen)`` hands out the preset minibatches in order and records the
    first numbers the generator yields (to compare the random streams of two workers).
    """

    def __init__(self, *batches: tuple[torch.Tensor, torch.Tensor]):
        self.batches = list(batches)
        self.draws: list[list[int]] = []

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.sum(0)

    def sample_batch(self, gen=None):
        self.draws.append(torch.randint(1000, (4,), generator=gen).tolist())
        return self.batches.pop(0)


def one(*g: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A minibatch of one example whose gradient (under Shard.gradient) is g."""
    return vec(*g).reshape(1, -1), torch.tensor([0])


def ctx_for(shard: Shard, honest: torch.Tensor, batch=None, **kw) -> AttackContext:
    return AttackContext(0, honest, batch=batch if batch is not None else one(*honest.tolist()),
                         gradient=shard.gradient, sample_batch=shard.sample_batch, **kw)


# -- registry ---------------------------------------------------------------------------------


def test_names_and_params():
    assert attacks.names() == ["alie", "fang", "gaussian", "inf", "ipm", "label_flip", "large",
                               "mimic", "minmax", "minsum", "nan", "opt_alie", "opt_ipm",
                               "sign_flip", "zero"]
    assert attacks.params("sign_flip") == {"scale": -1.0}
    assert attacks.params("gaussian") == {"mu": 0.0, "sigma": 200.0, "collude_seed": None}
    assert attacks.params("alie") == {"z": None, "estimate_batches": 5, "collude_seed": None,
                                      "omniscient": False}
    assert attacks.params("ipm") == {"epsilon": 0.1, "estimate_batches": 5, "collude_seed": None,
                                     "omniscient": False}
    assert attacks.params("label_flip") == {"num_classes": 10}
    assert attacks.params("mimic") == {"target_class": None, "num_classes": 10,
                                       "estimate_batches": 5, "collude_seed": None}
    assert attacks.params("large") == {"value": 1e30, "along_gradient": False}
    for name in ("nan", "inf", "zero"):
        assert attacks.params(name) == {}
    for name in attacks.names():  # every attack builds with its defaults
        assert attacks.build(name).name == name


@pytest.mark.parametrize("call, message", [
    (lambda: attacks.build("signflip"), "unknown attack 'signflip'; valid choices: alie, "
                                        "fang, gaussian, inf, ipm, label_flip, large, mimic, "
                                        "minmax, minsum, nan, opt_alie, opt_ipm, sign_flip, zero"),
    (lambda: attacks.build(None), "unknown attack None"),
    (lambda: attacks.params("foo"), "valid choices: alie"),
    (lambda: attacks.build("gaussian", sgima=1.0),
     "attack 'gaussian': unknown parameter(s) sgima; expected mu, sigma, collude_seed"),
    (lambda: attacks.build("nan", scale=1.0), "expected no parameters"),
    (lambda: attacks.build("sign_flip", scale=float("inf")), "scale must be finite"),
    (lambda: attacks.build("sign_flip", scale=True), "scale must be a number"),
    (lambda: attacks.build("gaussian", sigma=-1.0), "sigma must be >= 0"),
    (lambda: attacks.build("gaussian", collude_seed=-3), "collude_seed must be >= 0"),
    (lambda: attacks.build("alie", estimate_batches=1), "estimate_batches must be in 2..64"),
    (lambda: attacks.build("alie", z="big"), "z must be a number"),
    (lambda: attacks.build("ipm", epsilon=0.0), "epsilon must be > 0"),
    (lambda: attacks.build("ipm", estimate_batches=2.5), "estimate_batches must be an integer"),
    (lambda: attacks.build("label_flip", num_classes=1), "num_classes must be >= 2"),
    (lambda: attacks.build("alie", omniscient="yes"), "omniscient must be true or false"),
    (lambda: attacks.build("ipm", omniscient=1), "omniscient must be true or false"),
    (lambda: attacks.build("mimic", target_class=10), "target_class must be < num_classes=10"),
])
def test_registry_errors(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value)


def test_missing_context_fields_are_named():
    with pytest.raises(ValueError, match="'label_flip' needs batch, gradient"):
        attacks.build("label_flip")(AttackContext(0, vec(1.0)))
    with pytest.raises(ValueError, match="'alie' needs batch, f, gradient, n, sample_batch"):
        attacks.build("alie")(AttackContext(0, vec(1.0)))
    # with z given, ALIE no longer needs n and f; IPM with one batch needs no sample_batch
    assert attacks.build("alie", z=1.0).needs == {"honest_gradient", "batch", "gradient",
                                                  "sample_batch"}
    assert "sample_batch" not in attacks.build("ipm", estimate_batches=1).needs


# -- sign flip, constants ---------------------------------------------------------------------


def test_sign_flip():
    # -2 * [1, -2, 3] = [-2, 4, -6]
    out = attacks.build("sign_flip", scale=-2.0)(AttackContext(3, vec(1, -2, 3)))
    assert torch.equal(out, vec(-2, 4, -6))


def test_nan_inf_zero():
    g = vec(1, 2, 3, 4, 5)
    nan = attacks.build("nan")(AttackContext(0, g))
    inf = attacks.build("inf")(AttackContext(0, g))
    zero = attacks.build("zero")(AttackContext(0, g))
    for out in (nan, inf, zero):
        assert out.shape == (5,) and out.dtype == torch.float32
    assert torch.isnan(nan).all()
    assert torch.isposinf(inf).all()
    assert torch.equal(zero, torch.zeros(5))


# -- large ------------------------------------------------------------------------------------


def test_large_constant_and_along_gradient():
    g = vec(1, -4, 2, 0, 0.5)
    out = attacks.build("large")(AttackContext(0, g))
    assert out.dtype == torch.float32 and torch.equal(out, torch.full((5,), 1e30))
    out = attacks.build("large", value=-8.0)(AttackContext(3, g))
    assert out.tolist() == [-8.0] * 5
    # along the own gradient: largest |entry| (-4) becomes |value|, signs follow g
    out = attacks.build("large", value=8.0, along_gradient=True)(AttackContext(0, g))
    assert out.tolist() == [2.0, -8.0, 4.0, 0.0, 1.0]
    out = attacks.build("large", along_gradient=True)(AttackContext(0, g))
    torch.testing.assert_close(out, (g.double() * 2.5e29).float(), rtol=0, atol=0)
    # the float32 maximum is reachable without overflow, in either direction
    top = float(torch.finfo(torch.float32).max)
    out = attacks.build("large", value=-top, along_gradient=True)(AttackContext(0, g))
    assert torch.isfinite(out).all() and out[1].item() == top
    # a zero gradient has no direction: the constant vector
    out = attacks.build("large", value=3.0, along_gradient=True)(AttackContext(0, g * 0))
    assert out.tolist() == [3.0] * 5


@pytest.mark.parametrize("params, message", [
    ({"value": math.inf}, "value must be finite"),
    ({"value": 1e39}, r"at most 3\.40282e\+38 in absolute value"),
    ({"value": "1e30"}, "value must be a number"),
    ({"along_gradient": 1}, "along_gradient must be true or false"),
])
def test_large_rejects_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        attacks.build("large", **params)


# -- gaussian ---------------------------------------------------------------------------------


def test_gaussian_reproducible_per_seed_and_round():
    atk = attacks.build("gaussian", mu=1.0, sigma=2.0)
    g = torch.zeros(1000)
    a = atk(AttackContext(5, g, seed=11))
    assert torch.equal(a, atk(AttackContext(5, g, seed=11)))          # same (seed, round)
    assert not torch.equal(a, atk(AttackContext(6, g, seed=11)))      # next round: fresh
    assert not torch.equal(a, atk(AttackContext(5, g, seed=12)))      # another worker
    # exactly mu + sigma * xi, xi the N(0, I) draw of the (seed, round) generator
    xi = torch.randn(1000, generator=round_generator(11, 5, "gaussian"))
    assert torch.equal(a, xi * 2.0 + 1.0)
    assert abs(float(a.mean()) - 1.0) < 0.3 and abs(float(a.std()) - 2.0) < 0.3
    # sigma = 0: every coordinate is exactly mu
    assert torch.equal(attacks.build("gaussian", mu=-3.0, sigma=0.0)(AttackContext(0, g)),
                       torch.full((1000,), -3.0))


def test_gaussian_collusion_sends_the_same_vector():
    atk = attacks.build("gaussian", collude_seed=7)
    g = torch.zeros(50)
    # two workers with different own seeds, same collude_seed: identical in each round
    assert torch.equal(atk(AttackContext(2, g, seed=1)), atk(AttackContext(2, g, seed=2)))
    assert not torch.equal(atk(AttackContext(2, g, seed=1)), atk(AttackContext(3, g, seed=1)))


def test_round_generator_is_a_pure_function():
    a = torch.randint(10 ** 6, (3,), generator=round_generator(1, 2, "x"))
    assert torch.equal(a, torch.randint(10 ** 6, (3,), generator=round_generator(1, 2, "x")))
    assert not torch.equal(a, torch.randint(10 ** 6, (3,), generator=round_generator(1, 2, "y")))


# -- ALIE -------------------------------------------------------------------------------------


def test_alie_z_from_n_and_f():
    # n = 10, f = 3: s = floor(10/2 + 1) - 3 = 6 - 3 = 3; (n - s)/n = 7/10 = 0.7;
    # z = Phi^-1(0.7) = 0.5244005127080407 (normal table: 0.5244)
    assert alie_z(10, 3) == pytest.approx(0.5244005127080407, abs=1e-12)
    assert alie_z(10, 3) == pytest.approx(NormalDist().inv_cdf(0.7), abs=1e-15)
    try:
        from scipy.stats import norm
        assert alie_z(10, 3) == pytest.approx(norm.ppf(0.7), abs=1e-12)
    except ImportError:
        pass
    # n = 25, f = 5: s = floor(13.5) - 5 = 8; 17/25 = 0.68; Phi^-1(0.68) = 0.4676987991145...
    assert alie_z(25, 5) == pytest.approx(0.46769879911450835, abs=1e-12)
    # n = 4, f = 1: s = 3 - 1 = 2; 2/4 = 0.5; z = 0 (ALIE then sends the estimated mean)
    assert alie_z(4, 1) == 0.0


@pytest.mark.parametrize("n, f", [(4, 3), (10, 6), (2, 0), (1, 0)])
def test_alie_z_undefined(n, f):
    # (4, 3): s = 3 - 3 = 0; (10, 6): s = 6 - 6 = 0; (2, 0): s = 2 = n; (1, 0): s = 1 = n
    with pytest.raises(ValueError, match="needs 0 < s < n"):
        alie_z(n, f)
    with pytest.raises(ValueError, match="give z explicitly"):
        attacks.build("alie").check(n, f)
    attacks.build("alie", z=1.0).check(n, f)  # an explicit z needs nothing from n and f


def test_alie_estimate_from_own_shard():
    # k = 3 gradients: g1 = honest [1, 0], then two sampled ones [3, 2] and [5, 4].
    # mu = [(1+3+5)/3, (0+2+4)/3] = [3, 2]; deviations (-2, 0, 2) in both coordinates:
    # sigma = sqrt((4 + 0 + 4) / (3 - 1)) = 2. With z = 1.5: mu - 1.5 * sigma = [0, -1].
    shard = Shard(one(3, 2), one(5, 4))
    out = attacks.build("alie", z=1.5, estimate_batches=3)(ctx_for(shard, vec(1, 0)))
    assert torch.equal(out, vec(0, -1))
    assert len(shard.draws) == 2
    # z from n = 10, f = 3 (0.52440...): [3 - 2 z, 2 - 2 z]
    shard = Shard(one(3, 2), one(5, 4))
    out = attacks.build("alie", estimate_batches=3)(ctx_for(shard, vec(1, 0), n=10, f=3))
    z = NormalDist().inv_cdf(0.7)
    torch.testing.assert_close(out, vec(3 - 2 * z, 2 - 2 * z))


def test_alie_with_worker_momentum():
    # beta = 0.6: the centre is the worker's own momentum [10, 10]; the raw gradients are the
    # current batch's [1, 0] (recomputed, honest_gradient is the momentum) and [3, 2], [5, 4]:
    # sigma = 2 as above, times sqrt((1 - 0.6) / (1 + 0.6)) = sqrt(0.25) = 0.5 -> 1.
    # z = 1.5: [10 - 1.5, 10 - 1.5] = [8.5, 8.5]
    shard = Shard(one(3, 2), one(5, 4))
    ctx = ctx_for(shard, vec(10, 10), batch=one(1, 0), worker_momentum=0.6)
    out = attacks.build("alie", z=1.5, estimate_batches=3)(ctx)
    torch.testing.assert_close(out, vec(8.5, 8.5))


def test_collusion_shares_the_sampling_stream():
    def draws(seed, collude_seed):
        shard = Shard(one(3, 2), one(5, 4))
        attacks.build("alie", z=1.0, estimate_batches=3, collude_seed=collude_seed)(
            ctx_for(shard, vec(1, 0), seed=seed))
        return shard.draws
    assert draws(1, 99) == draws(2, 99)       # colluders draw the same positions
    assert draws(1, None) != draws(2, None)   # independent workers do not
    assert draws(1, None) == draws(1, None)   # and each is reproducible


# -- IPM --------------------------------------------------------------------------------------


def test_ipm():
    # mu = mean([1, 0], [3, 2], [5, 4]) = [3, 2]; -0.5 * mu = [-1.5, -1]
    shard = Shard(one(3, 2), one(5, 4))
    out = attacks.build("ipm", epsilon=0.5, estimate_batches=3)(ctx_for(shard, vec(1, 0)))
    assert torch.equal(out, vec(-1.5, -1))
    # one batch: -epsilon times its own honest gradient: -2 * [1, -4] = [-2, 8]
    shard = Shard()
    out = attacks.build("ipm", epsilon=2.0, estimate_batches=1)(ctx_for(shard, vec(1, -4)))
    assert shard.draws == []  # nothing sampled
    assert torch.equal(out, vec(-2, 8))
    # worker momentum: -epsilon times its own momentum, whatever the sampled gradients
    shard = Shard(one(3, 2), one(5, 4))
    ctx = ctx_for(shard, vec(4, 8), batch=one(1, 0), worker_momentum=0.9)
    assert torch.equal(attacks.build("ipm", epsilon=0.25, estimate_batches=3)(ctx), vec(-1, -2))


# -- label flip -------------------------------------------------------------------------------


def test_label_flip_uses_labels_9_minus_y():
    # a gradient callable that exposes the labels it was given: 9 - [0, 3, 9, 4] = [9, 6, 0, 5]
    x, y = torch.zeros(4, 1), torch.tensor([0, 3, 9, 4])
    ctx = AttackContext(0, vec(0), batch=(x, y), gradient=lambda x, y: y.to(torch.float32))
    assert torch.equal(attacks.build("label_flip")(ctx), vec(9, 6, 0, 5))
    # on a real model it is exactly the cross-entropy gradient of the flipped batch
    rep = Replica("logreg", 0, 0.1, 0.0)
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4, 5, 8, 9])
    grad = lambda a, b: rep.gradient(a, b)[0]  # noqa: E731
    out = attacks.build("label_flip")(AttackContext(0, grad(x, y), batch=(x, y), gradient=grad))
    assert torch.equal(out, grad(x, torch.tensor([9, 8, 7, 6, 5, 4, 1, 0])))
    assert out.shape == (rep.d,) and out.dtype == torch.float32
    assert attacks.build("label_flip").output_is_gradient


def test_label_flip_rejects_labels_out_of_range():
    ctx = AttackContext(0, vec(0), batch=(torch.zeros(1, 1), torch.tensor([10])),
                        gradient=lambda x, y: vec(0))
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        attacks.build("label_flip")(ctx)


# -- mimic ------------------------------------------------------------------------------------


def test_mimic_sends_the_gradient_of_the_target_class():
    # current batch: y = [2, 5, 2] with x rows [1,0], [10,10], [2,0]; one sampled batch
    # y = [2, 2, 1] with rows [0,100], [0,3], [7,7]. Examples of class 2 in order:
    # [1,0], [2,0], [0,100], [0,3]; the first B = 3 of them: gradient = sum = [3, 100].
    batch = (torch.tensor([[1., 0], [10, 10], [2, 0]]), torch.tensor([2, 5, 2]))
    shard = Shard((torch.tensor([[0., 100], [0, 3], [7, 7]]), torch.tensor([2, 2, 1])))
    out = attacks.build("mimic", target_class=2, estimate_batches=2)(
        ctx_for(shard, vec(0, 0), batch=batch))
    assert torch.equal(out, vec(3, 100))
    # no example of the class in the pool: the honest gradient of the current batch
    # [1,0] + [10,10] + [2,0] = [13, 10]
    shard = Shard((torch.tensor([[0., 100]]), torch.tensor([1])))
    out = attacks.build("mimic", target_class=7, estimate_batches=2)(
        ctx_for(shard, vec(0, 0), batch=batch))
    assert torch.equal(out, vec(13, 10))


def test_mimic_target_class_from_seed():
    ctx = AttackContext(0, vec(0), seed=13)
    assert attacks.build("mimic").target_for(ctx) == 3                    # own seed 13 mod 10
    assert attacks.build("mimic", collude_seed=27).target_for(ctx) == 7   # 27 mod 10
    assert attacks.build("mimic", target_class=4, collude_seed=27).target_for(ctx) == 4


def test_attacks_do_not_modify_their_inputs():
    g = vec(1, 2)
    batch = one(1, 2)
    for name in attacks.names():
        shard = Shard(*[one(3, 4)] * 6)
        # the optimised attacks run the rule (here the mean) on 7 stand-ins and 3 copies
        ctx = ctx_for(shard, g, batch=batch, n=10, f=3, aggregate=lambda rows: rows.mean(0))
        out = attacks.build(name)(ctx)
        assert out.shape == (2,) and out.dtype == torch.float32, name
        assert torch.equal(g, vec(1, 2)) and torch.equal(batch[0], vec(1, 2).reshape(1, 2))
    assert math.isnan(float(attacks.build("nan")(AttackContext(0, g))[0]))


# -- omniscient variants (simulation only) ----------------------------------------------------


def test_omniscient_alie_uses_the_true_honest_statistics():
    # honest rows (3, 2): column 0 = 1, 2, 3 -> mean 2, std (Bessel) 1;
    #                     column 1 = 0, 0, 6 -> mean 2, std sqrt(((4 + 4 + 16) / 2)) = sqrt(12)
    rows = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 6.0]])
    atk = attacks.build("alie", omniscient=True)
    assert atk.omniscient and atk.needs == {"honest_gradients", "n", "f"}
    ctx = AttackContext(0, vec(9.0, 9.0), n=10, f=3, honest_gradients=rows)
    z = NormalDist().inv_cdf(0.7)   # n = 10, f = 3: s = 3, z = Phi^-1(7/10)
    out = atk(ctx)
    assert torch.allclose(out, torch.tensor([2.0 - z, 2.0 - z * math.sqrt(12.0)]))
    assert not attacks.build("alie").omniscient
    with pytest.raises(ValueError, match="'alie' needs honest_gradients"):
        atk(AttackContext(0, vec(1.0, 1.0), n=10, f=3))
    with pytest.raises(ValueError, match=r"at least 2 honest vectors \(h, d\) in round 4"):
        atk(AttackContext(4, vec(1.0, 1.0), n=10, f=3, honest_gradients=rows[:1]))


def test_omniscient_ipm_is_minus_epsilon_times_the_true_mean():
    rows = torch.tensor([[1.0, -2.0], [3.0, 4.0]])   # mean (2, 1)
    atk = attacks.build("ipm", epsilon=0.5, omniscient=True)
    assert atk.needs == {"honest_gradients"}
    assert torch.equal(atk(AttackContext(0, vec(0.0, 0.0), honest_gradients=rows)),
                       torch.tensor([-1.0, -0.5]))
