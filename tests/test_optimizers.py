"""byzps.optimizers: the flat step equals torch.optim bit for bit, hand-computed values, state
handling and the learning-rate schedules' closed forms."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from byzps import optimizers as opt
from byzps.optimizers import OptimizerError, OptimizerState


def _torch_run(kind: str, params: dict, theta0: torch.Tensor, grads: list[torch.Tensor],
               lrs: list[float]) -> tuple[torch.Tensor, dict]:
    """theta after torch.optim's single-tensor steps; SGD starts with an explicit zero buffer
    (as byzps.replica.Replica does)."""
    p = torch.nn.Parameter(theta0.clone())
    if kind == "sgd":
        o = torch.optim.SGD([p], lr=lrs[0], foreach=False, **params)
        if params.get("momentum", 0):
            o.state[p]["momentum_buffer"] = torch.zeros_like(theta0)
    else:
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        kw = dict(params)
        if "beta1" in kw:
            kw["betas"] = (kw.pop("beta1"), kw.pop("beta2"))
        o = cls([p], lr=lrs[0], foreach=False, **kw)
    for g, lr in zip(grads, lrs):
        for group in o.param_groups:
            group["lr"] = lr
        p.grad = g.clone()
        o.step()
    return p.detach(), o.state[p]


def _ours(kind: str, params: dict, theta0, grads, lrs):
    o = opt.build_optimizer(kind, **params)
    theta = theta0.clone()
    state = o.init_state(theta.numel())
    for g, lr in zip(grads, lrs):
        before = g.clone()
        o.step(theta, g, state, lr)
        assert torch.equal(g, before), "the step must not modify the aggregate"
    return theta, state


CASES = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("sgd", {"momentum": 0.5, "weight_decay": 5e-4}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    ("adam", {}),
    ("adam", {"weight_decay": 1e-2}),
    ("adam", {"beta1": 0.5, "beta2": 0.9, "eps": 1e-6}),
    ("adamw", {}),
    ("adamw", {"weight_decay": 0.1, "beta1": 0.8, "beta2": 0.99}),
]


@pytest.mark.parametrize("kind,params", CASES)
def test_step_is_bit_identical_to_torch_optim(kind, params):
    """Bit-identical (torch.equal, not a tolerance) to torch.optim with foreach=False over 30
    steps with a changing learning rate, including the optimizer state rows."""
    gen = torch.Generator().manual_seed(1)
    d = 1000
    theta0 = torch.randn(d, generator=gen)
    grads = [torch.randn(d, generator=gen) * (10 ** (k % 5 - 2)) for k in range(30)]
    grads[3][:10] = 0.0
    grads[4][:10] = -0.0
    lrs = [0.1 * (0.97 ** k) for k in range(30)]
    ref, ref_state = _torch_run(kind, params, theta0, grads, lrs)
    ours, state = _ours(kind, params, theta0, grads, lrs)
    assert torch.equal(ours, ref)
    assert state.step == 30
    if kind == "sgd" and params.get("momentum"):
        assert torch.equal(state.rows[0], ref_state["momentum_buffer"])
    if kind.startswith("adam"):
        assert torch.equal(state.rows[0], ref_state["exp_avg"])
        assert torch.equal(state.rows[1], ref_state["exp_avg_sq"])
        assert float(ref_state["step"]) == 30


def test_sgd_equals_todays_replica_step_and_digest():
    """Wiring this module in must leave SGD runs unchanged: the same theta, buffer and digest
    as byzps.replica.Replica after a few steps."""
    from byzps.replica import Replica

    rep = Replica("logreg", seed=3, learning_rate=0.05, momentum=0.9)
    sgd = opt.build_optimizer("sgd", momentum=0.9)
    theta = rep.theta.detach().clone()
    state = sgd.init_state(rep.d)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = torch.randn(rep.d, generator=gen)
        a[:7] = -0.0
        rep.apply(a.clone())
        sgd.step(theta, a, state, 0.05)
    assert torch.equal(theta, rep.theta.detach())
    assert torch.equal(state.rows[0], rep.momentum_buffer())
    h = hashlib.blake2b(digest_size=16)
    h.update(memoryview(theta.numpy()).cast("B"))
    state.digest_update(h, with_step=sgd.HASH_STEP)
    assert h.hexdigest() == rep.digest()


def test_sgd_hand_computed():
    """theta = [1, -2], lr 0.5, momentum 0.5; g1 = [0.5, 0.25], g2 = [1, -1] (exact in binary):
    b1 = g1, theta1 = [0.75, -2.125]; b2 = 0.5 b1 + g2 = [1.25, -0.875],
    theta2 = theta1 - 0.5 b2 = [0.125, -1.6875]."""
    sgd = opt.build_optimizer("sgd", momentum=0.5)
    theta = torch.tensor([1.0, -2.0])
    st_ = sgd.init_state(2)
    sgd.step(theta, torch.tensor([0.5, 0.25]), st_, 0.5)
    assert theta.tolist() == [0.75, -2.125]
    sgd.step(theta, torch.tensor([1.0, -1.0]), st_, 0.5)
    assert st_.rows[0].tolist() == [1.25, -0.875]
    assert theta.tolist() == [0.125, -1.6875]


def test_sgd_nesterov_and_weight_decay_hand_computed():
    """theta = [2], wd 0.25, momentum 0.5, nesterov, lr 0.5, g = [1]:
    g' = 1 + 0.25 * 2 = 1.5; b = 1.5; step direction 1.5 + 0.5 * 1.5 = 2.25;
    theta = 2 - 0.5 * 2.25 = 0.875."""
    sgd = opt.build_optimizer("sgd", momentum=0.5, nesterov=True, weight_decay=0.25)
    theta = torch.tensor([2.0])
    s = sgd.init_state(1)
    sgd.step(theta, torch.tensor([1.0]), s, 0.5)
    assert s.rows[0].tolist() == [1.5]
    assert theta.tolist() == [0.875]


def test_adam_first_step_hand_computed():
    """With eps = 0 the first Adam step is exactly lr * sign(g): m = (1 - b1) g,
    v = (1 - b2) g^2, bias-corrected m / sqrt(v) = g / |g|. beta1 0.5, beta2 0.75, lr 0.25:
    theta [1, 1, 1] - 0.25 * sign([4, -0.5, 2]) = [0.75, 1.25, 0.75]; m = [2, -0.25, 1],
    v = [4, 0.0625, 1]."""
    adam = opt.build_optimizer("adam", beta1=0.5, beta2=0.75, eps=0.0)
    theta = torch.ones(3)
    s = adam.init_state(3)
    adam.step(theta, torch.tensor([4.0, -0.5, 2.0]), s, 0.25)
    assert theta.tolist() == [0.75, 1.25, 0.75]
    assert s.rows[0].tolist() == [2.0, -0.25, 1.0]
    assert s.rows[1].tolist() == [4.0, 0.0625, 1.0]
    assert s.step == 1


def test_adam_second_step_matches_float64_formula_within_one_ulp():
    """Step 2 of Adam against the paper's formula evaluated in float64 (Kingma & Ba 2015,
    Alg. 1): within 1 float32 ulp of the float64 value."""
    b1, b2, lr, eps = 0.9, 0.999, 0.01, 1e-8
    adam = opt.build_optimizer("adam")
    theta = torch.tensor([0.5, -1.5])
    s = adam.init_state(2)
    g1, g2 = [0.3, -2.0], [-0.1, 4.0]
    adam.step(theta, torch.tensor(g1), s, lr)
    adam.step(theta, torch.tensor(g2), s, lr)
    expect = []
    for th, a, b in zip([0.5, -1.5], g1, g2):
        m = v = 0.0
        for t, g in ((1, a), (2, b)):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            th -= lr * (m / (1 - b1 ** t)) / (math.sqrt(v / (1 - b2 ** t)) + eps)
        expect.append(th)
    for got, want in zip(theta.tolist(), expect):
        ulp = math.ulp(float(torch.tensor(want, dtype=torch.float32)))
        ulp32 = ulp * 2 ** 29      # float32 has 29 fewer mantissa bits than float64
        assert abs(got - want) <= ulp32


def test_adamw_decays_before_the_update():
    """AdamW, first step, eps 0: theta = theta * (1 - lr * w) - lr * sign(g).
    theta 2, lr 0.5, w 0.5: 2 * 0.75 - 0.5 = 1.0."""
    adamw = opt.build_optimizer("adamw", weight_decay=0.5, eps=0.0)
    theta = torch.tensor([2.0])
    s = adamw.init_state(1)
    adamw.step(theta, torch.tensor([3.0]), s, 0.5)
    assert theta.tolist() == [1.0]


def test_state_digest_covers_adam_moments_and_step():
    adam = opt.build_optimizer("adam")
    theta = torch.zeros(4)
    s = adam.init_state(4)
    adam.step(theta, torch.ones(4), s, 0.1)

    def digest(state: OptimizerState) -> str:
        h = hashlib.blake2b(digest_size=16)
        state.digest_update(h, with_step=adam.HASH_STEP)
        return h.hexdigest()

    base = digest(s)
    other = s.clone()
    other.step += 1
    assert digest(other) != base
    other = s.clone()
    other.rows[1, 2] = torch.nextafter(other.rows[1, 2], torch.tensor(1.0))
    assert digest(other) != base
    assert digest(s.clone()) == base


def test_resumed_state_continues_bit_exactly():
    """State cloned mid-run (as STATE or a checkpoint carries it) continues to the same bits."""
    adam = opt.build_optimizer("adamw", weight_decay=0.05)
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(50, generator=gen) for _ in range(8)]
    theta = torch.randn(50, generator=gen)
    s = adam.init_state(50)
    for g in grads[:4]:
        adam.step(theta, g, s, 0.01)
    theta_b, s_b = theta.clone(), s.clone()
    for g in grads[4:]:
        adam.step(theta, g, s, 0.01)
        adam.step(theta_b, g, s_b, 0.01)
    assert torch.equal(theta, theta_b) and torch.equal(s.rows, s_b.rows) and s.step == s_b.step


@pytest.mark.parametrize("bad", [
    dict(theta=torch.zeros(3, dtype=torch.float64)),
    dict(theta=torch.zeros(3, 1)),
    dict(grad=torch.zeros(4)),
    dict(rows=torch.zeros(1, 3)),
    dict(lr=float("nan")),
    dict(lr=-0.1),
])
def test_step_refuses_bad_inputs(bad):
    adam = opt.build_optimizer("adam")
    theta = bad.get("theta", torch.zeros(3))
    grad = bad.get("grad", torch.zeros(3))
    state = OptimizerState(bad.get("rows", torch.zeros(2, 3)), 0)
    with pytest.raises(OptimizerError):
        adam.step(theta, grad, state, bad.get("lr", 0.1))


def test_registry_lists_defaults():
    assert opt.optimizer_names() == ["adam", "adamw", "sgd"]
    assert opt.optimizer_params("adamw") == {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                                             "weight_decay": 0.01}
    assert opt.optimizer_params("sgd") == {"momentum": 0.0, "nesterov": False,
                                           "weight_decay": 0.0}
    assert opt.schedule_names() == ["constant", "cosine", "multistep", "step"]
    assert opt.schedule_params("multistep") == {"milestones": (), "gamma": 0.1}


# --------------------------------------------------------------------------- schedules


def test_schedules_hand_computed():
    step = opt.build_schedule("step", step_size=3, gamma=0.5)
    assert [step.lr(0.8, r, 10) for r in range(7)] == [0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.2]
    ms = opt.build_schedule("multistep", milestones=[2, 5], gamma=0.25)
    assert [ms.lr(1.0, r, 10) for r in range(7)] == [1.0, 1.0, 0.25, 0.25, 0.25, 0.0625, 0.0625]
    cos = opt.build_schedule("cosine")
    # T = 4 rounds: r = 0, 2 give base and base / 2 exactly; r = 4 (and past) eta_min = 0
    assert cos.lr(0.5, 0, 4) == 0.5
    assert cos.lr(0.5, 2, 4) == pytest.approx(0.25, abs=1e-17)
    assert cos.lr(0.5, 4, 4) == 0.0 and cos.lr(0.5, 9, 4) == 0.0
    assert opt.build_schedule("cosine", eta_min=0.1, t_max=2).lr(0.3, 2, 100) == \
        pytest.approx(0.1, abs=1e-17)
    assert opt.build_schedule("constant").lr(0.05, 1234, 10) == 0.05


def _torch_closed_form(sched_cls, kwargs, base_lr, r):
    p = torch.nn.Parameter(torch.zeros(1))
    o = torch.optim.SGD([p], lr=base_lr)
    s = sched_cls(o, **kwargs)
    s.last_epoch = r
    return s._get_closed_form_lr()[0]


@pytest.mark.parametrize("name,params,cls,kw", [
    ("step", {"step_size": 7, "gamma": 0.3}, torch.optim.lr_scheduler.StepLR,
     {"step_size": 7, "gamma": 0.3}),
    ("multistep", {"milestones": [10, 25, 40], "gamma": 0.1},
     torch.optim.lr_scheduler.MultiStepLR, {"milestones": [10, 25, 40], "gamma": 0.1}),
    ("cosine", {"eta_min": 1e-4}, torch.optim.lr_scheduler.CosineAnnealingLR,
     {"T_max": 50, "eta_min": 1e-4}),
])
def test_schedules_equal_torch_closed_form(name, params, cls, kw):
    """Bit-equal to torch's closed forms for every round of a 50-round run, and within 1e-12
    relative of torch's recursive (step-by-step) form."""
    ours = opt.build_schedule(name, **params)
    base = 0.1
    p = torch.nn.Parameter(torch.zeros(1))
    o = torch.optim.SGD([p], lr=base)
    rec = cls(o, **kw)
    for r in range(50):
        assert ours.lr(base, r, 50) == _torch_closed_form(cls, kw, base, r)
        assert ours.lr(base, r, 50) == pytest.approx(o.param_groups[0]["lr"], rel=1e-12)
        o.step()
        rec.step()


@settings(max_examples=60, deadline=None)
@given(base=st.floats(1e-5, 10.0), r=st.integers(0, 10_000), rounds=st.integers(1, 10_000),
       eta=st.floats(0.0, 1e-5))
def test_cosine_stays_between_eta_min_and_base(base, r, rounds, eta):
    lr = opt.build_schedule("cosine", eta_min=eta).lr(base, r, rounds)
    assert eta - 1e-15 <= lr <= base + 1e-15


@settings(max_examples=60, deadline=None)
@given(r=st.integers(0, 500), size=st.integers(1, 50))
def test_step_schedule_never_increases(r, size):
    s = opt.build_schedule("step", step_size=size, gamma=0.5)
    assert s.lr(1.0, r + 1, 1000) <= s.lr(1.0, r, 1000)


@pytest.mark.parametrize("build,name,params,field", [
    ("optimizer", "sgd", {"momentum": 1.0}, "momentum"),
    ("optimizer", "sgd", {"nesterov": True}, "nesterov"),
    ("optimizer", "sgd", {"weight_decay": -1.0}, "weight_decay"),
    ("optimizer", "adam", {"beta2": 1.0}, "beta2"),
    ("optimizer", "adam", {"eps": float("inf")}, "eps"),
    ("optimizer", "adam", {"momentum": 0.9}, "optimizer adam: unknown parameter"),
    ("optimizer", "rmsprop", {}, "unknown optimizer"),
    ("schedule", "step", {"step_size": 0}, "step_size"),
    ("schedule", "step", {"gamma": 1.5}, "gamma"),
    ("schedule", "multistep", {"milestones": [5, 5]}, "milestones"),
    ("schedule", "multistep", {"milestones": []}, "milestones"),
    ("schedule", "cosine", {"t_max": 0}, "t_max"),
    ("schedule", "cosine", {"gamma": 0.1}, "lr schedule cosine: unknown parameter"),
    ("schedule", "linear", {}, "unknown lr schedule"),
])
def test_bad_parameters_name_the_field(build, name, params, field):
    with pytest.raises(OptimizerError, match=field):
        getattr(opt, f"build_{build}")(name, **params)


def test_schedule_refuses_bad_round():
    with pytest.raises(OptimizerError, match="round"):
        opt.build_schedule("constant").lr(0.1, -1, 10)
    with pytest.raises(OptimizerError, match="rounds"):
        opt.build_schedule("cosine").lr(0.1, 0, 0)
