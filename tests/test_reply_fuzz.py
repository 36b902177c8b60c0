"""Fuzz: a round's valid replies mixed with malformed ones (shuffled) give bit for bit the
result of the valid replies alone, for every strategy, over a few rounds."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategy_kit import make

from fedsim import protocol
from fedsim.algorithms import REGISTRY
from fedsim.arrays import NUMPY_STYPE
from fedsim.engine.flower_internals import assign_message_id, set_server_identity
from fedsim.strategies import FedsimStrategy

set_server_identity(run_id=11)

NUM_PARTITIONS = 6
MAX_EXAMPLES = 100
ROUNDS = 3
# Two trainable tensors (8 parameters: one byte of signs), a BatchNorm-like float buffer
# (averaged from the replies) and an int64 buffer (FedAvg rounds its mean).
GLOBAL = ArrayRecord({
    "w": Array((np.arange(6, dtype=np.float32).reshape(3, 2) / 7).astype(np.float32)),
    "b": Array(np.array([0.5, -0.25], np.float32)),
    "bn.running_mean": Array(np.zeros(2, np.float32)),
    "bn.num_batches_tracked": Array(np.array(3, np.int64)),
})
SPEC = protocol.array_spec(GLOBAL)
PARAMS = ["w", "b"]

Parts = dict  # {"records": {name: {key: np.ndarray | Array}}, "metrics": {key: value}}


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return list(range(100, 100 + NUM_PARTITIONS))


def make_strategy(name: str) -> FedsimStrategy:
    options = {"llr_warmup": 1} if name == "llr-vote" else {}
    return make(name, SPEC, PARAMS, lr=0.1, seed=3, num_partitions=NUM_PARTITIONS, max_examples=MAX_EXAMPLES, **options)


def valid_parts(s: FedsimStrategy, pid: int, n: int, rng: np.random.Generator) -> Parts:
    """What an honest client of partition ``pid`` with ``n`` examples could send: the
    algorithm's own sample upload (``Algorithm.sample_upload``) and, where it sends them,
    the float buffers."""
    records: dict[str, dict] = {s.algorithm.record: s.algorithm.sample_upload(rng)}
    if s.buffer_spec:
        records[protocol.BUFFERS] = {k: rng.standard_normal(shape).astype(dtype) for k, (shape, dtype) in s.buffer_spec.items()}
    metrics = {"num-examples": n, "train-loss": float(rng.uniform(0, 3)), "partition-id": pid, "batch-size": int(rng.integers(0, 65))}
    return {"records": records, "metrics": metrics}


def build(parts: Parts, to: Message) -> Message:
    content = {name: ArrayRecord({k: v if isinstance(v, Array) else Array(v) for k, v in arrs.items()}) for name, arrs in parts["records"].items()}
    if parts["metrics"] is not None:
        content[protocol.METRICS] = MetricRecord(parts["metrics"])
    return Message(RecordDict(content), reply_to=to)


# --- mutations: each turns valid parts into a reply that must be rejected ---------------------

def _pick_array(parts: Parts, r: random.Random, kind: str | None = None) -> tuple[str, str, np.ndarray]:
    """A random (record, key, array) of the reply, optionally only of a dtype kind ("f")."""
    found = [(n, k, v) for n, arrs in parts["records"].items() for k, v in arrs.items() if kind is None or v.dtype.kind == kind]
    return r.choice(found)


def _replace(parts: Parts, r: random.Random, fn: Callable[[np.ndarray], np.ndarray | Array], kind: str | None = None) -> None:
    name, key, arr = _pick_array(parts, r, kind)
    parts["records"][name][key] = fn(arr)


def _declared_as(arr: np.ndarray, data: bytes) -> Array:
    """An Array declaring ``arr``'s dtype and shape but holding ``data``."""
    return Array(dtype=str(arr.dtype), shape=tuple(arr.shape), stype=NUMPY_STYPE, data=data)


# Another dtype of the same itemsize as float32 / int64 / uint8 (a float64 payload for a
# float32 entry is valid: it is cast), so that only the dtype tells the bytes apart.
SAME_SIZE_OTHER_DTYPE = {"f": np.int32, "i": np.float64, "u": np.int8}


def wrong_dtype(arr: np.ndarray) -> np.ndarray:
    return arr.astype(SAME_SIZE_OTHER_DTYPE[arr.dtype.kind])


def mutate_metric(key: str, value: object) -> Callable[[Parts, random.Random, dict], None]:
    def apply(parts: Parts, r: random.Random, ctx: dict) -> None:
        parts["metrics"][key] = value
    return apply


def drop_record(parts: Parts, r: random.Random, ctx: dict) -> None:
    names = [*parts["records"], protocol.METRICS]
    name = r.choice(names)
    if name == protocol.METRICS:
        parts["metrics"] = None
    else:
        del parts["records"][name]


def extra_record(parts: Parts, r: random.Random, ctx: dict) -> None:
    name = r.choice([*sorted({cls.record for cls in REGISTRY.values()}), protocol.BUFFERS, "extra"])
    if name in parts["records"]:
        name = "extra"
    parts["records"][name] = {"x": np.zeros(2, np.float32)}


def drop_key(parts: Parts, r: random.Random, ctx: dict) -> None:
    name, key, _ = _pick_array(parts, r)
    del parts["records"][name][key]


def extra_key(parts: Parts, r: random.Random, ctx: dict) -> None:
    name = r.choice(list(parts["records"]))
    parts["records"][name]["unexpected"] = np.zeros(1, np.float32)


def wrong_shape(parts: Parts, r: random.Random, ctx: dict) -> None:
    _replace(parts, r, lambda a: np.concatenate([a.reshape(-1), a.reshape(-1)[:1]]) if a.ndim != 1 or r.random() < 0.5 else a[:0])


def bytes_off(parts: Parts, r: random.Random, ctx: dict) -> None:
    k = r.randint(1, 8)
    _replace(parts, r, lambda a: _declared_as(a, Array(a).data[:-k] if r.random() < 0.5 else Array(a).data + bytes(k)))


def header_dtype(parts: Parts, r: random.Random, ctx: dict) -> None:
    _replace(parts, r, lambda a: _declared_as(a, Array(a.astype(SAME_SIZE_OTHER_DTYPE[a.dtype.kind])).data))


def header_shape(parts: Parts, r: random.Random, ctx: dict) -> None:
    _replace(parts, r, lambda a: _declared_as(a, Array(a.reshape(-1, 1) if a.ndim else a.reshape(1)).data))


def other_stype(parts: Parts, r: random.Random, ctx: dict) -> None:
    stype = r.choice(["torch.raw", "", "numpy.ndarray.fortran"])
    _replace(parts, r, lambda a: Array(dtype=str(a.dtype), shape=tuple(a.shape), stype=stype, data=Array(a).data))


def non_finite(parts: Parts, r: random.Random, ctx: dict) -> None:
    def poison(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a.reshape(-1)[r.randrange(a.size)] = r.choice([np.nan, np.inf, -np.inf])
        return a
    _replace(parts, r, poison, kind="f")


def overflow_float64(parts: Parts, r: random.Random, ctx: dict) -> None:
    _replace(parts, r, lambda a: np.full(a.shape, r.choice([1e300, -1e300, 3.5e38]), np.float64), kind="f")


def metric_missing(parts: Parts, r: random.Random, ctx: dict) -> None:
    # batch-size is optional; a reply without partition-id is a plain Flower client's, which FedAvg takes
    del parts["metrics"][r.choice(["num-examples", "train-loss", *([] if ctx["name"] == "fedavg" else ["partition-id"])])]


def metric_bad_value(parts: Parts, r: random.Random, ctx: dict) -> None:
    key = r.choice(["num-examples", "train-loss", "partition-id", "batch-size"])
    values = [float("nan"), float("inf"), float("-inf"), [1], [1.0, 2.0]]
    if key != "train-loss":
        values += [2.5, -1]
    parts["metrics"][key] = r.choice(values)


def metrics_as_config(parts: Parts, r: random.Random, ctx: dict) -> None:
    parts["records"][protocol.METRICS] = ConfigRecord(parts["metrics"])  # type: ignore[assignment]
    parts["metrics"] = None


def pid_out_of_range(parts: Parts, r: random.Random, ctx: dict) -> None:
    parts["metrics"]["partition-id"] = r.choice([NUM_PARTITIONS, NUM_PARTITIONS + 1, 2**40, -1, -NUM_PARTITIONS])


def n_out_of_range(parts: Parts, r: random.Random, ctx: dict) -> None:
    parts["metrics"]["num-examples"] = r.choice([0, -3, MAX_EXAMPLES + 1, 2**63 - 1, 2**64 - 1, 1e300, float(MAX_EXAMPLES + 1)])


def n_changed(parts: Parts, r: random.Random, ctx: dict) -> None:
    """A pinned partition with no valid reply this round claims another num-examples (it
    passes every check up to the pin); without such a partition, num-examples = 0."""
    if not ctx["free_pinned"]:
        parts["metrics"]["num-examples"] = 0
        return
    pid = r.choice(ctx["free_pinned"])
    parts["metrics"]["partition-id"] = pid
    parts["metrics"]["num-examples"] = ctx["n_by_pid"][pid] % MAX_EXAMPLES + 1


MUTATIONS: dict[str, Callable[[Parts, random.Random, dict], None]] = {
    "drop-record": drop_record, "extra-record": extra_record, "drop-key": drop_key, "extra-key": extra_key,
    "wrong-dtype": lambda p, r, c: _replace(p, r, wrong_dtype), "wrong-shape": wrong_shape, "bytes-off": bytes_off,
    "header-dtype": header_dtype, "header-shape": header_shape, "other-stype": other_stype, "non-finite": non_finite,
    "overflow-float64": overflow_float64, "metric-missing": metric_missing, "metric-bad-value": metric_bad_value,
    "metrics-as-config": metrics_as_config, "pid-out-of-range": pid_out_of_range, "n-out-of-range": n_out_of_range,
    "n-changed": n_changed, "error": lambda p, r, c: None,
}


def malformed(s: FedsimStrategy, kind: str, pid: int, seed: int, ctx: dict, to: Message) -> Message:
    if kind == "error":
        return Message(Error(code=0, reason="client crashed"), reply_to=to)
    r = random.Random(seed)
    parts = valid_parts(s, pid, ctx["n_by_pid"][pid], np.random.default_rng(seed))
    MUTATIONS[kind](parts, r, ctx)
    if isinstance(parts["records"].get(protocol.METRICS), ConfigRecord):
        config = parts["records"].pop(protocol.METRICS)
        msg = build(parts, to)
        msg.content[protocol.METRICS] = config
        return msg
    return build(parts, to)


def stray_message(node: int, tag: str) -> Message:
    """A train message to ``node``, so that a reply to it comes from that node."""
    msg = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    assign_message_id(msg, tag)
    return msg


round_plan = st.tuples(
    st.sets(st.integers(0, NUM_PARTITIONS - 1)),  # partitions with a valid reply
    st.lists(st.tuples(st.sampled_from(sorted(MUTATIONS)), st.integers(0, NUM_PARTITIONS - 1), st.integers(0, 2**32 - 1)), max_size=8),
)


@pytest.mark.parametrize("name", sorted(REGISTRY))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_by_pid=st.lists(st.integers(1, MAX_EXAMPLES), min_size=NUM_PARTITIONS, max_size=NUM_PARTITIONS),
    plan=st.lists(round_plan, min_size=ROUNDS, max_size=ROUNDS),
    seed=st.integers(0, 2**32 - 1),
)
def test_malformed_replies_change_nothing_but_the_rejected_count(name, n_by_pid, plan, seed):
    fuzzed, reference = make_strategy(name), make_strategy(name)
    arrays = {id(fuzzed): GLOBAL, id(reference): GLOBAL}
    rng = np.random.default_rng(seed)
    shuffle = random.Random(seed)
    pinned: set[int] = set()
    for rnd, (valid_pids, bad) in enumerate(plan, start=1):
        sent = {id(s): list(s.configure_train(rnd, arrays[id(s)], ConfigRecord(), FakeGrid())) for s in (fuzzed, reference)}
        for msgs in sent.values():
            for i, m in enumerate(msgs):
                assign_message_id(m, f"r{rnd}-{i}")
        valid = [valid_parts(fuzzed, pid, n_by_pid[pid], rng) for pid in sorted(valid_pids)]
        ctx = {"n_by_pid": n_by_pid, "free_pinned": sorted(pinned - valid_pids), "name": name}
        bad_replies = [
            malformed(fuzzed, kind, pid, s, ctx, stray_message(300 + j, f"stray-{rnd}-{j}")) for j, (kind, pid, s) in enumerate(bad)
        ]
        good_fuzzed = [build(p, sent[id(fuzzed)][p["metrics"]["partition-id"]]) for p in valid]
        good_ref = [build(p, sent[id(reference)][p["metrics"]["partition-id"]]) for p in valid]
        mixed = good_fuzzed + bad_replies
        shuffle.shuffle(mixed)

        new_f, m_f = fuzzed.aggregate_train(rnd, mixed)
        new_r, m_r = reference.aggregate_train(rnd, good_ref)
        kinds = [k for k, _, _ in bad]
        assert m_f["rejected"] == len(bad), kinds
        assert m_r["rejected"] == 0
        for key in ("clients", "updated", "train-loss"):
            assert m_f.get(key) == m_r.get(key), (key, kinds)
        assert (new_f is None) == (new_r is None)
        if new_f is not None:
            assert list(new_f.keys()) == list(new_r.keys())
            for key in new_r.keys():
                a, b = new_f[key].numpy(), new_r[key].numpy()
                assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), (key, kinds)
            arrays[id(fuzzed)], arrays[id(reference)] = new_f, new_r
        pinned |= valid_pids
        assert fuzzed.pinned_num_examples == reference.pinned_num_examples
    if name == "llr-vote":
        ef, er = fuzzed.algorithm.estimator.state_dict(), reference.algorithm.estimator.state_dict()
        assert ef["clients"] == er["clients"] and ef["rounds_seen"] == er["rounds_seen"]
        assert torch.equal(ef["agree"], er["agree"]) and torch.equal(ef["total"], er["total"])
