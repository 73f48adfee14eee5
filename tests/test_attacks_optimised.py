"""Min-Max, Min-Sum, Fang, optimised ALIE and IPM: hand-traced searches on small inputs, the
stand-in honest vectors of the TCP variants, the rule evaluation the attackers get, and runs
end to end (simulation, and over TCP bit-identical to the simulation)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from byzps import aggregators, attacks
from byzps.attacks import AttackContext
from byzps.attacks._estimate import standin_rows
from byzps.attacks._search import line_maximize
from byzps.attacks.base import round_generator
from byzps.attacks.minmax import perturbation_vector
from byzps.job import Job, parse_config
from byzps.launcher import final_digest, launch
from byzps.robust import RobustPipeline
from byzps.simulate import Simulation, simulate

from conftest import write_config


def rows(*r):
    return torch.tensor(r, dtype=torch.float32)


def omni(honest, **kw):
    return AttackContext(0, honest[0], honest_gradients=honest, **kw)


def pipeline(name, **params):
    return RobustPipeline([], aggregators.build(name, **params))


# ============================================================================== Min-Max/Min-Sum


def test_minmax_and_minsum_hand_traced_search():
    # honest 0, 0, 3: mean 1, unit perturbation -1, m = 1 - gamma. Largest honest distance 3:
    # Min-Max needs 2 + gamma <= 3 (gamma <= 1); largest honest sum of squares 18: Min-Sum needs
    # 2 (1 - gamma)^2 + (2 + gamma)^2 = 6 + 3 gamma^2 <= 18 (gamma <= 2).
    honest = rows([0.0], [0.0], [3.0])
    # tol 0.1, gamma_init 10: Min-Max tries 10, 5, 2.5, 1.25 (fail), 0.625, 0.9375 (pass),
    # 1.09375 (fail) and stops at 1.015625 (within 0.1 of 0.9375)
    mm = attacks.build("minmax", omniscient=True, tol=0.1)
    assert mm(omni(honest)).tolist() == [1.0 - 0.9375]
    # Min-Sum: 10, 5, 2.5 (fail), 1.25, 1.875 (pass), 2.1875, 2.03125 (fail), stops at 1.953125
    ms = attacks.build("minsum", omniscient=True, tol=0.1)
    assert ms(omni(honest)).tolist() == [1.0 - 1.875]
    # the default tol 1e-5 converges to the bounds from below
    g = 1.0 - attacks.build("minmax", omniscient=True)(omni(honest)).item()
    assert 1.0 - 2e-5 <= g <= 1.0
    g = 1.0 - attacks.build("minsum", omniscient=True)(omni(honest)).item()
    assert 2.0 - 2e-5 <= g <= 2.0


def test_minmax_gamma_zero_when_nothing_passes():
    # identical honest vectors: every distance bound is 0, any gamma > 0 fails
    honest = rows([1.0, 2.0], [1.0, 2.0])
    assert attacks.build("minmax", omniscient=True)(omni(honest)).tolist() == [1.0, 2.0]


def test_perturbations():
    honest = rows([1.0, -2.0], [3.0, -2.0])   # mean (2, -2), std (sqrt 2, 0)
    s = 1 / math.sqrt(2.0)
    torch.testing.assert_close(perturbation_vector("unit", honest), rows(-s, s))
    assert perturbation_vector("sign", honest).tolist() == [-1.0, 1.0]
    torch.testing.assert_close(perturbation_vector("std", honest), rows(-math.sqrt(2.0), 0.0))
    assert perturbation_vector("unit", rows([1.0], [-1.0])).tolist() == [0.0]
    # the std perturbation moves the mean along -sigma (2-D, Min-Max bound = 2)
    out = attacks.build("minmax", perturbation="std", omniscient=True)(omni(honest))
    # m = (2 - g sqrt 2, -2); farthest honest row at distance 1 + g sqrt 2 <= 2
    assert out[1].item() == -2.0
    assert 2.0 - out[0].item() == pytest.approx(1.0, abs=1e-4)


# ============================================================================== Fang


def test_fang_full_knowledge_intervals_and_draws():
    # column 0: mean 2 > 0 -> send below the minimum 1 > 0: U[1/2, 1]
    # column 1: mean -3 <= 0 -> send above the maximum -1 <= 0: U[-1, -1/2]
    # column 2: mean 1 > 0, minimum -2 <= 0: U[-4, -2]; column 3: mean -1, max 4 > 0: U[4, 8]
    honest = rows([1.0, -1.0, 3.0, -6.0], [3.0, -5.0, -2.0, 4.0], [2.0, -3.0, 2.0, -1.0])
    atk = attacks.build("fang", omniscient=True)
    low, high = atk.interval(honest)
    assert low.tolist() == [0.5, -1.0, -4.0, 4.0] and high.tolist() == [1.0, -0.5, -2.0, 8.0]
    out = atk(omni(honest, seed=5))
    u = torch.rand(4, generator=round_generator(5, 0, "fang"))
    assert torch.equal(out, low + u * (high - low))
    # each worker draws its own values; a shared collude_seed makes them send the same
    assert not torch.equal(out, atk(omni(honest, seed=6)))
    shared = attacks.build("fang", omniscient=True, collude_seed=3)
    assert torch.equal(shared(omni(honest, seed=5)), shared(omni(honest, seed=6)))


def test_fang_partial_knowledge_from_the_own_shard():
    # stand-ins: the own minibatch gradient (1, -1) and one sampled minibatch (3, -5):
    # mu = (2, -3), sigma = (sqrt 2, sqrt 8); column 0 goes to [mu - 4s, mu - 3s], column 1 to
    # [mu + 3s, mu + 4s]
    batches = [(rows([3.0, -5.0]), torch.tensor([0]))]
    ctx = AttackContext(0, rows(1.0, -1.0), batch=(rows([1.0, -1.0]), torch.tensor([0])),
                        gradient=lambda x, y: x.sum(0), sample_batch=lambda g: batches.pop(0))
    atk = attacks.build("fang", estimate_batches=2)
    low, high = atk.interval(atk.honest(ctx))
    s0, s1 = math.sqrt(2.0), math.sqrt(8.0)
    torch.testing.assert_close(low, rows(2 - 4 * s0, -3 + 3 * s1))
    torch.testing.assert_close(high, rows(2 - 3 * s0, -3 + 4 * s1))


def test_standin_rows_with_worker_momentum():
    # the centre is the worker's momentum (10), the spread scaled by sqrt((1-b)/(1+b))
    ctx = AttackContext(0, rows(10.0), worker_momentum=0.5)
    out = standin_rows(ctx, rows([1.0], [3.0]))
    s = math.sqrt(0.5 / 1.5)
    torch.testing.assert_close(out, rows([10.0 - s], [10.0 + s]))
    assert torch.equal(standin_rows(AttackContext(0, rows(0.0)), rows([1.0], [3.0])),
                       rows([1.0], [3.0]))


# ============================================================================== line search


def test_line_search_hand_traced():
    # y = -(tau - 25)^2 from 0, delta 10: 0, 10 (better), 30 (better), 70 (worse: delta 32);
    # contraction proposes 30 + 32, 30 + 25.6, ... (all worse): the search keeps 30 and
    # never looks below its best (the ByzFL search is one-sided)
    seen = []

    def y(tau):
        seen.append(tau)
        return -(tau - 25.0) ** 2

    assert line_maximize(y, 20, 0.0, 10.0, 0.8) == 30.0
    assert len(seen) == 20 and seen[:4] == [0.0, 10.0, 30.0, 70.0]
    assert seen[4] == 62.0 and seen[5] == pytest.approx(30.0 + 25.6)


@pytest.mark.parametrize("name", ["opt_alie", "opt_ipm"])
def test_optimised_attacks_on_a_diverged_model_send_start_without_a_search(name):
    # honest vectors holding NaN (the model diverged under the mean): the pipeline has nothing
    # to aggregate, so no search runs (it used to raise and crash the grid cell); the vector
    # at tau = start is sent and the PS drops it as non-finite
    honest = rows([1.0, float("nan")], [2.0, float("nan")], [3.0, float("nan")])
    ctx = omni(honest, n=4, f=1, aggregate=pipeline("mean"))
    out = attacks.build(name, omniscient=True)(ctx)
    assert out.shape == (2,) and not bool(torch.isfinite(out).all())


def test_opt_alie_against_trimmed_mean_hand():
    # honest 1, 2, 3 (mu 2, sigma 1) + 1 Byzantine copy, trimmed mean f = 1: the output is
    # 2 + min(tau, 1) / 2 for tau >= 0. tau = 0 -> 0, tau = 10 -> 0.5 (better), 30 -> 0.5 (not
    # better), then no contraction proposal is strictly better: tau = 10, sends 2 + 10 = 12
    ctx = omni(rows([1.0], [2.0], [3.0]), n=4, f=1, aggregate=pipeline("trimmed_mean", f=1))
    assert attacks.build("opt_alie", omniscient=True)(ctx).tolist() == [12.0]


def test_opt_ipm_against_the_mean_hand():
    # against the mean the deviation (2 tau + 2) / 4 grows with tau: all 19 proposals after the
    # start are expansions, tau = 10 (2^19 - 1)
    ctx = omni(rows([1.0], [2.0], [3.0]), n=4, f=1, aggregate=pipeline("mean"))
    tau = 10.0 * (2**19 - 1)
    assert attacks.build("opt_ipm", omniscient=True)(ctx).tolist() == [-2.0 * tau]
    # with 2 Byzantine workers (n = 5) the copies double, the same monotone search
    ctx = omni(rows([1.0], [2.0], [3.0]), n=5, f=2, aggregate=pipeline("mean"))
    assert attacks.build("opt_ipm", omniscient=True, evals=3)(ctx).tolist() == [-2.0 * 30.0]


def test_optimised_attacks_refuse_bad_parameters():
    with pytest.raises(ValueError, match="ratio must be strictly between 0.5 and 1"):
        attacks.build("opt_alie", ratio=0.5)
    with pytest.raises(ValueError, match="delta must be non-zero"):
        attacks.build("opt_ipm", delta=0.0)
    with pytest.raises(ValueError, match="evals must be >= 1"):
        attacks.build("opt_ipm", evals=0)
    with pytest.raises(ValueError, match="perturbation must be one of unit, std, sign"):
        attacks.build("minmax", perturbation="inverse")
    with pytest.raises(ValueError, match="b must be > 1"):
        attacks.build("fang", b=1.0)
    with pytest.raises(ValueError, match="estimate_batches must be in 2..64"):
        attacks.build("minsum", estimate_batches=1)
    with pytest.raises(ValueError, match="n - f = 1 minibatches"):
        attacks.build("opt_alie").check(4, 3)
    assert attacks.build("opt_alie", omniscient=True).needs == {"honest_gradients",
                                                                 "aggregate", "n", "f"}


# ============================================================================== the rule they run


def test_worker_runs_the_pipeline_without_changing_its_state(base_config):
    base_config["aggregation"] = {"method": "centered_clipping", "params": {"tau": 1.0}}
    w = Job(parse_config(base_config), "./data").worker_core(3)
    x = torch.randn(4, w.replica.d)
    fresh = w.evaluate_pipeline(x)
    assert torch.equal(w.evaluate_pipeline(x), fresh)      # the centre is not carried over
    centre = torch.randn(w.replica.d)
    w.pipeline_state = {"pre": [], "aggregator": {"center": centre}}
    ref = aggregators.build("centered_clipping", tau=1.0, f=1)
    ref.load_state_dict({"center": centre})
    expected = ref(x)
    assert torch.equal(w.evaluate_pipeline(x), expected)
    assert torch.equal(w.evaluate_pipeline(x), expected)   # from the same state again


def test_simulated_attackers_leave_the_ps_rule_state_alone(base_config):
    # dnc counts its calls; the omniscient optimised IPM runs the rule 20 times per round on a
    # copy of the PS's state: the PS's own counter still counts the 2 rounds only
    base_config["workers"] = [{"id": i, "type": "honest"} for i in range(4)] + [
        {"id": 4, "type": "byzantine", "attack": "opt_ipm",
         "attack_params": {"omniscient": True}}]
    base_config["aggregation"] = {"method": "dnc", "f": 1, "params": {"b": 1000, "niters": 2}}
    base_config["training"]["rounds"] = 2
    sim = Simulation(parse_config(base_config), "./data")
    sim.run()
    assert sim.robust.state_dict() == {"pre": [], "aggregator": {"calls": 2}}
    assert sim.workers[4].pipeline_state == {"pre": [], "aggregator": {"calls": 1}}


@pytest.mark.parametrize("attack, rule", [
    ("minmax", "dnc"), ("minsum", "caf"), ("fang", "smea"), ("opt_alie", "monna"),
    ("opt_ipm", "cge")])
def test_each_new_attack_and_rule_runs_in_simulation(base_config, attack, rule):
    base_config["workers"] = [{"id": i, "type": "honest"} for i in range(5)] + [
        {"id": i, "type": "byzantine", "attack": attack, "attack_params": {"omniscient": True}}
        for i in (5, 6)]
    base_config["aggregation"] = {"method": rule, "f": 2}
    base_config["training"]["rounds"] = 2
    res = simulate(parse_config(base_config), "./data")
    assert res.rounds == 2 and 0.0 <= res.test_accuracy <= 1.0


def test_tcp_attackers_estimate_from_their_shards_bit_identical_to_simulation(tmp_path,
                                                                              base_config):
    """The non-omniscient Fang and optimised ALIE run in real worker processes over 127.0.0.1
    (stand-in vectors from their own shards, the rule from its initial state) and end with
    the same PS digest as the simulation of the same config."""
    base_config["workers"] = [{"id": i, "type": "honest"} for i in range(3)] + [
        {"id": 3, "type": "byzantine", "attack": "fang"},
        {"id": 4, "type": "byzantine", "attack": "opt_alie",
         "attack_params": {"estimate_batches": 3, "evals": 6}}]
    base_config["aggregation"] = {"method": "trimmed_mean", "f": 2}
    base_config["training"]["rounds"] = 2
    path = write_config(tmp_path / "c.yaml", base_config)
    out = io.StringIO()
    summary = launch(path, tmp_path / "run", data_root="./data", out=out, poll=0.2)
    assert summary.ok, out.getvalue() + (tmp_path / "run" / "server.log").read_text()
    assert "attack fang" in (tmp_path / "run" / "worker-3.log").read_text()
    result = simulate(parse_config(base_config), "./data")
    assert result.digest == final_digest(tmp_path / "run")


def test_omniscient_search_runs_once_per_round_for_all_attackers():
    calls = []

    def mean(rows):
        calls.append(1)
        return rows.mean(dim=0)

    honest = rows([1.0], [2.0], [3.0])
    atk1, atk2 = (attacks.build("opt_ipm", omniscient=True, evals=4) for _ in range(2))
    out1 = atk1(omni(honest, n=5, f=2, aggregate=mean))
    out2 = atk2(omni(honest, n=5, f=2, aggregate=mean))
    assert torch.equal(out1, out2) and len(calls) == 4
    # another round, or another tensor of the same values, searches again
    atk2(AttackContext(1, honest[0], honest_gradients=honest, n=5, f=2, aggregate=mean))
    atk2(omni(honest.clone(), n=5, f=2, aggregate=mean))
    assert len(calls) == 12
