"""What fedsim's messages carry, and the checks a reply must pass before it is used.

Train message (server -> client): ArrayRecord ``"arrays"`` (the global model's
state_dict) and ConfigRecord ``"config"`` with ``algorithm`` (the registered algorithm
whose client step to run: fedsim.algorithms), ``server-round`` and ``device`` (the device
type the server resolved ``device`` to); under ``downlink = "signs"`` the config also says
``downlink``, and a node holding an earlier global model gets ArrayRecord ``"votes"`` (and
``"buffers"``) instead of ``"arrays"`` (fedsim.algorithms.downlink). Train reply: MetricRecord ``"metrics"``
(``num-examples`` = n_k, the local set size; ``batch-size``; ``train-loss``;
``partition-id``; ``cuda-device``, the CUDA index the client trained on or -1 for the
CPU) and the algorithm's own ArrayRecord (``Algorithm.record``):

- ``fedavg``: ``"arrays"``, the locally trained state_dict;
- ``fedsgd``: ``"grads"``, one float array per trainable parameter;
- ``sign-mv``, ``llr-vote``, ``sign-fd``: ``"signs"`` holding one uint8 array ``"packed"`` of
  ceil(N / 8) bytes (fedsim.core.signs); with ``zero-sign = "abstain"`` also either
  ``"nonzero"`` (ceil(N / 8) bytes) or ``"zeros"`` (uint32 indices), whichever is smaller;
- ``ef-sign``: ``"scaled-signs"`` with ``"packed"`` and a float32 ``"scale"``.

Except with ``fedavg``, a model that has float buffers (BatchNorm's running statistics)
also sends them as ArrayRecord ``"buffers"``: they are not trained by the gradient, and
the server takes their example-weighted mean. Models without BatchNorm (all the MNIST
ones) send nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedsim.arrays import decode_exact
from fedsim.config import MAX_BATCH_SIZE
from fedsim.core.signs import NONZERO, PACKED, ZEROS  # the sign codes' array names

ARRAYS = "arrays"
GRADS = "grads"
SIGNS = "signs"
BUFFERS = "buffers"
CONFIG = "config"
METRICS = "metrics"


class BadReply(ValueError):
    """A client reply that cannot be used; the message says why."""


P = TypeVar("P")


@dataclass(frozen=True)
class ReplyMetrics:
    """The bookkeeping every train reply carries."""

    num_examples: int
    train_loss: float  # NaN: not reported (a plain Flower client may send none)
    partition_id: int | None  # None: not reported (a node on its own data, or a plain Flower client)
    batch_size: int
    cuda_device: int | None = None  # the CUDA index it trained on, -1 for the CPU; None: not reported


@dataclass(frozen=True)
class Reply(Generic[P]):
    """A checked reply: who sent it, its bookkeeping and its decoded payload (of the
    type its algorithm's ``parse`` returns)."""

    node_id: int
    metrics: ReplyMetrics
    payload: P
    buffers: dict[str, np.ndarray] | None = None

    @property
    def client(self) -> int:
        """Who the server keeps state for: the partition a reply speaks for, or, for a node
        on its own data (no ``partition-id``), the node itself (its authenticated id)."""
        return self.metrics.partition_id if self.metrics.partition_id is not None else self.node_id


@runtime_checkable
class PlausibilityBound(Protocol):
    """An algorithm whose payloads have a plausible range given the round's global model
    (e.g. EF-signSGD's scale against the model's scale). A payload outside it passes its
    ``parse`` (well-formed, finite) but is rejected like any bad reply: the reason is
    logged and the round goes on without it."""

    def plausibility_rule(self, current: ArrayRecord) -> Callable[[Any], str | None]:
        """For the round's global model ``current``: payload -> why it is implausible (None: plausible)."""
        ...


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's records (Flower's own count_bytes per record)."""
    return sum(record.count_bytes() for record in content.values())


# MAX_BATCH_SIZE (fedsim.config, which caps batch-size and batch-sizes at it): no minibatch
# has more rows than an int32 index can count; larger batch sizes are absurd.
# Weights are computed in float64: larger example counts would not even be exact there.
MAX_NUM_EXAMPLES = 2**53
MAX_CUDA_INDEX = 1023


def reply_metrics(
    msg: Message, *, num_partitions: int | None = None, max_examples: int | None = None, own_data: bool = False, plain_ok: bool = False,
) -> ReplyMetrics:
    """The reply's MetricRecord, type- and range-checked: ``num-examples`` an integer in
    [1, max_examples], ``train-loss`` a finite number, ``partition-id`` an integer in
    [0, num_partitions), ``batch-size`` (default 0) an integer in [0, MAX_BATCH_SIZE],
    ``cuda-device`` (optional: the device it trained on) an integer in [-1, MAX_CUDA_INDEX].
    ``max_examples`` None: at most MAX_NUM_EXAMPLES; ``num_partitions`` None: any id >= 0.
    Who speaks: on the nodes' own data (``own_data``) a reply carries no ``partition-id``
    (the node is its own client); otherwise it must, except a plain Flower client's reply
    where the algorithm takes one (``plain_ok``: FedAvg), which may also lack the loss
    (or name it ``train_loss``): None and NaN then."""
    if msg.has_error():
        raise BadReply(f"client error: {msg.error.reason}")
    content = msg.content
    m = content.get(METRICS)  # not content.metric_records: that property builds a new view per call
    if not isinstance(m, MetricRecord):
        raise BadReply(f"missing MetricRecord {METRICS!r} (has {sorted(content.keys())})")
    n, pid = m.get("num-examples"), m.get("partition-id")
    loss = m.get("train-loss", m.get("train_loss", math.nan))
    given = "train-loss" in m or "train_loss" in m
    plain = pid is None and plain_ok and not own_data
    required = ["num-examples", *([] if plain else ["train-loss"]), *([] if own_data or plain else ["partition-id"])]
    for key in required:
        if key not in m and not (key == "train-loss" and given):
            raise BadReply(f"MetricRecord {METRICS!r} lacks {key!r}")
    if own_data and pid is not None:
        raise BadReply("this run is on the nodes' own data: a node is its own client and a reply carries no partition-id")
    if given and (isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss)):
        raise BadReply(f"train-loss must be a finite number, got {loss!r}")
    examples_cap = (
        (MAX_NUM_EXAMPLES, "exact in float64") if max_examples is None else (max_examples, f"max-examples={max_examples}")
    )
    pid_cap = (None, "") if num_partitions is None else (num_partitions - 1, f"num-partitions={num_partitions}")
    return ReplyMetrics(
        num_examples=_int_metric("num-examples", n, 1, *examples_cap),
        train_loss=float(loss),  # type: ignore[arg-type]
        partition_id=None if pid is None else _int_metric("partition-id", pid, 0, *pid_cap),
        batch_size=_int_metric("batch-size", m.get("batch-size", 0), 0, MAX_BATCH_SIZE, "an int32 row count"),
        cuda_device=None if "cuda-device" not in m else _int_metric("cuda-device", m["cuda-device"], -1, MAX_CUDA_INDEX, "a CUDA index"),
    )


def _int_metric(key: str, value: object, low: int, high: int | None, bound: str) -> int:
    """``value`` as an int with low <= value <= high (high None: no upper bound; ``bound``
    says where high comes from); an int or an integral float (Flower sends whole numbers
    as either), never a bool or a list."""
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())  # NaN, inf: not integral
    if isinstance(value, bool) or not integral or not isinstance(value, (int, float)):
        number = None
    else:
        number = int(value)
    if number is None or number < low or (high is not None and number > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}] ({bound})"
        raise BadReply(f"{key} must be an integer {allowed}, got {value!r}")
    return number


def no_extra_records(msg: Message, expected: Collection[str]) -> None:
    """BadReply if the reply carries a record other than ``expected`` (a record the server
    would silently ignore, e.g. another task's payload, means the client is confused)."""
    extra = sorted(set(msg.content.keys()) - set(expected))
    if extra:
        raise BadReply(f"unexpected records {extra} (expected only {sorted(expected)})")


ArraySpec = Mapping[str, tuple[tuple[int, ...], np.dtype]]


@dataclass(frozen=True)
class ModelSpec:
    """What the server knows of the model: every state_dict entry's (shape, dtype) and
    which entries are trainable parameters (in ``model.parameters()`` order)."""

    arrays: dict[str, tuple[tuple[int, ...], np.dtype]]
    param_keys: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = [k for k in self.param_keys if k not in self.arrays]
        if unknown:
            raise ValueError(f"param_keys {unknown} are not in the model's state_dict")

    @classmethod
    def of(cls, arrays: ArraySpec, param_keys: Collection[str]) -> ModelSpec:
        return cls(dict(arrays), tuple(param_keys))

    @property
    def param_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {k: self.arrays[k] for k in self.param_keys}

    @property
    def buffer_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Float entries that are not trainable parameters (BatchNorm running statistics)."""
        return {k: v for k, v in self.arrays.items() if k not in self.param_keys and np.issubdtype(v[1], np.floating)}

    @property
    def num_params(self) -> int:
        """N: the number of trainable coordinates."""
        return int(sum(int(np.prod(self.arrays[k][0])) for k in self.param_keys))


def array_spec(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """key -> (shape, dtype) of every array of a record (read from metadata, no decoding)."""
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in arrays.items()}


def checked_arrays(msg: Message, name: str, spec: ArraySpec) -> dict[str, np.ndarray]:
    """ArrayRecord ``name`` decoded to numpy and checked against ``spec`` (key -> shape, dtype):
    the same keys and shapes; a float entry must be float, is cast to the spec's dtype and
    must be finite after the cast (what is checked is what is returned and used); any other
    entry must have exactly the expected dtype."""
    record = _array_record(msg, name)
    if record is None:
        raise BadReply(f"missing ArrayRecord {name!r} (has {sorted(msg.content.keys())})")
    if set(record.keys()) != set(spec):
        missing = sorted(set(spec) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(spec))
        raise BadReply(f"ArrayRecord {name!r} keys differ from the model's: missing {missing}, unexpected {extra}")
    out: dict[str, np.ndarray] = {}
    for key, (shape, dtype) in spec.items():
        arr = _to_numpy(record[key], f"{name}[{key!r}]")
        if tuple(arr.shape) != tuple(shape):
            raise BadReply(f"{name}[{key!r}] has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if np.issubdtype(dtype, np.floating):
            if not np.issubdtype(arr.dtype, np.floating):
                raise BadReply(f"{name}[{key!r}] has dtype {arr.dtype}, expected a float dtype")
            with np.errstate(over="ignore"):  # a float64 1e300 becomes inf in float32: caught just below
                arr = arr.astype(dtype, copy=False)
            if not np.isfinite(arr).all():
                raise BadReply(f"{name}[{key!r}] holds NaN or infinite values as {np.dtype(dtype)}")
        elif arr.dtype != dtype:
            raise BadReply(f"{name}[{key!r}] has dtype {arr.dtype}, expected {dtype}")
        out[key] = arr
    return out


def packed_signs(msg: Message, num_bytes: int) -> np.ndarray:
    """ArrayRecord ``signs`` -> its one uint8 array ``packed`` of exactly ``num_bytes`` bytes."""
    record = _array_record(msg, SIGNS)
    if record is None:
        raise BadReply(f"missing ArrayRecord {SIGNS!r} (has {sorted(msg.content.keys())})")
    if list(record.keys()) != [PACKED]:
        raise BadReply(f"ArrayRecord {SIGNS!r} must hold exactly one array {PACKED!r}, has {sorted(record.keys())}")
    arr = _to_numpy(record[PACKED], f"{SIGNS}[{PACKED!r}]")
    if arr.dtype != np.uint8:
        raise BadReply(f"packed signs have dtype {arr.dtype}, expected uint8")
    if arr.shape != (num_bytes,):
        raise BadReply(f"packed signs have shape {arr.shape}, expected ({num_bytes},) for this model")
    return arr


def ternary_signs(msg: Message, n: int) -> dict[str, np.ndarray]:
    """ArrayRecord ``signs`` in the ternary code (fedsim.core.signs.encode_ternary) for n
    coordinates: ``packed`` (ceil(n / 8) uint8) and either ``nonzero`` (ceil(n / 8) uint8)
    or ``zeros`` (1-D uint32, at most n entries; order and range are checked on decode)."""
    record = _array_record(msg, SIGNS)
    if record is None:
        raise BadReply(f"missing ArrayRecord {SIGNS!r} (has {sorted(msg.content.keys())})")
    keys = sorted(record.keys())
    if keys not in ([NONZERO, PACKED], [PACKED, ZEROS]):
        raise BadReply(f"ArrayRecord {SIGNS!r} must hold {PACKED!r} and one of {NONZERO!r}, {ZEROS!r} (zero-sign='abstain'), has {keys}")
    num_bytes = (n + 7) // 8
    out = {}
    for key in keys:
        arr = _to_numpy(record[key], f"{SIGNS}[{key!r}]")
        dtype, fits = (np.uint32, arr.ndim == 1 and arr.size <= n) if key == ZEROS else (np.uint8, arr.shape == (num_bytes,))
        if arr.dtype != dtype:
            raise BadReply(f"{SIGNS}[{key!r}] has dtype {arr.dtype}, expected {np.dtype(dtype)}")
        if not fits:
            expected = f"1-D with at most {n} entries" if key == ZEROS else f"shape ({num_bytes},)"
            raise BadReply(f"{SIGNS}[{key!r}] has shape {arr.shape}, expected {expected} for this model")
        out[key] = arr
    return out


def _array_record(msg: Message, name: str) -> ArrayRecord | None:
    record = msg.content.get(name)
    return record if isinstance(record, ArrayRecord) else None


def _to_numpy(array: Array, what: str) -> np.ndarray:
    """The array, decoded byte-exactly (fedsim.arrays.decode_exact), or BadReply."""
    try:
        return decode_exact(array)
    except Exception as err:  # a corrupt payload must not crash the round
        raise BadReply(f"{what} cannot be decoded: {err}") from None


# --- federated evaluation --------------------------------------------------------------
# Evaluate message (server -> client): ArrayRecord "arrays" (the global model) and
# ConfigRecord "config" (``server-round``, ``device``). Evaluate reply: MetricRecord
# "metrics" with ``num-examples`` (the client's held-out examples), ``loss``,
# ``partition-id`` and one value per metric of the run's task (e.g. ``accuracy``).


@dataclass(frozen=True)
class EvalMetrics:
    """A checked evaluate reply."""

    node_id: int
    num_examples: int
    loss: float
    partition_id: int | None  # None: a node on its own data
    values: dict[str, float]

    @property
    def client(self) -> int:
        """The partition it speaks for, or the node itself (as ``Reply.client``)."""
        return self.partition_id if self.partition_id is not None else self.node_id


def eval_reply_metrics(
    msg: Message, names: Collection[str], *, num_partitions: int | None = None, max_examples: int | None = None
) -> EvalMetrics:
    """An evaluate reply's MetricRecord, checked: exactly ``num-examples`` (an integer in
    [1, max_examples]), ``partition-id`` (in [0, num_partitions)), ``loss`` (finite, >= 0)
    and each of ``names`` (finite; ``accuracy`` in [0, 1]), and no other record."""
    if msg.has_error():
        raise BadReply(f"client error: {msg.error.reason}")
    no_extra_records(msg, (METRICS,))
    m = msg.content.get(METRICS)
    if not isinstance(m, MetricRecord):
        raise BadReply(f"missing MetricRecord {METRICS!r} (has {sorted(msg.content.keys())})")
    expected = {"num-examples", "loss", *names, *(["partition-id"] if "partition-id" in m else [])}
    if set(m.keys()) != expected:
        raise BadReply(f"evaluate metrics must be exactly {sorted(expected | {'partition-id'})} (partition-id only for a partition), got {sorted(m.keys())}")
    values = {}
    for key in ("loss", *names):
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (key == "loss" and v < 0):
            raise BadReply(f"{key} must be a finite number{' >= 0' if key == 'loss' else ''}, got {v!r}")
        if key == "accuracy" and not 0.0 <= v <= 1.0:
            raise BadReply(f"accuracy must be in [0, 1], got {v!r}")
        values[key] = float(v)
    cap = (MAX_NUM_EXAMPLES, "exact in float64") if max_examples is None else (max_examples, f"max-examples={max_examples}")
    pid_cap = (None, "") if num_partitions is None else (num_partitions - 1, f"num-partitions={num_partitions}")
    node = msg.metadata.src_node_id
    pid = _int_metric("partition-id", m["partition-id"], 0, *pid_cap) if "partition-id" in m else None
    return EvalMetrics(node, _int_metric("num-examples", m["num-examples"], 1, *cap), values.pop("loss"), pid, values)
