"""What fedsim's messages carry, and the checks a reply must pass before it is used.

Train message (server -> client): ArrayRecord ``"arrays"`` (the global model's
state_dict) and ConfigRecord ``"config"`` with ``task``, ``lr``, ``local-epochs`` and
``server-round``. Train reply: MetricRecord ``"metrics"`` (``num-examples`` = n_k, the
local set size; ``batch-size``; ``train-loss``; ``partition-id``) and, by task:

- ``local-epochs`` (FedAvg): ArrayRecord ``"arrays"``, the locally trained state_dict;
- ``gradient`` (FedSGD): ArrayRecord ``"grads"``, one float array per trainable parameter;
- ``sign`` (signSGD-MV / -FV): ArrayRecord ``"signs"`` holding one uint8 array ``"packed"``
  of ceil(N / 8) bytes (fedsim.strategies.signs).

With ``gradient`` and ``sign``, a model that has float buffers (BatchNorm's running
statistics) also sends them as ArrayRecord ``"buffers"``: they are not trained by the
gradient, and the server takes their example-weighted mean. Models without BatchNorm
(all the MNIST ones) send nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedsim.arrays import from_flwr_array

TASK_LOCAL_EPOCHS = "local-epochs"
TASK_GRADIENT = "gradient"
TASK_SIGN = "sign"
TASKS = (TASK_LOCAL_EPOCHS, TASK_GRADIENT, TASK_SIGN)

ARRAYS = "arrays"
GRADS = "grads"
SIGNS = "signs"
BUFFERS = "buffers"
PACKED = "packed"
CONFIG = "config"
METRICS = "metrics"


class BadReply(ValueError):
    """A client reply that cannot be used; the message says why."""


@dataclass(frozen=True)
class ReplyMetrics:
    """The bookkeeping every train reply carries."""

    num_examples: int
    train_loss: float
    partition_id: int
    batch_size: int


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's records (Flower's own count_bytes per record)."""
    return sum(record.count_bytes() for record in content.values())


def reply_metrics(msg: Message) -> ReplyMetrics:
    """The reply's MetricRecord, checked: n_k > 0, finite loss, partition id >= 0."""
    if msg.has_error():
        raise BadReply(f"client error: {msg.error.reason}")
    content = msg.content
    m = content.get(METRICS)  # not content.metric_records: that property builds a new view per call
    if not isinstance(m, MetricRecord):
        raise BadReply(f"missing MetricRecord {METRICS!r} (has {sorted(content.keys())})")
    try:
        n = m["num-examples"]
        loss = m["train-loss"]
        pid = m["partition-id"]
    except KeyError as err:
        raise BadReply(f"MetricRecord {METRICS!r} lacks {err.args[0]!r}") from None
    if isinstance(n, list) or not n > 0 or (isinstance(n, float) and not n.is_integer()):
        raise BadReply(f"num-examples must be a positive integer, got {n!r}")
    if isinstance(loss, list) or not np.isfinite(loss):
        raise BadReply(f"train-loss must be a finite number, got {loss!r}")
    if isinstance(pid, list) or not pid >= 0 or (isinstance(pid, float) and not pid.is_integer()):
        raise BadReply(f"partition-id must be an integer >= 0, got {pid!r}")
    bs = m.get("batch-size", 0)
    return ReplyMetrics(int(n), float(loss), int(pid), int(bs))  # type: ignore[arg-type]


ArraySpec = Mapping[str, tuple[tuple[int, ...], np.dtype]]


def array_spec(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """key -> (shape, dtype) of every array of a record (read from metadata, no decoding)."""
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in arrays.items()}


def checked_arrays(msg: Message, name: str, spec: ArraySpec) -> dict[str, np.ndarray]:
    """ArrayRecord ``name`` decoded to numpy and checked against ``spec`` (key -> shape, dtype):
    the same keys and shapes; a float entry must be float and finite, any other entry must
    have exactly the expected dtype."""
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
            if not np.isfinite(arr).all():
                raise BadReply(f"{name}[{key!r}] holds NaN or infinite values")
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


def _array_record(msg: Message, name: str) -> ArrayRecord | None:
    record = msg.content.get(name)
    return record if isinstance(record, ArrayRecord) else None


def _to_numpy(array: Array, what: str) -> np.ndarray:
    try:
        return from_flwr_array(array)
    except Exception as err:  # a corrupt payload must not crash the round
        raise BadReply(f"{what} cannot be decoded: {err}") from None
