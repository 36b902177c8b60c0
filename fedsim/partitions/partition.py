"""client_partitions / partition_indices: validate, dispatch to the scheme, cache per process."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from fedsim.partitions import schemes
from fedsim.partitions.spec import PartitionSpec
from fedsim.partitions.table import IndexTable, Partitions

_CACHE_SIZE = 8
_cache: OrderedDict[tuple[str, str, int, int], Partitions] = OrderedDict()


def _as_labels(labels: np.ndarray) -> np.ndarray:
    """The labels as a contiguous 1-D int64 array; anything else is a ValueError."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _fingerprint(labels: np.ndarray) -> str:
    """A digest of the (int64) label bytes: equal labels, equal key, in any process."""
    return hashlib.blake2b(labels.tobytes(), digest_size=16).hexdigest()


def _compute(labels: np.ndarray, spec: PartitionSpec, num_partitions: int, seed: int, ids: np.ndarray | None) -> Partitions:
    value = 0.0 if spec.value is None else spec.value  # None only for the schemes without a parameter
    if spec.scheme == "full":
        return schemes.full(len(labels), num_partitions, seed)
    if spec.scheme == "sample":
        return schemes.sample(len(labels), int(value), num_partitions, seed)
    if spec.scheme == "natural":
        if ids is None:
            raise ValueError(f"partitioning {spec} needs the data to carry a column {spec.column!r} (a save_to_disk folder's column)")
        parts = schemes.natural(ids, num_partitions)
    elif spec.scheme == "iid":
        parts = schemes.iid(labels, num_partitions, seed)
    elif spec.scheme == "shards":
        parts = schemes.shards(labels, int(value), num_partitions, seed)
    elif spec.scheme == "dirichlet":
        parts = schemes.dirichlet(labels, float(value), num_partitions, seed)
    else:
        parts = schemes.labels_per_client(labels, int(value), num_partitions, seed)
    table = IndexTable.of(parts)
    _check_disjoint(table, len(labels), str(spec))
    return table


def _check_disjoint(table: IndexTable, num_examples: int, name: str) -> None:
    """Guard against a partitioner misbehaving: indices in range, no example twice."""
    flat = table.flat
    if flat.size and (flat.min() < 0 or flat.max() >= num_examples or np.unique(flat).size != flat.size):
        raise RuntimeError(f"partitioning {name} produced invalid or overlapping indices (a flwr-datasets bug?)")


def client_partitions(
    labels: np.ndarray, spec: PartitionSpec | str, num_partitions: int, seed: int, ids: np.ndarray | None = None
) -> Partitions:
    """Each client's int64 indices into ``labels`` (and the caller's tensors), as a
    read-only ``Partitions`` table (fedsim.partitions.table).

    Deterministic for a given (labels, spec, num_partitions, seed). Results are cached
    per process on a digest of the labels (and of ``ids``, the column a "natural"
    partitioning reads), so calling this on every message is cheap.
    """
    spec = PartitionSpec.parse(spec) if isinstance(spec, str) else spec
    if not isinstance(spec, PartitionSpec):
        raise ValueError(f"spec must be a PartitionSpec or a string, got {spec!r}")
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)) or num_partitions < 1:
        raise ValueError(f"num_partitions must be an integer >= 1, got {num_partitions!r}; give at least one client")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    num_partitions, seed = int(num_partitions), int(seed)
    labels = _as_labels(labels)
    if num_partitions > len(labels) and spec.scheme not in ("full", "sample"):
        raise ValueError(
            f"{num_partitions} partitions for {len(labels)} examples: every client needs at least one example; "
            f"use at most {len(labels)} partitions, or partitioning 'sample:K' (clients may share examples)"
        )
    ids_key = "" if ids is None else _fingerprint(np.asarray(ids).astype(str))
    key = (_fingerprint(labels) + ids_key, str(spec), num_partitions, seed)
    parts = _cache.get(key)
    if parts is None:
        parts = _cache[key] = _compute(labels, spec, num_partitions, seed, ids)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return parts


def partition_indices(
    labels: np.ndarray, spec: PartitionSpec | str, num_partitions: int, seed: int, ids: np.ndarray | None = None
) -> list[np.ndarray]:
    """``client_partitions`` as a list of fresh arrays the caller may modify."""
    return [p.copy() for p in client_partitions(labels, spec, num_partitions, seed, ids)]


def clear_cache() -> None:
    """Forget every cached partitioning of this process."""
    _cache.clear()
