"""The four strategies on hand-built replies: the update rules, and rejection of bad replies."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedsim import protocol
from fedsim.engine.flower_internals import assign_message_id, set_server_identity
from fedsim.strategies import FedAvg, FedSGD, LLRWeightedVote, SignMajorityVote
from fedsim.strategies.signs import pack_signs

set_server_identity(run_id=7)

W0 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
B0 = np.array([0.5, -0.5], np.float32)
GLOBAL = ArrayRecord({"w": Array(W0), "b": Array(B0), "steps": Array(np.array(4, np.int64))})
SPEC = protocol.array_spec(GLOBAL)
PARAMS = ["w", "b"]  # "steps" is a buffer: not trained, not voted


class FakeGrid:
    def __init__(self, n):
        self.nodes = list(range(100, 100 + n))

    def get_node_ids(self):
        return self.nodes


def reply(to: Message, payload: dict, n=10, loss=1.0, pid=0) -> Message:
    metrics = MetricRecord({"num-examples": n, "train-loss": loss, "partition-id": pid, "batch-size": 4})
    msg = Message(RecordDict({**payload, protocol.METRICS: metrics}), reply_to=to)
    return msg


def sent(strategy, n=3, rnd=1):
    msgs = list(strategy.configure_train(rnd, GLOBAL, ConfigRecord(), FakeGrid(n)))
    for i, m in enumerate(msgs):
        assign_message_id(m, f"id{i}")
    return msgs


def as_np(arrays: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in arrays.items()}


def test_fedavg_is_example_weighted_mean_and_rounds_int_buffers():
    s = FedAvg(SPEC, PARAMS, lr=0.1)
    msgs = sent(s, 2)
    r1 = reply(msgs[0], {protocol.ARRAYS: ArrayRecord({"w": Array(W0 * 0), "b": Array(B0 * 0), "steps": Array(np.array(5))})}, n=30, pid=0)
    r2 = reply(msgs[1], {protocol.ARRAYS: ArrayRecord({"w": Array(W0 * 4), "b": Array(B0 * 4), "steps": Array(np.array(9))})}, n=10, pid=1)
    arrays, metrics = s.aggregate_train(1, [r2, r1])
    out = as_np(arrays)
    np.testing.assert_allclose(out["w"], W0 * 1.0)  # (30*0 + 10*4) / 40 = 1
    assert out["steps"] == 6 and out["steps"].dtype == np.int64  # 30/40*5 + 10/40*9 = 6
    assert metrics["clients"] == 2 and metrics["rejected"] == 0


def test_fedsgd_step_by_hand():
    s = FedSGD(SPEC, PARAMS, lr=0.5)
    msgs = sent(s, 2)
    g1 = {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}
    g2 = {"w": np.full((2, 2), 3.0, np.float32), "b": np.zeros(2, np.float32)}
    r1 = reply(msgs[0], {protocol.GRADS: ArrayRecord({k: Array(v) for k, v in g1.items()})}, n=1, pid=0)
    r2 = reply(msgs[1], {protocol.GRADS: ArrayRecord({k: Array(v) for k, v in g2.items()})}, n=3, pid=1)
    arrays, _ = s.aggregate_train(1, [r1, r2])
    out = as_np(arrays)
    np.testing.assert_allclose(out["w"], W0 - 0.5 * 2.5)  # mean g = (1 + 9) / 4
    np.testing.assert_allclose(out["b"], B0 - 0.5 * 0.25)
    assert out["steps"] == 4  # buffers untouched


def sign_reply(to, vec, pid):
    return reply(to, {protocol.SIGNS: ArrayRecord({protocol.PACKED: Array(pack_signs(torch.tensor(vec)))})}, pid=pid)


def test_sign_majority_vote_step_and_upload_size():
    s = SignMajorityVote(SPEC, PARAMS, lr=0.01)
    msgs = sent(s, 3)
    vecs = [[1, 1, -1, -1, 1, -1], [1, -1, -1, 1, 1, 1], [-1, -1, -1, 1, 1, -1]]
    replies = [sign_reply(m, v, i) for i, (m, v) in enumerate(zip(msgs, vecs))]
    arrays, metrics = s.aggregate_train(1, replies)
    out = as_np(arrays)
    np.testing.assert_allclose(out["w"].reshape(-1), W0.reshape(-1) - 0.01 * np.array([1, -1, -1, 1]))
    np.testing.assert_allclose(out["b"], B0 - 0.01 * np.array([1, -1]))
    per_client_up = metrics["bytes-up"] / 3
    assert per_client_up <= 1 + 1024  # ceil(6 / 8) + 1 KiB


def test_llr_vote_uses_majority_in_warmup_then_weights():
    s = LLRWeightedVote(SPEC, PARAMS, lr=1.0, warmup_rounds=1)
    msgs = sent(s, 3)
    vecs = [[1] * 6, [1] * 6, [-1] * 6]
    s.aggregate_train(1, [sign_reply(m, v, i) for i, (m, v) in enumerate(zip(msgs, vecs))])
    w = s.estimator.weights([0, 1, 2])  # clients are counted by partition id, stable across runs
    assert (w[2] < 0).all() and (w[:2] > 0).all()


def test_a_second_reply_for_one_partition_and_a_reply_without_partition_are_rejected(caplog):
    s = SignMajorityVote(SPEC, PARAMS, lr=0.01)
    msgs = sent(s, 4)
    no_pid = reply(msgs[3], {protocol.SIGNS: ArrayRecord({protocol.PACKED: Array(pack_signs(torch.ones(6)))})})
    no_pid.content[protocol.METRICS] = MetricRecord({"num-examples": 10, "train-loss": 1.0})
    with caplog.at_level(logging.WARNING):
        arrays, metrics = s.aggregate_train(1, [
            sign_reply(msgs[1], [-1] * 6, 0), sign_reply(msgs[0], [1] * 6, 0), sign_reply(msgs[2], [1] * 6, 1), no_pid,
        ])
    assert metrics["clients"] == 2 and metrics["rejected"] == 2
    assert "partition-id 0 already replied this round (node 100)" in caplog.text  # the lower node id is kept
    assert "lacks 'partition-id'" in caplog.text
    np.testing.assert_allclose(as_np(arrays)["b"], B0 - 0.01)  # two +1 votes (node 100's and partition 1's)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({protocol.SIGNS: ArrayRecord({protocol.PACKED: Array(np.zeros(3, np.uint8))})}, "shape"),
        ({protocol.SIGNS: ArrayRecord({protocol.PACKED: Array(np.zeros(1, np.float32))})}, "dtype"),
        ({protocol.SIGNS: ArrayRecord({"other": Array(np.zeros(1, np.uint8))})}, "exactly one array"),
        ({}, "missing ArrayRecord"),
    ],
)
def test_bad_sign_reply_is_rejected_and_logged_round_goes_on(bad, reason, caplog):
    s = SignMajorityVote(SPEC, PARAMS, lr=0.01)
    msgs = sent(s, 3)
    good = [sign_reply(msgs[0], [1] * 6, 0), sign_reply(msgs[1], [1] * 6, 1)]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = s.aggregate_train(3, [*good, reply(msgs[2], bad, pid=2)])
    assert metrics["clients"] == 2 and metrics["rejected"] == 1
    np.testing.assert_allclose(as_np(arrays)["b"], B0 - 0.01)
    assert any("node 102" in r.getMessage() and reason in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize(
    "grads, reason",
    [
        ({"w": np.full((2, 2), np.nan, np.float32), "b": np.ones(2, np.float32)}, "NaN"),
        ({"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}, "shape"),
        ({"w": np.ones((2, 2), np.int32), "b": np.ones(2, np.float32)}, "dtype"),
        ({"b": np.ones(2, np.float32)}, "missing ['w']"),
    ],
)
def test_bad_gradient_reply_is_rejected(grads, reason, caplog):
    s = FedSGD(SPEC, PARAMS, lr=1.0)
    msgs = sent(s, 2)
    ok = reply(msgs[0], {protocol.GRADS: ArrayRecord({"w": Array(np.ones((2, 2), np.float32)), "b": Array(np.ones(2, np.float32))})}, pid=0)
    bad = reply(msgs[1], {protocol.GRADS: ArrayRecord({k: Array(v) for k, v in grads.items()})}, pid=1)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = s.aggregate_train(1, [ok, bad])
    assert metrics["rejected"] == 1
    np.testing.assert_allclose(as_np(arrays)["w"], W0 - 1.0)
    assert reason in caplog.text


def test_bad_metrics_and_error_replies_are_rejected(caplog):
    s = FedAvg(SPEC, PARAMS, lr=0.1)
    msgs = sent(s, 3)
    payload = {protocol.ARRAYS: GLOBAL}
    no_n = Message(RecordDict({**payload, protocol.METRICS: MetricRecord({"train-loss": 1.0})}), reply_to=msgs[0])
    nan_loss = reply(msgs[1], payload, loss=float("nan"), pid=1)
    err = Message(Error(code=2, reason="boom"), reply_to=msgs[2])
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = s.aggregate_train(1, [no_n, nan_loss, err])
    assert arrays is None and metrics["rejected"] == 3 and metrics["clients"] == 0
    for text in ("num-examples", "train-loss", "boom"):
        assert text in caplog.text


def test_fraction_sampling_is_seeded_and_sized():
    picks = [[m.metadata.dst_node_id for m in sent(FedAvg(SPEC, PARAMS, lr=0.1, fraction_train=0.1, seed=s), 100)] for s in (1, 1, 2)]
    assert len(picks[0]) == 10 and picks[0] == picks[1] and picks[0] != picks[2]


def test_gradient_strategies_average_float_buffers_and_reject_replies_without_them(caplog):
    arrays = ArrayRecord({"w": Array(W0), "running_mean": Array(np.zeros(2, np.float32))})
    s = SignMajorityVote(protocol.array_spec(arrays), ["w"], lr=0.1)
    msgs = list(s.configure_train(1, arrays, ConfigRecord(), FakeGrid(3)))
    packed = Array(pack_signs(torch.ones(4)))

    def with_buffers(m, value, n, pid):
        payload = {protocol.SIGNS: ArrayRecord({protocol.PACKED: packed})}
        if value is not None:
            payload[protocol.BUFFERS] = ArrayRecord({"running_mean": Array(np.full(2, value, np.float32))})
        return reply(m, payload, n=n, pid=pid)

    replies = [with_buffers(msgs[0], 1.0, 1, 0), with_buffers(msgs[1], 5.0, 3, 1), with_buffers(msgs[2], None, 1, 2)]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        new, metrics = s.aggregate_train(1, replies)
    np.testing.assert_allclose(new["running_mean"].numpy(), [4.0, 4.0])  # (1*1 + 3*5) / 4
    np.testing.assert_allclose(new["w"].numpy(), W0 - 0.1)
    assert metrics["rejected"] == 1 and "buffers" in caplog.text
