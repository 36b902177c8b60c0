"""signSGD-FD (fedsim.core.fd, fedsim.algorithms.sign_fd): a hand-worked case of the
authors' rule, an invariant, a sign-inverting attacker, runs on the in-process engine and
the state a checkpoint keeps."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from strategy_kit import each_round, make

from fedsim import protocol
from fedsim.core.fd import EPS, FederatedDefense
from fedsim.core.signs import pack_signs
from fedsim.core.votes import majority_vote
from fedsim.engine.flower_internals import assign_message_id, set_server_identity
from fedsim.engine.runner import run_inprocess

set_server_identity(run_id=7)

# --- the hand-worked case ------------------------------------------------------------------
# 3 workers, 4 coordinates, T_in = 3, C = 10. Worker 2 is the adversary. Rules (the authors'
# train_signSGD_FD.py): round 1 plain majority; rounds 2..T_in one weight per worker,
# llr(matches over all coordinates and rounds / (N r)); later llr(matches / r) per coordinate;
# llr(a) = clip(ln((a + eps) / (1 - a + eps)), -C, C); a match is Y = U (a tie matches nobody).
SIGNS = [
    [[+1, +1, +1, +1], [+1, +1, -1, -1], [-1, -1, -1, +1]],
    [[+1, -1, +1, -1], [+1, +1, -1, -1], [-1, +1, +1, +1]],
    [[+1, +1, -1, -1], [+1, -1, -1, +1], [-1, -1, +1, +1]],  # worker 2 sends -Y_0
    [[+1, +1, +1, +1], [-1, +1, +1, +1], [+1, -1, -1, +1]],
]


def llr(a: float, c: float = 10.0) -> float:
    return max(-c, min(c, math.log((a + EPS) / (1 - a + EPS))))


# Round 1: weights 1; sums [1, 1, -1, 1] -> U1 = [+, +, -, +] (= the majority).
#   matches: w0 [1,1,0,1], w1 [1,1,1,0], w2 [0,0,1,1] -> pooled rates 3/4, 3/4, 2/4.
# Round 2: w = (ln 3, ln 3, 0): worker 2 is silenced; sums ln3 * [2, 0, 0, -2] -> U2 = [+, 0, 0, -]
#   (majority: [+, +, +, -]); matches: w0 [1,0,0,1], w1 [1,0,0,1], w2 [0,0,0,0] (ties match nobody)
#   -> counts w0 [2,1,0,2] (5 of 8), w1 [2,1,1,1] (5 of 8), w2 [0,0,1,1] (2 of 8).
# Round 3: w = (ln 5/3, ln 5/3, -ln 3): the adversary's votes are flipped and outweigh the
#   honest disagreement: sums 0.511 * [2, 0, -2, 0] - 1.099 * [-1, -1, 1, 1]
#   = [2.12, 1.10, -2.12, -1.10] -> U3 = [+, +, -, -] (majority: [+, -, -, +]);
#   matches: w0 [1,1,1,1], w1 [1,0,1,0], w2 [0,0,0,0] -> counts w0 [3,2,1,3], w1 [3,1,2,1], w2 [0,0,1,1].
# Round 4 (r = 3 = T_in): per coordinate, a = counts / 3:
#   w0 = [C, ln2, -ln2, C], w1 = [C, -ln2, ln2, -ln2], w2 = [-C, -C, -ln2, -ln2] (ln((1+eps)/eps) > C);
#   sums [C - C - C, ~0 + C, -ln2 + ln2 + ln2, C - 2 ln2] -> U4 = [-, +, +, +] (majority: [+, +, +, +]).
HAND_WEIGHTS = [
    [[1.0] * 4] * 3,
    [[llr(3 / 4)] * 4, [llr(3 / 4)] * 4, [0.0] * 4],
    [[llr(5 / 8)] * 4, [llr(5 / 8)] * 4, [llr(2 / 8)] * 4],
    [[10.0, llr(2 / 3), llr(1 / 3), 10.0], [10.0, llr(1 / 3), llr(2 / 3), llr(1 / 3)], [-10.0, -10.0, llr(1 / 3), llr(1 / 3)]],
]
HAND_VOTES = [[+1, +1, -1, +1], [+1, 0, 0, -1], [+1, +1, -1, -1], [-1, +1, +1, +1]]
HAND_MAJORITY = [[+1, +1, -1, +1], [+1, +1, +1, -1], [+1, -1, -1, +1], [+1, +1, +1, +1]]
HAND_PHASES = ["majority", "worker", "worker", "coordinate"]
HAND_MATCHES_AFTER = [[3, 2, 1, 3], [3, 1, 2, 1], [0, 0, 1, 1]]  # after round 3, before round 4


def test_the_hand_worked_case_gives_the_authors_weights_and_votes():
    d = FederatedDefense(4, warmup_rounds=3, max_llr=10.0)
    assert math.isclose(HAND_WEIGHTS[1][0][0], math.log(3), rel_tol=1e-4)  # the hand values are what they claim
    assert math.isclose(HAND_WEIGHTS[2][2][0], -math.log(3), rel_tol=1e-4) and HAND_WEIGHTS[3][0][1] == pytest.approx(math.log(2), rel=1e-4)
    for t, signs in enumerate(SIGNS):
        y = torch.tensor(signs, dtype=torch.int8)
        assert d.phase == HAND_PHASES[t]
        torch.testing.assert_close(d.weights([0, 1, 2]), torch.tensor(HAND_WEIGHTS[t], dtype=torch.float64), rtol=0, atol=1e-12)
        if t == 3:
            assert d.state_dict()["matches"].tolist() == HAND_MATCHES_AFTER
        assert majority_vote(y).tolist() == HAND_MAJORITY[t]
        assert d.vote([0, 1, 2], y).tolist() == HAND_VOTES[t], f"round {t + 1}"
    assert d.state_dict()["rounds"].tolist() == [4, 4, 4] and d.rounds_seen == 4


W0 = np.array([1.0, 2.0], np.float32)
B0 = np.array([0.5, -0.5], np.float32)
GLOBAL = ArrayRecord({"w": Array(W0), "b": Array(B0)})
SPEC = protocol.array_spec(GLOBAL)


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return [100, 101, 102]


def _replies(s, current: ArrayRecord, rnd: int, rows: list[list[int]]) -> list[Message]:
    msgs = list(s.configure_train(rnd, current, ConfigRecord(), FakeGrid()))
    for i, m in enumerate(msgs):
        assign_message_id(m, f"r{rnd}-{i}")
    out = []
    for pid, (m, row) in enumerate(zip(msgs, rows, strict=True)):
        record = ArrayRecord({protocol.PACKED: Array(pack_signs(torch.tensor(row, dtype=torch.float32)))})
        metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0, "partition-id": pid, "batch-size": 4})
        out.append(Message(RecordDict({protocol.SIGNS: record, protocol.METRICS: metrics}), reply_to=m))
    return out


def test_the_server_steps_by_the_hand_worked_votes():
    """The strategy 'sign-fd' applies x <- x - lr * U with the hand-worked U, round by round
    (replies in any order: a worker is its partition id)."""
    s = make("sign-fd", SPEC, ["w", "b"], lr=0.5, fd_warmup=3, fd_max=10.0)
    current, x = GLOBAL, np.concatenate([W0, B0]).astype(np.float64)
    for t, rows in enumerate(SIGNS, start=1):
        current, metrics = s.aggregate_train(t, list(reversed(_replies(s, current, t, rows))))
        x = x - 0.5 * np.array(HAND_VOTES[t - 1], np.float64)
        got = np.concatenate([current["w"].numpy(), current["b"].numpy()])
        np.testing.assert_allclose(got, x, rtol=0, atol=1e-6)
        assert metrics["clients"] == 3


# --- an invariant ----------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 6), n=st.integers(1, 12), rounds=st.integers(1, 8), warmup=st.integers(1, 5),
    cap=st.floats(0.1, 12.0), seed=st.integers(0, 2**16),
)
def test_negating_every_sign_negates_every_vote_and_keeps_the_weights(m, n, rounds, warmup, cap, seed):
    """The decoder is odd: Y -> -Y in every round gives U -> -U, the same match counts and
    weights; and after round 1 (all weights 1, whatever C) every weight is in [-C, C] with
    the sign of (rate - 1/2)."""
    g = torch.Generator().manual_seed(seed)
    a, b = (FederatedDefense(n, warmup_rounds=warmup, max_llr=cap) for _ in range(2))
    ids = list(range(m))
    for _ in range(rounds):
        y = (torch.randint(0, 2, (m, n), generator=g) * 2 - 1).to(torch.int8)
        wa, wb = a.weights(ids), b.weights(ids)
        assert torch.equal(wa, wb) and (a.phase == "majority" or bool((wa.abs() <= cap).all()))
        assert torch.equal(a.vote(ids, y), -b.vote(ids, -y))
    sa, sb = a.state_dict(), b.state_dict()
    assert torch.equal(sa["matches"], sb["matches"]) and torch.equal(sa["rounds"], sb["rounds"])
    rate = sa["matches"].double() / sa["rounds"].double()[:, None]
    w = a.coordinate_weights(ids)
    assert torch.equal(torch.sign(w), torch.sign(rate - 0.5))


# --- the attack the paper defends against ------------------------------------------------------

def _attacked_rounds(defense: FederatedDefense, rounds: int, attackers: list[int], m: int, n: int, seed: int):
    """Synthetic signs: honest workers send the true sign flipped with probability 0.2, the
    attackers always send its negation (the sign inversion attack). Yields per round the
    weights used, FD's accuracy and the majority's accuracy."""
    g = torch.Generator().manual_seed(seed)
    ids = list(range(m))
    for _ in range(rounds):
        truth = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.int8)
        noisy = torch.rand(m, n, generator=g) < 0.2
        y = torch.where(noisy, -truth, truth)
        y[attackers] = -truth
        w = defense.weights(ids)
        u = defense.vote(ids, y)
        yield w, (u == truth).double().mean().item(), (majority_vote(y) == truth).double().mean().item()


def test_a_sign_inverting_minority_gets_negative_weights_and_is_turned_into_help():
    """2 of 5 workers always invert: the majority vote is right only when all 3 honest
    workers are (0.8^3 = 0.512 of coordinates); FD flips the attackers' votes (negative
    weights: pooled in rounds 2..T_in, then per coordinate) and decodes most coordinates."""
    m, n, attackers, warmup = 5, 2000, [0, 1], 6
    d = FederatedDefense(n, warmup_rounds=warmup, max_llr=10.0)
    history = list(_attacked_rounds(d, 20, attackers, m, n, seed=1))
    assert all(acc_mv < 0.56 for _, _, acc_mv in history)
    for t, (w, acc_fd, _) in enumerate(history[1:warmup], start=2):  # one weight per worker
        assert (w[attackers] < 0).all() and (w[2:] > 0).all(), t
        assert t == 2 or acc_fd > 0.95, (t, acc_fd)
    for t, (w, acc_fd, _) in enumerate(history[warmup:], start=warmup + 1):  # per coordinate
        assert (w[attackers] < 0).double().mean() > 0.99 and acc_fd > 0.9, (t, acc_fd)
    final = d.coordinate_weights(list(range(m)))
    assert (final[attackers] < -1.0).double().mean() > 0.9


def test_a_worker_that_never_took_part_has_weight_one():
    d = FederatedDefense(3, warmup_rounds=2)
    d.vote([0, 1], torch.tensor([[1, 1, 1], [-1, -1, -1]], dtype=torch.int8))
    assert d.worker_weights([2]).tolist() == [1.0]
    assert d.coordinate_weights([0, 2])[1].tolist() == [1.0, 1.0, 1.0]


# --- runs ----------------------------------------------------------------------------------------

def _rows(folder) -> list[dict]:
    with open(folder / "rounds.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def test_a_sign_fd_run_learns_and_is_reproducible(tmp_path):
    cfg = {"strategy": "sign-fd", "lr": 0.01, "num-nodes": 5, "num-server-rounds": 20}
    a = run_inprocess({**cfg, "results-dir": str(tmp_path / "a")}, quiet=True)
    b = run_inprocess({**cfg, "results-dir": str(tmp_path / "b")}, quiet=True)
    assert _rows(a) == _rows(b)
    acc = [float(r["test_accuracy"]) for r in _rows(a) if r["test_accuracy"]]
    assert acc[-1] > acc[0] + 0.3, acc


def test_the_defense_state_survives_a_checkpoint_bit_for_bit():
    """state_dict -> torch.save -> torch.load(weights_only=True) -> load_state_dict, then the
    same further rounds give the same votes and counts as the uninterrupted estimator."""
    m, n = 4, 70_000  # more than one block of coordinates
    whole = FederatedDefense(n, warmup_rounds=3, max_llr=4.0)
    rounds = list(_attacked_rounds(whole, 4, [3], m, n, seed=5))
    assert len(rounds) == 4
    buf = io.BytesIO()
    s = make("sign-fd", {"w": ((n,), np.dtype(np.float32))}, ["w"], lr=0.1, fd_warmup=3, fd_max=4.0)
    s.algorithm.estimator = whole
    torch.save(s.algorithm.state_dict(), buf)
    buf.seek(0)
    t = make("sign-fd", {"w": ((n,), np.dtype(np.float32))}, ["w"], lr=0.1, fd_warmup=3, fd_max=4.0)
    t.algorithm.load_state_dict(torch.load(buf, weights_only=True))
    restored = t.algorithm.estimator
    assert restored.phase == "coordinate" and restored.rounds_seen == 4
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        y = (torch.randint(0, 2, (m, n), generator=g) * 2 - 1).to(torch.int8)
        assert torch.equal(whole.vote([0, 1, 2, 3], y), restored.vote([0, 1, 2, 3], y))
    sw, sr = whole.state_dict(), restored.state_dict()
    assert sw["clients"] == sr["clients"] and sw["rounds_seen"] == sr["rounds_seen"] == 7
    assert torch.equal(sw["matches"], sr["matches"]) and torch.equal(sw["rounds"], sr["rounds"])
    with pytest.raises(ValueError, match="expected"):
        FederatedDefense(n - 1).load_state_dict(sw)


def test_a_crashed_sign_fd_run_resumes_to_the_same_rounds(tmp_path):
    """On the engine, through all three phases (T_in = 4) and partial participation."""

    class Crash(Exception):
        pass

    def crash_at_9(row) -> None:
        if row.round == 9:
            raise Crash

    cfg = {"strategy": "sign-fd", "lr": 0.01, "num-nodes": 6, "num-server-rounds": 14, "eval-every": 5,
           "fraction-train": 0.5, "fd-warmup": 4, "seed": 3}
    whole = run_inprocess({**cfg, "results-dir": str(tmp_path / "whole")}, quiet=True)
    resumed = tmp_path / "resumed"
    with pytest.raises(Crash):
        run_inprocess({**cfg, "results-dir": str(resumed)}, quiet=True, callbacks=[each_round(crash_at_9)])
    run_inprocess({**cfg, "results-dir": str(resumed)}, quiet=True)
    assert _rows(resumed) == _rows(whole)
    assert json.loads((resumed / "summary.json").read_text())["resumed_after_round"] > 0
    a, b = torch.load(whole / "model.pt"), torch.load(resumed / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
