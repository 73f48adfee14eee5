"""The sans-IO round logic, driven without sockets."""

from __future__ import annotations

import pytest
import torch

from byzps.core.rounds import (
    REJECT_DUPLICATE,
    REJECT_NON_FINITE,
    REJECT_WORKER_ID,
    Broadcast,
    Drop,
    Finished,
    RoundClosed,
    RoundFailed,
    Send,
    ServerRounds,
    WorkerRounds,
)
from byzps.net.wire import Gradient, Resync, RoundStart, State, Stop, Update
from byzps.replica import Replica


def replica(momentum=0.9):
    return Replica("logreg", seed=0, learning_rate=0.1, momentum=momentum)


def mean(rows):
    return rows.mean(0)


def machine(n=3, rounds=2, quorum=2, **kw):
    return ServerRounds(list(range(n)), replica(), mean, rounds, quorum, **kw)


def grad(m, wid, value, r=None):
    return Gradient(m.round if r is None else r, wid, torch.full((m.replica.d,), float(value)))


def test_connect_sends_state_and_begin_broadcasts_round():
    m = machine()
    acts = m.connect(0)
    assert len(acts) == 1 and isinstance(acts[0], Send) and isinstance(acts[0].message, State)
    assert torch.equal(acts[0].message.tensor[0], m.replica.theta.detach())
    for w in (1, 2):
        m.connect(w)
    (b,) = m.begin_round()
    assert isinstance(b, Broadcast) and b.message == RoundStart(0, m.replica.digest())


def test_round_closes_when_all_live_answered_and_applies_the_aggregate():
    m = machine()
    for w in range(3):
        m.connect(w)
    m.begin_round()
    theta0 = m.replica.theta.detach().clone()
    assert m.on_message(0, grad(m, 0, 1.0)) == []
    assert m.on_message(1, grad(m, 1, 2.0)) == []
    acts = m.on_message(2, grad(m, 2, 6.0))
    upd, closed = acts
    assert isinstance(upd, Broadcast) and isinstance(upd.message, Update)
    # mean of 1, 2, 6 = 3 in every coordinate; first SGD step: theta - 0.1 * 3
    assert torch.allclose(upd.message.tensor, torch.full((m.replica.d,), 3.0))
    assert torch.allclose(m.replica.theta.detach(), theta0 - 0.3)
    assert isinstance(closed, RoundClosed) and closed.accepted == (0, 1, 2)
    assert m.round == 1 and m.current is None


def test_exclusions_nonfinite_impersonation_duplicate_stale():
    m = machine(n=4, quorum=1)
    for w in range(4):
        m.connect(w)
    m.begin_round()
    bad = torch.zeros(m.replica.d)
    bad[3] = float("nan")
    assert m.on_message(0, Gradient(0, 0, bad)) == []
    assert m.on_message(1, grad(m, 2, 1.0)) == []           # claims to be worker 2
    assert m.on_message(2, grad(m, 2, 1.0, r=5)) == []      # stale: ignored, not answered
    assert m.on_message(2, grad(m, 2, 1.0)) == []
    assert m.on_message(2, grad(m, 2, 1.0)) == []           # duplicate: both dropped
    acts = m.on_message(3, grad(m, 3, 4.0))
    closed = next(a for a in acts if isinstance(a, RoundClosed))
    assert closed.accepted == (3,)
    assert closed.rejected == {0: REJECT_NON_FINITE, 1: REJECT_WORKER_ID, 2: REJECT_DUPLICATE}
    assert (REJECT_NON_FINITE, REJECT_WORKER_ID, REJECT_DUPLICATE) == (
        "non-finite values (NaN or Inf)", "header names another worker",
        "duplicate gradient in one round")


def test_deadline_with_quorum_closes_without_quorum_fails():
    m = machine(n=3, quorum=2)
    for w in range(3):
        m.connect(w)
    m.begin_round()
    m.on_message(0, grad(m, 0, 1.0))
    (failed,) = m.on_deadline()
    assert isinstance(failed, RoundFailed) and "quorum is 2" in failed.reason
    m.on_message(1, grad(m, 1, 3.0))
    acts = m.on_deadline()
    closed = next(a for a in acts if isinstance(a, RoundClosed))
    assert closed.accepted == (0, 1) and closed.missing == (2,)


def test_disconnect_of_the_last_straggler_closes_the_round():
    m = machine(n=3, quorum=2)
    for w in range(3):
        m.connect(w)
    m.begin_round()
    m.on_message(0, grad(m, 0, 1.0))
    m.on_message(1, grad(m, 1, 1.0))
    acts = m.disconnect(2)
    assert any(isinstance(a, RoundClosed) for a in acts)


def test_reconnect_mid_round_gets_state_and_the_open_round():
    m = machine(rounds=3)
    for w in range(3):
        m.connect(w)
    m.begin_round()
    for w in range(3):
        m.on_message(w, grad(m, w, 1.0))
    m.begin_round()                                  # model version 1
    m.disconnect(1)
    acts = m.connect(1)
    assert [type(a.message) for a in acts] == [State, RoundStart]
    assert acts[0].message.round == 1 and acts[1].message.round == 1
    with pytest.raises(ValueError, match="already connected"):
        m.connect(1)
    with pytest.raises(ValueError, match="unknown worker id 9"):
        m.connect(9)


def test_aggregator_refusal_and_last_round_finishes():
    def picky(rows):
        raise ValueError("needs more rows")
    m = ServerRounds([0], replica(), picky, rounds=1, quorum=1)
    m.connect(0)
    m.begin_round()
    (failed,) = m.on_message(0, grad(m, 0, 1.0))
    assert isinstance(failed, RoundFailed) and "needs more rows" in failed.reason
    m = ServerRounds([0], replica(), mean, rounds=1, quorum=1)
    m.connect(0)
    m.begin_round()
    acts = m.on_message(0, grad(m, 0, 1.0))
    assert isinstance(acts[-1], Finished) and isinstance(acts[-2].message, Stop)
    assert m.finished


def test_server_and_workers_stay_bit_identical_over_rounds():
    """Wire the two machines together in memory: replicas must agree bit for bit."""
    m = machine(n=2, rounds=3, quorum=2)
    gens = {w: torch.Generator().manual_seed(w) for w in range(2)}
    workers = {w: WorkerRounds(w, replica(), lambda r, w=w: (
        torch.randn(m.replica.d, generator=gens[w]), 0.0)) for w in range(2)}
    inbox = {w: [] for w in range(2)}

    def deliver(actions):
        for a in actions:
            if isinstance(a, Send):
                inbox[a.worker_id].append(a.message)
            elif isinstance(a, Broadcast):
                for w in inbox:
                    inbox[w].append(a.message)

    for w in range(2):
        deliver(m.connect(w))
    while not m.finished:
        deliver(m.begin_round())
        while any(inbox.values()):
            for w in range(2):
                while inbox[w]:
                    for reply in workers[w].on_message(inbox[w].pop(0)):
                        deliver(m.on_message(w, reply))
    for w in range(2):
        assert workers[w].stopped is not None and workers[w].rounds_done == 3
        assert workers[w].replica.digest() == m.replica.digest()


def test_worker_detects_drift_and_asks_for_resync():
    w = WorkerRounds(0, replica(), lambda r: (torch.zeros(7850), 0.0))
    # before its STATE a worker ignores ROUND and UPDATE (it has no model to use them on)
    assert w.on_message(RoundStart(0, "0" * 32)) == []
    assert w.on_message(Update(0, torch.zeros(7850))) == [] and w.rounds_done == 0
    w.on_message(State(0, replica().state()))
    assert w.on_message(RoundStart(0, "f" * 32)) == [Resync(0)]
    assert not w.synced and w.on_message(Update(0, torch.zeros(7850))) == []
    m = machine(n=1, rounds=3, quorum=1)
    m.connect(0)
    m.begin_round()
    m.on_message(0, grad(m, 0, 1.0))               # version 1: the drift shows here
    m.begin_round()
    acts = m.on_message(0, Resync(1))
    assert [type(a.message) for a in acts] == [State, RoundStart]
    assert acts[0].message.round == 1 and m.states_refused == {0: 0}


def test_failure_says_who_is_missing_and_flags_divergence():
    m = machine(n=3, quorum=2)
    for w in range(3):
        m.connect(w)
    m.begin_round()
    nan = torch.full((m.replica.d,), float("nan"))
    m.on_message(0, Gradient(0, 0, nan))
    m.on_message(1, Gradient(0, 1, nan))
    (failed,) = m.on_deadline()
    assert failed.missing == (2,)
    m.on_message(2, Gradient(0, 2, nan))
    (failed,) = m.on_deadline()
    assert failed.missing == () and "model has probably diverged" in failed.reason


def test_all_configured_workers_answered_without_quorum_fails_at_once():
    m = machine(n=2, quorum=2)
    for w in range(2):
        m.connect(w)
    m.begin_round()
    nan = torch.full((m.replica.d,), float("nan"))
    assert m.on_message(0, Gradient(0, 0, nan)) == []
    (failed,) = m.on_message(1, Gradient(0, 1, nan))
    assert isinstance(failed, RoundFailed) and failed.missing == ()


def test_gradients_received_in_place_are_used_without_copies_and_rows_compacted():
    m = machine(n=3, quorum=2)
    for w in range(3):
        m.connect(w)
    m.begin_round()
    row0 = m.receive_buffer(0, 0)
    assert row0.data_ptr() == m.buffer[0].data_ptr() and m.receive_buffer(1, 5) is None
    row0.fill_(1.0)
    assert m.on_message(0, Gradient(0, 0, row0)) == []
    assert m.receive_buffer(0, 0) is None          # answered: a repeat goes elsewhere
    row2 = m.receive_buffer(2, 0)
    row2.fill_(5.0)
    m.on_message(2, Gradient(0, 2, row2))
    upd, closed = m.on_deadline()[:2]              # worker 1 missing: rows 0 and 2 compacted
    assert torch.equal(upd.message.tensor, torch.full((m.replica.d,), 3.0))
    assert upd.message.tensor.untyped_storage().data_ptr() != \
        m.buffer.untyped_storage().data_ptr()
    assert closed.accepted == (0, 2) and closed.missing == (1,)
    assert closed.distances == pytest.approx({0: 2 * m.replica.d ** 0.5,
                                              2: 2 * m.replica.d ** 0.5})
    assert closed.seconds_validate >= 0.0
    assert m.receive_buffer(0, 0) is None          # round 0 is over


def test_aggregator_refusal_after_compaction_restores_the_rows():
    def needs_three(rows):
        if len(rows) < 3:
            raise ValueError("needs 3 rows")
        return rows.mean(0)
    m = ServerRounds([0, 1, 2], replica(), needs_three, rounds=2, quorum=2)
    for w in range(3):
        m.connect(w)
    m.begin_round()
    m.on_message(1, grad(m, 1, 2.0))              # copied into row 1
    row2 = m.receive_buffer(2, 0)
    row2.fill_(4.0)
    m.on_message(2, Gradient(0, 2, row2))          # in place
    (failed,) = m.on_deadline()
    assert isinstance(failed, RoundFailed) and "needs 3 rows" in failed.reason
    row0 = m.receive_buffer(0, 0)                  # row 0 held worker 1's row meanwhile
    row0.fill_(9.0)
    upd, closed = m.on_message(0, Gradient(0, 0, row0))[:2]
    assert closed.accepted == (0, 1, 2)
    assert torch.equal(upd.message.tensor, torch.full((m.replica.d,), 5.0))


def test_all_finite_survives_an_overflowing_sum_and_finds_nan_and_inf():
    from byzps.core.rounds import all_finite
    big = torch.full((10,), 3e38)
    assert not torch.isfinite(big.sum()) and all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(10)
        x[7] = bad
        assert not all_finite(x)


def test_one_state_payload_is_shared_by_every_connect_until_the_next_step():
    m = machine(n=3, rounds=2, quorum=3)
    s0, s1 = (m.connect(w)[0].message.tensor for w in (0, 1))
    assert s0 is s1
    m.begin_round()
    for w in range(3):
        if w == 2:
            m.connect(2)
        m.on_message(w, grad(m, w, 1.0))
    m.disconnect(2)
    s2 = m.connect(2)[0].message.tensor
    assert s2 is not s0 and torch.equal(s2[0], m.replica.theta.detach())


def test_replica_that_loaded_state_matches_a_fresh_one_bit_for_bit_with_negative_zeros():
    """Regression: a fresh replica (the PS) and one that loaded STATE (a worker) must end the
    first momentum step with the same digest even when the aggregate holds -0.0 (a median of a
    sign-flipped zero): torch SGD's first step copied the gradient on the PS (-0.0) while the
    worker computed 0.9 * 0 + g (+0.0), and every worker resynced after round 0."""
    from byzps.replica import Replica
    ps = Replica("logreg", 0, 0.1, 0.9)
    worker = Replica("logreg", 0, 0.1, 0.9)
    worker.load_state(ps.state())
    agg = torch.zeros(ps.d)
    agg[::2] = -0.0
    agg[1] = 0.5
    ps.apply(agg.clone())
    worker.apply(agg.clone())
    assert ps.digest() == worker.digest()


# -- issue 11: liveness and STATE amplification ------------------------------------------------


def test_quorum_close_does_not_wait_and_a_late_gradient_never_enters_a_later_round():
    """close_at="quorum": the round closes at the quorum-th usable gradient; the straggler's
    round-0 gradient, arriving in round 1, is stale: ignored, never in round 1's aggregate."""
    m = machine(n=4, rounds=3, quorum=3, close_at="quorum")
    for w in range(4):
        m.connect(w)
    m.begin_round()
    assert m.on_message(0, grad(m, 0, 1.0)) == []
    assert m.on_message(1, grad(m, 1, 2.0)) == []
    upd, closed = m.on_message(2, grad(m, 2, 6.0))[:2]   # worker 3 not waited for
    assert closed.accepted == (0, 1, 2) and closed.missing == (3,)
    assert torch.equal(upd.message.tensor, torch.full((m.replica.d,), 3.0))
    m.begin_round()
    assert m.receive_buffer(3, 0) is None                # a late frame lands elsewhere
    assert m.on_message(3, grad(m, 3, 1000.0, r=0)) == []  # late: stale, ignored
    for w, v in ((0, 3.0), (1, 4.0)):
        m.on_message(w, grad(m, w, v))
    upd, closed = m.on_message(2, grad(m, 2, 5.0))[:2]
    assert closed.accepted == (0, 1, 2) and closed.missing == (3,)
    assert torch.equal(upd.message.tensor, torch.full((m.replica.d,), 4.0))
    assert m.missed[3] == 0        # early closes do not count against the workers not waited for


def test_all_waits_for_every_live_worker_until_the_deadline():
    m = machine(n=4, rounds=2, quorum=3, close_at="all")
    for w in range(4):
        m.connect(w)
    m.begin_round()
    for w in range(3):
        assert m.on_message(w, grad(m, w, 1.0)) == []
    closed = next(a for a in m.on_deadline() if isinstance(a, RoundClosed))
    assert closed.missing == (3,) and m.missed[3] == 1
    with pytest.raises(ValueError, match="close_at"):
        machine(close_at="fastest")


@pytest.mark.parametrize("close_at", ["all", "quorum"])
def test_a_worker_whose_gradients_are_always_rejected_is_dropped(close_at):
    """Before issue 11 a rejected gradient counted as an answer: the worker was never dropped,
    and with close_at all it could hold every round until the deadline."""
    m = machine(n=4, rounds=10, quorum=3, max_missed=2, close_at=close_at)
    for w in range(4):
        m.connect(w)
    nan = torch.full((m.replica.d,), float("nan"))
    drops = []
    for r in range(2):
        m.begin_round()
        acts = m.on_message(3, Gradient(r, 3, nan))      # the Byzantine worker answers first
        for w in range(3):
            acts += m.on_message(w, grad(m, w, 1.0))
        closed = next(a for a in acts if isinstance(a, RoundClosed))
        assert closed.rejected == {3: REJECT_NON_FINITE}
        drops += [a for a in acts if isinstance(a, Drop)]
    assert [(d.worker_id, d.reason) for d in drops] == [
        (3, "missed 2 round deadlines in a row (no usable gradient: silent, late or rejected)")]
    assert 3 not in m.live
    # it reconnects: its count survives, so one more rejected gradient drops it again
    m.connect(3)
    m.begin_round()
    acts = m.on_message(3, Gradient(2, 3, nan))
    for w in range(3):
        acts += m.on_message(w, grad(m, w, 1.0))
    assert [a.worker_id for a in acts if isinstance(a, Drop)] == [3]


def test_the_last_close_stops_a_worker_it_would_drop_instead_of_dropping_it():
    """A worker that reaches max_missed at the final round gets the STOP like everyone (it was
    dropped before STOP was broadcast, never heard it and retried the finished PS)."""
    m = machine(n=4, rounds=2, quorum=3, max_missed=2)
    for w in range(4):
        m.connect(w)
    nan = torch.full((m.replica.d,), float("nan"))
    acts = []
    for r in range(2):
        m.begin_round()
        acts = m.on_message(3, Gradient(r, 3, nan))
        for w in range(3):
            acts += m.on_message(w, grad(m, w, 1.0))
    assert not [a for a in acts if isinstance(a, Drop)]
    assert 3 in m.live and m.finished
    assert any(isinstance(a, Broadcast) and isinstance(a.message, Stop) for a in acts)


def test_one_state_per_worker_and_model_version_under_a_resync_flood():
    m = machine(n=3, rounds=3, quorum=2)
    for w in range(3):
        m.connect(w)
    m.begin_round()
    for _ in range(700):                                   # the flood: nothing sent
        assert m.on_message(2, Resync(0)) == []
    assert m.states_refused == {0: 0, 1: 0, 2: 700} and m.awaiting_state == {2}
    m.on_message(0, grad(m, 0, 1.0))
    acts = m.on_message(1, grad(m, 1, 3.0))                # 2 cannot answer: not waited for
    kinds = [(type(a).__name__, getattr(getattr(a, "message", None), "round", None))
             for a in acts]
    assert kinds[:3] == [("Broadcast", 0), ("RoundClosed", None), ("Send", 1)]
    closed, state = acts[1], acts[2]
    assert closed.accepted == (0, 1) and closed.missing == (2,)
    assert closed.states_refused == {2: 700}
    assert state.worker_id == 2 and isinstance(state.message, State)
    assert torch.equal(state.message.tensor[0], m.replica.theta.detach())
    assert m.awaiting_state == set() and m.missed[2] == 0
    m.begin_round()                                        # version 1: it already has it
    assert m.on_message(2, Resync(1)) == []
    m.disconnect(2)                                        # nor does a reconnect get another
    assert m.connect(2) == [] and m.states_refused[2] == 702
    m.on_message(0, grad(m, 0, 1.0))
    acts = m.on_message(1, grad(m, 1, 1.0))
    assert next(a for a in acts if isinstance(a, RoundClosed)).states_refused == {2: 2}
    assert [a.worker_id for a in acts if isinstance(a, Send)] == [2]


def test_a_worker_refused_a_state_catches_up_with_the_next_one():
    """Worker side of the one-STATE rule: the UPDATE it cannot use is ignored, the next
    version's STATE syncs it, and it answers the next round with the PS's digest."""
    m = machine(n=2, rounds=3, quorum=1)
    gen = torch.Generator().manual_seed(0)
    w1 = WorkerRounds(1, replica(), lambda r: (torch.randn(m.replica.d, generator=gen), 0.0))
    m.connect(0)
    m.connect(1)                                        # its STATE is lost with the connection
    m.disconnect(1)
    m.begin_round()
    assert m.connect(1) == []                           # the same version: refused
    acts = m.on_message(0, grad(m, 0, 1.0))
    for a in acts:
        if isinstance(a, (Send, Broadcast)) and (not isinstance(a, Send) or a.worker_id == 1):
            assert w1.on_message(a.message) == []
    assert w1.synced and w1.replica.digest() == m.replica.digest()
    (start,) = m.begin_round()
    (reply,) = w1.on_message(start.message)
    assert isinstance(reply, Gradient) and reply.round == 1


def test_an_early_close_the_aggregator_refuses_waits_for_the_others():
    def needs_three(rows):
        if len(rows) < 3:
            raise ValueError("needs 3 rows")
        return rows.mean(0)
    m = ServerRounds([0, 1, 2], replica(), needs_three, rounds=1, quorum=2, close_at="quorum")
    for w in range(3):
        m.connect(w)
    m.begin_round()
    m.on_message(0, grad(m, 0, 1.0))
    assert m.on_message(1, grad(m, 1, 2.0)) == []        # quorum, refused: not a failure yet
    closed = next(a for a in m.on_message(2, grad(m, 2, 6.0)) if isinstance(a, RoundClosed))
    assert closed.accepted == (0, 1, 2)


def test_close_at_is_not_part_of_a_checkpoints_fingerprint(base_config):
    """Like quorum and round_timeout it decides which answers a round waits for, not what the
    run is: a run may resume with the other setting (and checkpoints written before the field
    existed stay usable)."""
    from byzps.checkpoint import fingerprint
    from byzps.job import parse_config
    a = fingerprint(parse_config(dict(base_config, training=dict(base_config["training"],
                                                                 close_at="all"))))
    b = fingerprint(parse_config(dict(base_config, training=dict(base_config["training"],
                                                                 close_at="quorum"))))
    assert a == b and not any("close_at" in k for k in a)


def test_worker_without_digest_check_answers_a_round_whatever_its_digest():
    """The simulator turns the per-ROUND digest check off (it checks replicas at evaluation
    rounds instead): such a worker computes its gradient even for a foreign digest, while the
    default (TCP) worker asks for a resync."""
    checked = WorkerRounds(0, replica(), lambda r: (torch.ones(7850), 0.5))
    unchecked = WorkerRounds(0, replica(), lambda r: (torch.ones(7850), 0.5),
                             verify_digest=False)
    for w in (checked, unchecked):
        w.on_message(State(0, replica().state()))
    assert checked.on_message(RoundStart(0, "f" * 32)) == [Resync(0)]
    (g,) = unchecked.on_message(RoundStart(0, "f" * 32))
    assert isinstance(g, Gradient) and g.round == 0 and g.loss == 0.5
    assert torch.equal(g.tensor, torch.ones(7850))


def test_replica_digest_hashes_the_momentum_buffer_only_when_momentum_is_on():
    """Digest = BLAKE2b-128(theta bytes [+ momentum buffer bytes when momentum != 0]): with
    momentum 0 the buffer is zeros by definition and is not hashed; with momentum on the
    digest is unchanged from before (theta then buffer)."""
    import hashlib

    def blake(*tensors):
        h = hashlib.blake2b(digest_size=16)
        for t in tensors:
            h.update(t.detach().numpy().tobytes())
        return h.hexdigest()

    plain, heavy = replica(momentum=0.0), replica(momentum=0.9)
    agg = torch.linspace(-1.0, 1.0, plain.d)
    for r in (plain, heavy):
        r.apply(agg)
    assert plain.digest() == blake(plain.theta)
    assert plain.digest() != blake(plain.theta, torch.zeros(plain.d))
    assert heavy.digest() == blake(heavy.theta, heavy.momentum_buffer())
    # the buffer is really part of it: same theta, different buffer, different digest
    other = replica(momentum=0.9)
    other.load_state(torch.stack([heavy.theta.detach(), heavy.momentum_buffer() * 2]))
    assert other.digest() != heavy.digest()


def _gradient_through_theta(r, x, y):
    """The reference: autograd back through the flat theta (what Replica.gradient computed
    before issue 14)."""
    theta = r.theta.detach().clone().requires_grad_()
    with torch.enable_grad():
        out = torch.func.functional_call(r.module, r._views(theta), (x,))
        loss = torch.nn.functional.cross_entropy(out, y)
        (g,) = torch.autograd.grad(loss, theta)
    return g, float(loss.detach())


def test_gradient_per_layer_is_bit_identical_to_the_gradient_through_theta():
    """Replica.gradient concatenates per-layer gradients; it must equal the gradient taken
    back through theta bit for bit, including the sign of zeros (a single example whose
    pixels are 0 but one gives -0.0 weight gradients for its true class in the layer itself,
    which the sum over layers in the reference turns into +0.0)."""
    r = Replica("logreg", seed=0, learning_rate=0.1, momentum=0.0)
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 0, 0] = 1.0
    y = torch.tensor([0])
    views = {n: v.detach().requires_grad_() for n, v in r._views(r.theta).items()}
    loss = torch.nn.functional.cross_entropy(torch.func.functional_call(r.module, views, (x,)), y)
    (gw, _) = torch.autograd.grad(loss, list(views.values()))
    assert bool(((gw == 0) & torch.signbit(gw)).any())   # the case is really exercised
    gen = torch.Generator().manual_seed(1)
    cnn = Replica("small_cnn", seed=0, learning_rate=0.1, momentum=0.0)
    cases = [(r, x, y)] + [(cnn, torch.randn(8, 1, 28, 28, generator=gen),
                            torch.randint(0, 10, (8,), generator=gen)) for _ in range(3)]
    for rep, xb, yb in cases:
        got, got_loss = rep.gradient(xb, yb)
        want, want_loss = _gradient_through_theta(rep, xb, yb)
        assert got.shape == (rep.d,) and got.is_contiguous() and got_loss == want_loss
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_stale_gradient_log_line_says_whether_a_round_is_open(caplog):
    import logging

    m = machine()
    for w in range(3):
        m.connect(w)
    caplog.set_level(logging.INFO, logger="byzps")
    assert m.on_message(0, grad(m, 0, 1.0, r=5)) == []     # no round open yet
    m.begin_round()
    assert m.on_message(1, grad(m, 1, 1.0, r=7)) == []
    lines = [r.getMessage() for r in caplog.records if "stale gradient" in r.getMessage()]
    assert lines == ["worker 0: stale gradient for round 5 ignored (no round is open)",
                     "worker 1: stale gradient for round 7 ignored (the open round is 0)"]
