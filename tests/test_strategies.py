"""The four strategies on hand-built replies: the update rules, and rejection of bad replies."""

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from strategy_kit import make

from fedsim import protocol
from fedsim.cli import main
from fedsim.config import node_partition_map
from fedsim.core.signs import pack_signs
from fedsim.engine.flower_internals import assign_message_id, set_server_identity
from fedsim.validation import load_config

set_server_identity(run_id=7)

ROOT = Path(__file__).resolve().parents[1]

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
    s = make("fedavg", SPEC, PARAMS, lr=0.1)
    msgs = sent(s, 2)
    r1 = reply(msgs[0], {protocol.ARRAYS: ArrayRecord({"w": Array(W0 * 0), "b": Array(B0 * 0), "steps": Array(np.array(5))})}, n=30, pid=0)
    r2 = reply(msgs[1], {protocol.ARRAYS: ArrayRecord({"w": Array(W0 * 4), "b": Array(B0 * 4), "steps": Array(np.array(9))})}, n=10, pid=1)
    arrays, metrics = s.aggregate_train(1, [r2, r1])
    out = as_np(arrays)
    np.testing.assert_allclose(out["w"], W0 * 1.0)  # (30*0 + 10*4) / 40 = 1
    assert out["steps"] == 6 and out["steps"].dtype == np.int64  # 30/40*5 + 10/40*9 = 6
    assert metrics["clients"] == 2 and metrics["rejected"] == 0


def test_fedsgd_step_by_hand():
    s = make("fedsgd", SPEC, PARAMS, lr=0.5)
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
    s = make("sign-mv", SPEC, PARAMS, lr=0.01)
    msgs = sent(s, 3)
    vecs = [[1, 1, -1, -1, 1, -1], [1, -1, -1, 1, 1, 1], [-1, -1, -1, 1, 1, -1]]
    replies = [sign_reply(m, v, i) for i, (m, v) in enumerate(zip(msgs, vecs, strict=True))]
    arrays, metrics = s.aggregate_train(1, replies)
    out = as_np(arrays)
    np.testing.assert_allclose(out["w"].reshape(-1), W0.reshape(-1) - 0.01 * np.array([1, -1, -1, 1]))
    np.testing.assert_allclose(out["b"], B0 - 0.01 * np.array([1, -1]))
    per_client_up = metrics["bytes-up"] / 3
    assert per_client_up <= 1 + 1024  # ceil(6 / 8) + 1 KiB


def test_llr_vote_uses_majority_in_warmup_then_weights():
    s = make("llr-vote", SPEC, PARAMS, lr=1.0, llr_warmup=1)
    msgs = sent(s, 3)
    vecs = [[1] * 6, [1] * 6, [-1] * 6]
    s.aggregate_train(1, [sign_reply(m, v, i) for i, (m, v) in enumerate(zip(msgs, vecs, strict=True))])
    w = s.algorithm.estimator.weights([0, 1, 2])  # clients are counted by partition id, stable across runs
    assert (w[2] < 0).all() and (w[:2] > 0).all()


def test_a_second_reply_for_one_partition_and_a_reply_without_partition_are_rejected(caplog):
    s = make("sign-mv", SPEC, PARAMS, lr=0.01)
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
    s = make("sign-mv", SPEC, PARAMS, lr=0.01)
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
    s = make("fedsgd", SPEC, PARAMS, lr=1.0)
    msgs = sent(s, 2)
    ok = reply(msgs[0], {protocol.GRADS: ArrayRecord({"w": Array(np.ones((2, 2), np.float32)), "b": Array(np.ones(2, np.float32))})}, pid=0)
    bad = reply(msgs[1], {protocol.GRADS: ArrayRecord({k: Array(v) for k, v in grads.items()})}, pid=1)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = s.aggregate_train(1, [ok, bad])
    assert metrics["rejected"] == 1
    np.testing.assert_allclose(as_np(arrays)["w"], W0 - 1.0)
    assert reason in caplog.text


def test_bad_metrics_and_error_replies_are_rejected(caplog):
    s = make("fedavg", SPEC, PARAMS, lr=0.1)
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
    picks = [[m.metadata.dst_node_id for m in sent(make("fedavg", SPEC, PARAMS, lr=0.1, fraction_train=0.1, seed=s), 100)] for s in (1, 1, 2)]
    assert len(picks[0]) == 10 and picks[0] == picks[1] and picks[0] != picks[2]


def test_gradient_strategies_average_float_buffers_and_reject_replies_without_them(caplog):
    arrays = ArrayRecord({"w": Array(W0), "running_mean": Array(np.zeros(2, np.float32))})
    s = make("sign-mv", protocol.array_spec(arrays), ["w"], lr=0.1)
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


# --- untrusted replies: metric bounds, num-examples pinning, min-replies, the safety net -----

def grads_reply(to, n=10, pid=0, value=1.0, dtype=np.float32, metrics=None):
    msg = reply(to, {protocol.GRADS: ArrayRecord({"w": Array(np.full((2, 2), value, dtype)), "b": Array(np.full(2, value, dtype))})}, n=n, pid=pid)
    if metrics is not None:
        msg.content[protocol.METRICS] = MetricRecord(metrics)
    return msg


def rejections(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "rejected the reply" in r.getMessage()]


GOOD_METRICS = {"num-examples": 10, "train-loss": 1.0, "partition-id": 1, "batch-size": 4}


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("batch-size", float("nan"), "batch-size must be an integer in [0, 2147483647] (an int32 row count), got nan"),
        ("batch-size", float("inf"), "batch-size must be an integer"),
        ("batch-size", [4, 4], "batch-size must be an integer"),
        ("batch-size", 2.5, "batch-size must be an integer"),
        ("batch-size", -1, "batch-size must be an integer in [0, 2147483647] (an int32 row count), got -1"),
        ("batch-size", 2**63 - 1, "got 9223372036854775807"),
        ("num-examples", 0, "num-examples must be an integer in [1, 100] (max-examples=100), got 0"),
        ("num-examples", 101, "max-examples=100"),
        ("num-examples", 2**64 - 1, "max-examples=100"),
        ("num-examples", 1e300, "num-examples must be an integer in [1, 100] (max-examples=100), got 1e+300"),
        ("num-examples", 10.5, "num-examples must be an integer"),
        ("num-examples", [10], "num-examples must be an integer"),
        ("partition-id", 4, "partition-id must be an integer in [0, 3] (num-partitions=4), got 4"),
        ("partition-id", -1, "partition-id must be an integer in [0, 3] (num-partitions=4), got -1"),
        ("partition-id", float("nan"), "partition-id must be an integer"),
        ("train-loss", float("inf"), "train-loss must be a finite number"),
        ("train-loss", [1.0], "train-loss must be a finite number"),
    ],
)
def test_metrics_out_of_type_or_range_are_rejected_naming_metric_value_and_bound(key, value, reason, caplog):
    s = make("fedsgd", SPEC, PARAMS, lr=1.0, num_partitions=4, max_examples=100)
    msgs = sent(s, 2)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = s.aggregate_train(1, [grads_reply(msgs[0]), grads_reply(msgs[1], metrics={**GOOD_METRICS, key: value})])
    assert (metrics["clients"], metrics["rejected"], metrics["updated"]) == (1, 1, 1)
    np.testing.assert_allclose(as_np(arrays)["w"], W0 - 1.0)
    [line] = rejections(caplog)
    assert line.startswith("round 1: rejected the reply of node 101: ") and reason in line


def test_integral_float_metrics_are_accepted():
    got = protocol.reply_metrics(
        grads_reply(sent(make("fedsgd", SPEC, PARAMS, lr=1.0), 1)[0], metrics={**GOOD_METRICS, "num-examples": 10.0, "partition-id": 3.0}),
        num_partitions=4, max_examples=10,
    )
    assert (got.num_examples, got.partition_id, got.batch_size) == (10, 3, 4)
    assert type(got.num_examples) is int and type(got.partition_id) is int


def test_float64_payload_that_overflows_float32_is_rejected_and_others_are_cast():
    s = make("fedsgd", SPEC, PARAMS, lr=1.0)
    msgs = sent(s, 2)
    arrays, metrics = s.aggregate_train(1, [grads_reply(msgs[0], pid=0, dtype=np.float64), grads_reply(msgs[1], pid=1, value=1e300, dtype=np.float64)])
    assert metrics["rejected"] == 1
    out = as_np(arrays)
    assert out["w"].dtype == np.float32 and np.array_equal(out["w"], W0 - 1.0)


def test_num_examples_is_pinned_per_partition_across_rounds_and_checkpoints(caplog):
    s = make("fedsgd", SPEC, PARAMS, lr=1.0)
    s.aggregate_train(1, [grads_reply(m, n=10 + i, pid=i) for i, m in enumerate(sent(s, 2))])
    assert s.pinned_num_examples == {0: 10, 1: 11}
    msgs = sent(s, 3, rnd=2)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, metrics = s.aggregate_train(2, [grads_reply(msgs[0], n=10, pid=0), grads_reply(msgs[1], n=99, pid=1), grads_reply(msgs[2], n=5, pid=2)])
    assert (metrics["clients"], metrics["rejected"]) == (2, 1)
    assert rejections(caplog) == [
        "round 2: rejected the reply of node 101: num-examples=99 differs from the 11 partition-id 1 reported before; "
        "a local set does not change size"
    ]
    assert s.pinned_num_examples == {0: 10, 1: 11, 2: 5}
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    restored = make("fedsgd", SPEC, PARAMS, lr=1.0)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.pinned_num_examples == {0: 10, 1: 11, 2: 5}
    state = s.state_dict()
    old = {**state, "strategy": {k: v for k, v in state["strategy"].items() if k != "num_examples"}}  # a checkpoint from before pinning
    restored.load_state_dict(old)
    assert restored.pinned_num_examples == {}


def test_a_rejected_reply_pins_nothing():
    s = make("fedsgd", SPEC, PARAMS, lr=1.0, min_replies=1)
    msgs = sent(s, 3)
    dup = grads_reply(msgs[2], n=50, pid=0)  # loses to node 100 under the one-per-partition rule
    nan = grads_reply(msgs[1], n=60, pid=1, value=float("nan"))
    s.aggregate_train(1, [grads_reply(msgs[0], n=10, pid=0), dup, nan])
    assert s.pinned_num_examples == {0: 10}


def test_fewer_valid_replies_than_min_replies_keep_the_model_and_the_llr_counts(caplog):
    s = make("llr-vote", SPEC, PARAMS, lr=1.0, llr_warmup=0, min_replies=3, num_partitions=4)
    msgs = sent(s, 3)
    s.aggregate_train(1, [sign_reply(m, [1] * 6, i) for i, m in enumerate(msgs)])
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in s.algorithm.estimator.state_dict().items()}
    msgs = sent(s, 3, rnd=2)
    bad = sign_reply(msgs[2], [1] * 6, 2)
    bad.content[protocol.METRICS]["train-loss"] = float("nan")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = s.aggregate_train(2, [sign_reply(msgs[0], [-1] * 6, 0), sign_reply(msgs[1], [1] * 6, 1), bad])
    assert arrays is None
    assert dict(metrics) == {"clients": 2, "rejected": 1, "bytes-up": metrics["bytes-up"], "bytes-down": metrics["bytes-down"],
                             "updated": 0, "train-loss": 1.0}
    assert "round 2: 2 valid replies, fewer than min-replies=3; the global model is unchanged" in caplog.text
    after = s.algorithm.estimator.state_dict()
    assert after["clients"] == before["clients"] and after["rounds_seen"] == before["rounds_seen"]
    assert torch.equal(after["agree"], before["agree"]) and torch.equal(after["total"], before["total"])


def test_no_valid_reply_gives_no_train_loss_and_updated_zero():
    s = make("fedsgd", SPEC, PARAMS, lr=1.0)
    arrays, metrics = s.aggregate_train(1, [grads_reply(sent(s, 1)[0], value=float("inf"))])
    assert arrays is None and metrics["updated"] == 0 and metrics["clients"] == 0 and "train-loss" not in metrics


def test_an_unexpected_exception_while_checking_rejects_only_that_reply(caplog):
    s = make("fedsgd", SPEC, PARAMS, lr=1.0)
    parse = s.algorithm.parse

    def buggy_parse(msg):
        if msg.metadata.src_node_id == 101:
            raise ZeroDivisionError("division by zero")
        return parse(msg)

    s.algorithm.parse = buggy_parse
    msgs = sent(s, 2)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, metrics = s.aggregate_train(4, [grads_reply(msgs[0], pid=0), grads_reply(msgs[1], pid=1)])
    assert (metrics["clients"], metrics["rejected"], metrics["updated"]) == (1, 1, 1)
    assert rejections(caplog) == ["round 4: rejected the reply of node 101: ZeroDivisionError: division by zero"]


def test_a_reply_with_a_record_the_task_does_not_use_is_rejected(caplog):
    s = make("fedsgd", SPEC, PARAMS, lr=1.0)
    msgs = sent(s, 2)
    extra = grads_reply(msgs[1], pid=1)
    extra.content[protocol.SIGNS] = ArrayRecord({protocol.PACKED: Array(np.zeros(1, np.uint8))})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, metrics = s.aggregate_train(1, [grads_reply(msgs[0], pid=0), extra])
    assert metrics["rejected"] == 1 and "unexpected records ['signs']" in caplog.text


@pytest.mark.parametrize("mutate", ["short", "long", "header-dtype", "header-shape"])
def test_gradient_bytes_that_do_not_match_the_declared_array_are_rejected(mutate, caplog):
    s = make("fedsgd", SPEC, PARAMS, lr=1.0)
    msgs = sent(s, 2)
    good_w = Array(np.ones((2, 2), np.float32))
    bad_w = {
        "short": Array(dtype="float32", shape=(2, 2), stype=good_w.stype, data=good_w.data[:-4]),
        "long": Array(dtype="float32", shape=(2, 2), stype=good_w.stype, data=good_w.data + b"\0" * 4),
        "header-dtype": Array(dtype="float32", shape=(2, 2), stype=good_w.stype, data=Array(np.ones((2,), np.float64)).data),
        "header-shape": Array(dtype="float32", shape=(2, 2), stype=good_w.stype, data=Array(np.ones((4,), np.float32)).data),
    }[mutate]
    bad = reply(msgs[1], {protocol.GRADS: ArrayRecord({"w": bad_w, "b": Array(np.ones(2, np.float32))})}, pid=1)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = s.aggregate_train(1, [grads_reply(msgs[0], pid=0), bad])
    assert metrics["rejected"] == 1 and "cannot be decoded" in caplog.text
    np.testing.assert_array_equal(as_np(arrays)["w"], W0 - 1.0)


# --- identity: a node is bound to the partition of its first used reply ----------------------

class Nodes:
    """A grid with the given node ids (what get_node_ids returns)."""

    def __init__(self, *ids: int) -> None:
        self.ids = list(ids)

    def get_node_ids(self) -> list[int]:
        return self.ids


def to_nodes(strategy, grid: Nodes, rnd: int) -> dict[int, Message]:
    """The train messages of round ``rnd``, by destination node."""
    msgs = list(strategy.configure_train(rnd, GLOBAL, ConfigRecord(), grid))
    for m in msgs:
        assign_message_id(m, f"r{rnd}-{m.metadata.dst_node_id}")
    return {m.metadata.dst_node_id: m for m in msgs}


def test_a_node_claiming_a_bound_partition_is_rejected_and_the_honest_llr_row_is_untouched(caplog):
    """Node 100 (the lowest id, which won duplicate claims before binding) claims node
    101's partition; node 102 switches to partition 0 later. Both are rejected with one
    line naming both nodes; counts and model equal those of the honest replies alone."""
    attacked, honest = (make("llr-vote", SPEC, PARAMS, lr=1.0, llr_warmup=1, num_partitions=3) for _ in range(2))
    grid = Nodes(100, 101, 102)
    plan = {  # round -> (node, partition, signs) replies; node 100 first replies in round 2
        1: [(101, 0, [1] * 6), (102, 1, [1, -1] * 3)],
        2: [(101, 0, [1] * 6), (102, 1, [1, -1] * 3), (100, 0, [-1] * 6)],
        3: [(101, 0, [1, 1, 1, -1, -1, -1]), (102, 0, [-1] * 6), (100, 2, [-1] * 6)],
    }
    bad = {2: [(100, 0)], 3: [(102, 0)]}
    for rnd, replies in plan.items():
        msgs = {id(s): to_nodes(s, grid, rnd) for s in (attacked, honest)}
        with caplog.at_level(logging.WARNING, logger="flwr"):
            caplog.clear()
            out_a, m_a = attacked.aggregate_train(rnd, [sign_reply(msgs[id(attacked)][n], v, p) for n, p, v in reversed(replies)])
            out_h, m_h = honest.aggregate_train(
                rnd, [sign_reply(msgs[id(honest)][n], v, p) for n, p, v in replies if (n, p) not in bad.get(rnd, [])]
            )
        assert (m_a["clients"], m_a["rejected"]) == (m_h["clients"], len(bad.get(rnd, [])))
        assert all(a.tobytes() == h.tobytes() for a, h in zip(as_np(out_a).values(), as_np(out_h).values(), strict=True))
        if rnd == 2:
            assert rejections(caplog) == [
                "round 2: rejected the reply of node 100: claims partition-id 0, which is bound to node 101 by its "
                "first used reply (a replaced device: see docs/deployment.md)"
            ]
        if rnd == 3:
            assert rejections(caplog) == [
                "round 3: rejected the reply of node 102: claims partition-id 0, but node 102 is bound to partition-id 1 "
                "by its first used reply; partition-id 0 is bound to node 101"
            ]
    ea, eh = attacked.algorithm.estimator.state_dict(), honest.algorithm.estimator.state_dict()
    assert torch.equal(ea["agree"], eh["agree"]) and torch.equal(ea["total"], eh["total"])
    assert attacked.node_partitions == {101: 0, 102: 1, 100: 2}


def test_first_round_duplicates_bind_the_lowest_node_and_rejected_replies_bind_nothing(caplog):
    s = make("sign-mv", SPEC, PARAMS, lr=0.01, num_partitions=3)
    msgs = to_nodes(s, Nodes(100, 101, 102), 1)
    truncated = reply(msgs[100], {protocol.SIGNS: ArrayRecord({protocol.PACKED: Array(np.zeros(3, np.uint8))})}, pid=2)
    s.aggregate_train(1, [sign_reply(msgs[102], [1] * 6, 0), sign_reply(msgs[101], [1] * 6, 0), truncated])
    assert s.node_partitions == {101: 0}  # 101 beat 102 for partition 0; 100's reply was unusable
    msgs = to_nodes(s, Nodes(100, 101, 102), 2)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, metrics = s.aggregate_train(2, [sign_reply(msgs[n], [1] * 6, p) for n, p in ((100, 2), (101, 0), (102, 0))])
    assert (metrics["clients"], metrics["rejected"]) == (2, 1) and s.node_partitions == {101: 0, 100: 2}
    assert "node 102: claims partition-id 0, which is bound to node 101" in caplog.text


def test_bindings_survive_a_checkpoint_for_connected_nodes_and_rebind_when_node_ids_change(caplog):
    s = make("sign-mv", SPEC, PARAMS, lr=0.01, num_partitions=2)
    msgs = to_nodes(s, Nodes(100, 101), 1)
    s.aggregate_train(1, [sign_reply(msgs[100], [1] * 6, 0), sign_reply(msgs[101], [1] * 6, 1)])
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)

    same = make("sign-mv", SPEC, PARAMS, lr=0.01, num_partitions=2)  # resumed in-process: same node ids
    buf.seek(0)
    same.load_state_dict(torch.load(buf, weights_only=True))
    msgs = to_nodes(same, Nodes(100, 101), 2)
    _, metrics = same.aggregate_train(2, [sign_reply(msgs[100], [1] * 6, 1), sign_reply(msgs[101], [1] * 6, 1)])
    assert (metrics["clients"], metrics["rejected"]) == (1, 1) and same.node_partitions == {100: 0, 101: 1}

    fresh = make("sign-mv", SPEC, PARAMS, lr=0.01, num_partitions=2)  # Flower's runtime: new node ids
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    with caplog.at_level(logging.INFO, logger="flwr"):
        msgs = to_nodes(fresh, Nodes(200, 201), 2)
    assert "2 node(s) bound before the checkpoint are not connected; their partitions [0, 1] bind afresh" in caplog.text
    _, metrics = fresh.aggregate_train(2, [sign_reply(msgs[200], [1] * 6, 1), sign_reply(msgs[201], [1] * 6, 0)])
    assert (metrics["clients"], metrics["rejected"]) == (2, 0) and fresh.node_partitions == {200: 1, 201: 0}

    state = s.state_dict()
    old = {**state, "strategy": {k: v for k, v in state["strategy"].items() if k != "node_partitions"}}  # a checkpoint from before binding
    fresh.load_state_dict(old)
    assert fresh.node_partitions == {}


def test_node_partitions_bind_ahead_of_time_so_a_lower_id_impostor_loses_round_1(caplog):
    """node-partitions = "101:0,102:1": node 100 (lowest id, which would win partition 0 by
    the first-claim rule) is rejected from round 1, as is 101 claiming 102's partition; the
    bindings survive a checkpoint and the pruning of nodes absent on resume."""
    s = make("sign-mv", SPEC, PARAMS, lr=0.01, num_partitions=2, node_partitions="101:0,102:1")
    assert s.node_partitions == {101: 0, 102: 1}
    msgs = to_nodes(s, Nodes(100, 101, 102), 1)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, metrics = s.aggregate_train(1, [sign_reply(msgs[n], [1] * 6, p) for n, p in ((100, 0), (101, 0), (102, 0))])
    assert (metrics["clients"], metrics["rejected"]) == (1, 2)
    assert rejections(caplog) == [
        "round 1: rejected the reply of node 100: claims partition-id 0, but node 100 is not in node-partitions "
        "(the run config binds 2 nodes to their partitions); add it there if it is one of yours",
        "round 1: rejected the reply of node 102: claims partition-id 0, but node 102 is bound to partition-id 1 "
        "by its first used reply; partition-id 0 is bound to node 101",
    ]
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    resumed = make("sign-mv", SPEC, PARAMS, lr=0.01, num_partitions=2, node_partitions="101:0,102:1")
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    msgs = to_nodes(resumed, Nodes(100, 101), 2)  # 102 is away: its binding stays
    assert resumed.node_partitions == {101: 0, 102: 1}
    _, metrics = resumed.aggregate_train(2, [sign_reply(msgs[100], [1] * 6, 1), sign_reply(msgs[101], [1] * 6, 0)])
    assert (metrics["clients"], metrics["rejected"]) == (1, 1) and resumed.partition_owner == {0: 101, 1: 102}


def test_node_partitions_override_a_checkpoint_binding_they_contradict():
    s = make("sign-mv", SPEC, PARAMS, lr=0.01, num_partitions=2)
    msgs = to_nodes(s, Nodes(100, 101), 1)
    s.aggregate_train(1, [sign_reply(msgs[100], [1] * 6, 0), sign_reply(msgs[101], [1] * 6, 1)])
    pinned = make("sign-mv", SPEC, PARAMS, lr=0.01, num_partitions=2, node_partitions="101:0")
    pinned.load_state_dict(s.state_dict())
    assert pinned.node_partitions == {101: 0} and pinned.partition_owner == {0: 101}


@pytest.mark.parametrize("text, fragment", [
    ("101:0,102", "'102' is not NODE:PARTITION"),
    ("101:0,x:1", "'x:1' is not NODE:PARTITION"),
    ("101:-1", "'101:-1' is not NODE:PARTITION"),
    ("101:0,101:1", "a node id is given twice"),
    ("101:0,102:0", "a partition id is given to two nodes"),
    ("101:0,102:3", "partition id 3 is not below num-nodes=3"),
])
def test_bad_node_partitions_are_one_line_exit_2(text, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["run", str(ROOT / "experiments" / "quick.toml"), "--set", "num-nodes=3",
               "--set", f"node-partitions='{text}'", "--results-dir", str(tmp_path / "r")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("fedsim: error: node-partitions="), lines
    assert fragment in lines[0] and "as `flwr supernode register` printed it" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_node_partitions_parse_with_spaces_and_newlines():
    cfg = load_config({"num-nodes": 3, "node-partitions": " 11021394607732558363:2,\n7:0 "})
    assert node_partition_map(cfg.node_partitions) == {11021394607732558363: 2, 7: 0}
