"""The zero-gradient convention (``zero-sign``): the ternary code, the coin for zeros, and
abstentions in the votes and the LLR estimator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.core.signs import NONZERO, PACKED, ZEROS, decode_ternary, encode_ternary, fill_zeros, packed_size
from fedsim.core.votes import CrossProbabilityEstimator, majority_vote


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.0, 1.0, 3.0]), min_size=1, max_size=300))
def test_the_ternary_code_round_trips_and_picks_the_smaller_form(values):
    t = torch.tensor(values)
    arrays = encode_ternary(t)
    assert torch.equal(decode_ternary(arrays, t.numel()), torch.sign(t).to(torch.int8))
    zeros = int((t == 0).sum())
    sizes = {"dense": 2 * packed_size(t.numel()), "sparse": packed_size(t.numel()) + 4 * zeros}
    sent = sum(a.nbytes for a in arrays.values())
    assert sent == min(sizes.values()) and set(arrays) in ({PACKED, NONZERO}, {PACKED, ZEROS})


def test_decode_refuses_zero_indices_out_of_order_or_range():
    arrays = {PACKED: np.zeros(2, np.uint8), ZEROS: np.array([3, 3], np.uint32)}
    with pytest.raises(ValueError, match="strictly increasing"):
        decode_ternary(arrays, 10)
    with pytest.raises(ValueError, match="below 10"):
        decode_ternary({PACKED: np.zeros(2, np.uint8), ZEROS: np.array([10], np.uint32)}, 10)


def test_random_zero_signs_are_fair_coins_from_the_stream_and_leave_the_rest():
    t = torch.zeros(20000)
    t[:10] = torch.arange(1.0, 11.0)
    a = fill_zeros(t, "random", torch.Generator().manual_seed(3))
    b = fill_zeros(t, "random", torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(a[:10], t[:10])
    assert set(a[10:].tolist()) == {-1.0, 1.0} and abs(float(a[10:].mean())) < 0.03  # 4 sigma for 19,990 coins
    assert fill_zeros(t, "plus") is t


def test_an_abstaining_client_neither_votes_nor_counts_on_that_coordinate():
    est = CrossProbabilityEstimator(3, warmup_rounds=0, max_llr=10.0, eps=1e-5)
    # client 2 abstains on coordinate 0 every round and always agrees elsewhere
    signs = torch.tensor([[1, 1, -1], [1, -1, -1], [0, 1, -1]], dtype=torch.int8)
    for _ in range(4):
        u = est.vote([0, 1, 2], signs)
    rates = est.agreement_rates([0, 1, 2])
    assert torch.isnan(rates[2, 0]) and rates[2, 1:].tolist() == [1.0, 1.0]  # no vote on 0: no rate there
    assert est.weights([0, 1, 2])[2, 0] == est.prior_weight
    assert u[0] == 1 and majority_vote(signs)[0] == 1  # the abstention does not count towards the tie-break
    state = est.state_dict()
    assert state["abstained"][2].tolist() == [4.0, 0.0, 0.0]
    again = CrossProbabilityEstimator(3, warmup_rounds=0)
    again.load_state_dict(state)
    assert torch.equal(again.agreement_rates([0, 1, 2]).nan_to_num(-1), rates.nan_to_num(-1))


def test_without_abstentions_the_estimator_keeps_no_abstention_counts():
    est = CrossProbabilityEstimator(4, warmup_rounds=0)
    est.vote([0, 1, 2], torch.tensor([[1, 1, -1, 1], [1, -1, -1, 1], [-1, 1, -1, 1]], dtype=torch.int8))
    assert "abstained" not in est.state_dict()


def test_mean_weights_average_the_llr_over_coordinates():
    est = CrossProbabilityEstimator(2, warmup_rounds=5, max_llr=3.0)
    signs = torch.tensor([[1, 1], [1, 1], [-1, -1]], dtype=torch.int8)
    for _ in range(2):
        est.vote([0, 1, 2], signs)
    assert est.mean_weights([0, 1, 2]).tolist() == pytest.approx([3.0, 3.0, -3.0])  # clipped; during warm-up too


# --- abstaining replies through the strategy --------------------------------------------

from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402
from strategy_kit import make, sent  # noqa: E402

from fedsim import protocol  # noqa: E402
from fedsim.engine.flower_internals import set_server_identity  # noqa: E402

set_server_identity(run_id=9)
GLOBAL = ArrayRecord({"w": Array(np.zeros((2, 5), np.float32))})
SPEC = protocol.array_spec(GLOBAL)


def _reply(to, arrays, pid):
    metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0, "partition-id": pid, "batch-size": 4})
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Message(RecordDict({protocol.SIGNS: record, protocol.METRICS: metrics}), reply_to=to)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({ZEROS: np.array([4, 2], np.uint32)}, "strictly increasing"),
        ({ZEROS: np.array([10], np.uint32)}, "below 10"),
        ({ZEROS: np.array([1], np.int64)}, "expected uint32"),
        ({ZEROS: np.arange(11, dtype=np.uint32)}, "at most 10 entries"),
        ({NONZERO: np.zeros(3, np.uint8)}, "expected shape (2,)"),
        ({NONZERO: np.zeros(2, np.uint8), ZEROS: np.zeros(0, np.uint32)}, "one of 'nonzero', 'zeros'"),
        ({}, "one of 'nonzero', 'zeros'"),
    ],
)
def test_a_malformed_ternary_reply_is_rejected_and_the_round_goes_on(bad, reason, caplog):
    s = make("sign-mv", SPEC, ["w"], lr=1.0, zero_sign="abstain")
    msgs = sent(s, GLOBAL, 3)
    t = torch.tensor([1.0, 0.0, -1.0, 0.0, 2.0, 0.0, 0.0, -3.0, 0.0, 1.0])
    good = [_reply(msgs[i], encode_ternary(t), i) for i in range(2)]
    worse = _reply(msgs[2], {PACKED: encode_ternary(t)[PACKED], **bad}, 2)
    with caplog.at_level("WARNING", logger="flwr"):
        arrays, metrics = s.aggregate_train(1, [*good, worse])
    assert (metrics["clients"], metrics["rejected"]) == (2, 1)
    assert any(reason in r.getMessage() and "node 102" in r.getMessage() for r in caplog.records), caplog.text
    # the two good replies: U = sign(2 t) = sign(t), abstained coordinates do not move
    np.testing.assert_array_equal(arrays["w"].numpy().reshape(-1), -torch.sign(t).numpy())
