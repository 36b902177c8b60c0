"""One function per scheme: labels in, one int64 index array per client out.

Every scheme but "full" runs a flwr-datasets partitioner on a local
``datasets.Dataset`` with columns ``label`` and ``index`` (0..n-1), and reads each
partition's ``index`` column back. As ``FederatedDataset`` does, the dataset is first
shuffled with the seed; the partitioner gets a second seed derived from the same one,
so that the two random streams are distinct.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from fedsim.partitions.table import DrawnPartitions
from fedsim.seeding import distinct_draw, stream_seed

if TYPE_CHECKING:  # datasets and flwr_datasets cost ~2 s to import: only the schemes that use them do
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner

_SHUFFLE, _PARTITIONER = 0, 1  # purposes of the two derived seeds


def _subseed(seed: int, purpose: int) -> int:
    """A 32-bit seed for one purpose, derived from ``seed`` by numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, purpose]).generate_state(1, np.uint32)[0])


def _shuffled_dataset(labels: np.ndarray, seed: int) -> Dataset:
    """The columns ``label`` and ``index`` in a seeded random row order.

    The same permutation as ``Dataset.shuffle(seed=...)`` (numpy's default_rng), but
    materialised: a shuffled Dataset keeps an indices mapping, through which the
    partitioners' ``np.array(dataset["label"])`` reads row by row (seconds for 60,000).
    """
    from datasets import Dataset

    order = shuffled_order(len(labels), seed)
    return Dataset.from_dict({"label": labels[order], "index": order.astype(np.int64)})


def _indices(partitioner: Partitioner, num_partitions: int) -> list[np.ndarray]:
    """Each partition's ``index`` column as int64 (in the partitioner's own order).

    Reading the row lists that the partitioner keeps in ``_partition_id_to_indices``
    (filled by its ``num_partitions`` property) is what ``load_partition`` selects, at a
    fraction of the cost: ``Dataset.select`` dill-hashes the row list for its
    fingerprint, seconds for 60,000 numpy ints. Partitioners without that dict
    (IidPartitioner) go through ``load_partition``.
    """
    _ = partitioner.num_partitions  # determines the assignment in the lazy partitioners
    rows = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(rows, dict) and len(rows) == num_partitions:
        index = _index_column(partitioner.dataset)
        return [index[np.asarray(rows[pid], dtype=np.int64)] for pid in range(num_partitions)]
    return load_partition_indices(partitioner, num_partitions)


def load_partition_indices(partitioner: Partitioner, num_partitions: int) -> list[np.ndarray]:
    """Each partition's ``index`` column through the public ``load_partition``."""
    return [_index_column(partitioner.load_partition(pid)) for pid in range(num_partitions)]


def _index_column(ds: Dataset) -> np.ndarray:
    """The ``index`` column as int64 numpy (via Arrow: the numpy formatter is 5x slower)."""
    return ds.with_format("arrow")[:]["index"].to_numpy().astype(np.int64, copy=False)


def shuffled_order(num_examples: int, seed: int) -> np.ndarray:
    """The seeded permutation every scheme's shuffle uses (``Dataset.shuffle``'s numpy rng)."""
    return np.random.default_rng(_subseed(seed, _SHUFFLE)).permutation(num_examples)


def iid(labels: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    """IidPartitioner: the shuffled set cut into contiguous blocks, sizes differ by at most 1.

    IidPartitioner is ``Dataset.shard(num_partitions, pid, contiguous=True)`` on the
    shuffled set: with n = q N + r, the first r blocks hold q + 1 examples, the rest q.
    That is ``np.array_split`` of the shuffled order, computed here in one pass (views
    into one array) instead of N Arrow shard calls (3 ms each; tested equal to
    ``load_partition`` in tests/test_partitions.py). It has no seed of its own: the
    randomness is the seeded shuffle before it.
    """
    order = shuffled_order(len(labels), seed).astype(np.int64)
    return np.array_split(order, num_partitions)


def shards(labels: np.ndarray, shards_per_client: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """ShardPartitioner, the FedAvg paper's pathological non-IID split.

    Sort by label, cut into ``num_partitions * shards_per_client`` shards of
    ``n // (num_partitions * shards_per_client)`` examples, give every client
    ``shards_per_client`` shards at random (MNIST, 100 clients: 200 shards of 300).
    When the shards do not divide n, the remainder (fewer than
    ``num_partitions * shards_per_client`` examples) is dropped at random before sorting,
    so every shard is used and has the same size.
    """
    num_shards = num_partitions * shards_per_client
    shard_size = len(labels) // num_shards
    if shard_size < 1:
        raise ValueError(
            f"shards:{shards_per_client} with {num_partitions} clients needs at least {num_shards} examples "
            f"(one per shard), got {len(labels)}; use fewer clients or fewer shards per client"
        )
    ds = _shuffled_dataset(labels, seed).select(range(num_shards * shard_size))  # random drop of the remainder
    from flwr_datasets.partitioner import ShardPartitioner

    p = ShardPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_shards_per_partition=shards_per_client,
        shard_size=shard_size,
        keep_incomplete_shard=False,
        shuffle=True,
        seed=_subseed(seed, _PARTITIONER),
    )
    p.dataset = ds
    with warnings.catch_warnings():  # Dataset.sort's pyarrow>=25 deprecation notice, not ours to fix
        warnings.filterwarnings("ignore", message="Specifying null_placement", category=FutureWarning)
        return _indices(p, num_partitions)


def dirichlet_min_partition_size(num_examples: int, num_partitions: int) -> int:
    """flwr-datasets' default of 10, capped at a quarter of the mean partition size, at least 1.

    A client is never empty; small data sets with many clients stay feasible.
    """
    return max(1, min(10, num_examples // (4 * num_partitions)))


def dirichlet(labels: np.ndarray, alpha: float, num_partitions: int, seed: int) -> list[np.ndarray]:
    """DirichletPartitioner: per label, client shares drawn from Dir(alpha), self-balancing.

    Self-balancing (as in the original authors' code): a client already holding more
    than n / num_partitions examples gets no more labels. Every client ends with at
    least ``dirichlet_min_partition_size`` examples; flwr-datasets redraws up to 10
    times (silenced here) to achieve that, then gives up: ValueError.
    """
    min_size = dirichlet_min_partition_size(len(labels), num_partitions)
    from flwr_datasets.partitioner import DirichletPartitioner

    p = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_size,
        self_balancing=True,
        shuffle=True,
        seed=_subseed(seed, _PARTITIONER),
    )
    p.dataset = _shuffled_dataset(labels, seed)
    try:
        with warnings.catch_warnings():  # one long warning per redraw; failing for good raises below
            warnings.filterwarnings("ignore", message="The specified min_partition_size", category=UserWarning)
            return _indices(p, num_partitions)
    except ValueError as err:
        if "max number of attempts" not in str(err):
            raise
        raise ValueError(
            f"dirichlet:{alpha:g} could not give each of {num_partitions} clients at least {min_size} examples "
            f"in 11 draws; use a larger alpha or fewer clients"
        ) from err


def labels_per_client(labels: np.ndarray, k: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """PathologicalPartitioner, exactly k labels per client, "deterministic" assignment.

    Client i holds the sorted labels i, i+1, ..., i+k-1 (mod the number of labels); the
    examples of each label are split evenly among the clients holding it. The seed
    decides which examples (via the shuffle), not which labels.
    """
    num_labels = len(np.unique(labels))
    if k > num_labels:
        raise ValueError(
            f"labels:{k} asks for {k} labels per client but the data has only {num_labels}; use k <= {num_labels}"
        )
    from flwr_datasets.partitioner import PathologicalPartitioner

    p = PathologicalPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_classes_per_partition=k,
        class_assignment_mode="deterministic",
        shuffle=True,
        seed=_subseed(seed, _PARTITIONER),
    )
    p.dataset = _shuffled_dataset(labels, seed)
    return _indices(p, num_partitions)


def full(num_examples: int, num_partitions: int, seed: int) -> DrawnPartitions:
    """Every client holds the whole set, in its own order: rng seeded with (seed, client id).

    The default of the signSGD-FV authors' code; flwr-datasets has no equivalent. Drawn
    when a client is asked for (a permutation of n per client would be n x N x 8 bytes).
    """
    def draw(cid: int) -> np.ndarray:
        return np.random.default_rng((seed, cid)).permutation(num_examples).astype(np.int64)

    return DrawnPartitions(num_partitions, num_examples, draw)


_SAMPLE = 0x5A3E  # purpose of the sample scheme's per-client streams


def sample(num_examples: int, k: int, num_partitions: int, seed: int) -> DrawnPartitions:
    """Every client holds ``k`` distinct examples drawn uniformly from all ``num_examples``,
    independently of the other clients (``fedsim.seeding.distinct_draw`` keyed by (seed,
    client id)); drawn on access, in a few microseconds, since at 100,000 clients nearly
    every sampled client is drawn for the first time.

    Clients overlap, so ``num_partitions`` may exceed ``num_examples``.
    """
    if k > num_examples:
        raise ValueError(f"sample:{k} asks for {k} examples per client but the data has {num_examples}; use k <= {num_examples}")

    def draw(cid: int) -> np.ndarray:
        return distinct_draw(stream_seed(seed, cid, _SAMPLE), num_examples, k)

    return DrawnPartitions(num_partitions, k, draw)


def natural(ids: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    """NaturalIdPartitioner on ``ids``: one client per distinct id, holding the rows with
    that id (in row order); client i holds the i-th id of flwr-datasets' own order."""
    from datasets import Dataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    distinct = len(np.unique(ids))
    if distinct != num_partitions:
        raise ValueError(f"the column holds {distinct} distinct ids, so there are {distinct} clients; set num-nodes = {distinct}")
    p = NaturalIdPartitioner(partition_by="id")
    p.dataset = Dataset.from_dict({"id": ids, "index": np.arange(len(ids), dtype=np.int64)})
    return _indices(p, num_partitions)
