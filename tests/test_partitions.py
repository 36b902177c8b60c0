"""fedsim.partitions: schemes on flwr-datasets partitioners, seeded, cached; counts and plots."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.partitions import (
    SCHEMES,
    DrawnPartitions,
    HeldOut,
    IndexTable,
    PartitionSpec,
    clear_cache,
    client_partitions,
    format_label_counts,
    label_counts,
    partition_indices,
    plot_label_counts,
)
from fedsim.partitions import schemes as schemes_module

# MNIST's training-set class sizes (60,000 in all).
MNIST_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
DISJOINT = ("iid", "shards", "dirichlet", "labels")


def synthetic_labels(n: int = 6000, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    """n labels, balanced over num_classes, in random order."""
    return np.random.default_rng(seed).permutation(np.arange(n) % num_classes)


def mnist_labels() -> np.ndarray:
    """60,000 labels with MNIST's class sizes, in random order."""
    return np.random.default_rng(1).permutation(np.repeat(np.arange(10), MNIST_COUNTS))


LABELS = synthetic_labels()


def labels_per_client(labels: np.ndarray, parts: list[np.ndarray], num_classes: int = 10) -> np.ndarray:
    return (label_counts(labels, parts, num_classes) > 0).sum(axis=1)


# --- spec ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scheme", "param", "canonical"),
    [
        ("iid", "iid", None, "iid"),
        ("shards", "shards", None, "shards:2"),
        ("shards:3", "shards", 3.0, "shards:3"),
        ("dirichlet", "dirichlet", None, "dirichlet:0.5"),
        ("dirichlet:0.3", "dirichlet", 0.3, "dirichlet:0.3"),
        (" Labels:2 ", "labels", 2.0, "labels:2"),
        ("full", "full", None, "full"),
    ],
)
def test_parse_valid(text, scheme, param, canonical):
    spec = PartitionSpec.parse(text)
    assert spec == PartitionSpec(scheme, param)
    assert str(spec) == canonical
    assert PartitionSpec.parse(str(spec)).value == spec.value


@pytest.mark.parametrize(
    "text",
    ["", "foo", "iid:3", "full:1", "shards:0", "shards:1.5", "shards:x", "labels:", "labels:-2",
     "dirichlet:0", "dirichlet:-1", "dirichlet:nan", "dirichlet:inf", "dirichlet:abc", "dirichlet:0.3:1"],
)
def test_parse_errors_name_the_text_and_list_valid_forms(text):
    with pytest.raises(ValueError) as err:
        PartitionSpec.parse(text)
    message = str(err.value)
    assert repr(text) in message
    assert "valid forms" in message or "e.g." in message


LABEL_SCHEMES = tuple(s for s in SCHEMES if s != "natural")  # natural partitions read a data column, tested below


def test_spec_constructor_validates():
    assert SCHEMES == ("iid", "shards", "dirichlet", "labels", "full", "sample", "natural")
    assert str(PartitionSpec.parse("natural:Writer_ID")) == "natural:Writer_ID"  # a column name keeps its case
    with pytest.raises(ValueError, match="needs a column name"):
        PartitionSpec.parse("natural")
    with pytest.raises(ValueError, match="unknown partitioning scheme 'nope'"):
        PartitionSpec("nope")
    with pytest.raises(ValueError, match="integer >= 1"):
        PartitionSpec("labels", 0)
    with pytest.raises(ValueError, match="takes no parameter"):
        PartitionSpec("iid", 1)


# --- errors -------------------------------------------------------------------------------


def test_partition_errors():
    with pytest.raises(ValueError, match="num_partitions must be an integer >= 1"):
        partition_indices(LABELS, "iid", 0, 0)
    with pytest.raises(ValueError, match="num_partitions must be an integer >= 1"):
        partition_indices(LABELS, "iid", -3, 0)
    with pytest.raises(ValueError, match="use at most 5 partitions"):
        partition_indices(LABELS[:5], "iid", 6, 0)
    with pytest.raises(ValueError, match="or partitioning 'sample:K'"):
        partition_indices(LABELS[:5], "shards", 6, 0)
    with pytest.raises(ValueError, match="sample:6 asks for 6 examples per client but the data has 5"):
        partition_indices(LABELS[:5], "sample:6", 2, 0)
    with pytest.raises(ValueError, match=r"unknown partitioning 'random'.*valid forms"):
        partition_indices(LABELS, "random", 10, 0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        partition_indices(LABELS, "iid", 10, -1)
    with pytest.raises(ValueError, match="1-D"):
        partition_indices(LABELS.reshape(-1, 2), "iid", 10, 0)
    with pytest.raises(ValueError, match="integers"):
        partition_indices(LABELS.astype(float), "iid", 10, 0)
    with pytest.raises(ValueError, match="needs at least 20 examples"):
        partition_indices(LABELS[:15], "shards:2", 10, 0)
    with pytest.raises(ValueError, match="only 10"):
        partition_indices(LABELS, "labels:11", 10, 0)


# --- every scheme ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", LABEL_SCHEMES)
@pytest.mark.parametrize("num_partitions", [1, 7, 10])
def test_valid_int64_indices(scheme, num_partitions):
    parts = partition_indices(LABELS, scheme, num_partitions, seed=0)
    assert len(parts) == num_partitions
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1 and p.size > 0
        assert p.min() >= 0 and p.max() < len(LABELS)


@pytest.mark.parametrize("scheme", DISJOINT)
def test_disjoint(scheme):
    parts = partition_indices(LABELS, scheme, 10, seed=3)
    flat = np.concatenate(parts)
    assert np.unique(flat).size == flat.size


@pytest.mark.parametrize("scheme", ["iid", "shards", "dirichlet"])
@pytest.mark.parametrize("num_partitions", [1, 10, 20])
def test_cover_every_example_once(scheme, num_partitions):
    # shards: 6000 is divisible by 10 * 2 and 20 * 2, so nothing is dropped; dirichlet
    # splits every label among the clients, so it covers too (not a requirement).
    parts = partition_indices(LABELS, scheme, num_partitions, seed=1)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


@pytest.mark.parametrize("scheme", LABEL_SCHEMES)
def test_same_seed_same_partitions_other_seed_other(scheme):
    a = partition_indices(LABELS, scheme, 10, seed=5)
    clear_cache()
    b = partition_indices(LABELS, scheme, 10, seed=5)
    c = partition_indices(LABELS, scheme, 10, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    if scheme == "full":
        assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    else:  # different members, not only a different order
        assert any(not np.array_equal(np.sort(x), np.sort(y)) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize(("scheme", "num_partitions"), [("shards", 10), ("dirichlet", 10), ("labels", 10), ("shards", 1000), ("labels", 1000)])
def test_fast_path_matches_load_partition(scheme, num_partitions, monkeypatch):
    labels = mnist_labels() if num_partitions > 100 else LABELS
    fast = partition_indices(labels, scheme, num_partitions, seed=2)
    clear_cache()
    monkeypatch.setattr(schemes_module, "_indices", schemes_module.load_partition_indices)
    slow = partition_indices(labels, scheme, num_partitions, seed=2)
    clear_cache()
    assert all(np.array_equal(x, y) for x, y in zip(fast, slow, strict=True))


def flwr_iid(labels: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    """flwr-datasets' own IidPartitioner.load_partition on the same shuffled set (what fedsim used to call)."""
    from flwr_datasets.partitioner import IidPartitioner

    p = IidPartitioner(num_partitions=num_partitions)
    p.dataset = schemes_module._shuffled_dataset(labels, seed)
    return schemes_module.load_partition_indices(p, num_partitions)


@pytest.mark.parametrize(("n", "num_partitions", "seed"), [(60000, 1000, 0), (6007, 10, 3), (5, 5, 1), (997, 13, 2**31)])
def test_iid_equals_flwr_datasets_iid_partitioner(n, num_partitions, seed):
    labels = mnist_labels()[:n]
    clear_cache()
    ours = partition_indices(labels, "iid", num_partitions, seed)
    assert all(np.array_equal(x, y) for x, y in zip(ours, flwr_iid(labels, num_partitions, seed), strict=True))


def test_cache_returns_copies():
    clear_cache()
    a = partition_indices(LABELS, "iid", 10, seed=0)
    a[0][:] = -1
    b = partition_indices(LABELS, "iid", 10, seed=0)
    assert b[0].min() >= 0
    assert partition_indices(LABELS.astype(np.int32), PartitionSpec("iid"), 10, seed=0)[3].tolist() == b[3].tolist()


# --- iid ------------------------------------------------------------------------------------


def test_iid_sizes_equal():
    sizes = [len(p) for p in partition_indices(synthetic_labels(6007), "iid", 10, seed=0)]
    assert sizes == [601] * 7 + [600] * 3  # Dataset.shard: the first n % M get one more


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    num_classes=st.integers(1, 6),
    data=st.data(),
)
def test_iid_is_a_partition_of_range_n(n, num_classes, data):
    labels = np.array(data.draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)), dtype=np.int64)
    num_partitions = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**32 - 1))
    parts = partition_indices(labels, "iid", num_partitions, seed)
    assert len(parts) == num_partitions
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


# --- shards ---------------------------------------------------------------------------------


def shard_table(labels: np.ndarray, num_partitions: int, seeds: range) -> dict[int, list[int]]:
    """Seed -> number of clients holding 1, 2, 3, 4 labels (shards:2)."""
    table = {}
    for seed in seeds:
        parts = partition_indices(labels, "shards:2", num_partitions, seed)
        assert {len(p) for p in parts} == {2 * (len(labels) // (2 * num_partitions))}  # 2 shards each
        table[seed] = np.bincount(labels_per_client(labels, parts), minlength=5)[1:].tolist()
    print(f"\nshards:2, {num_partitions} clients, {len(labels)} examples: clients with 1/2/3/4 labels")
    for seed, row in table.items():
        print(f"  seed {seed}: {row}")
    return table


def test_shards_mnist_sized():
    # 100 clients, 200 shards of 300 as in the FedAvg paper. MNIST's class sizes are not
    # multiples of 300, so 9 shards straddle a label boundary (3, rarely 4, labels), and
    # about 1 client in 10 draws two shards of one label (1 label).
    labels = mnist_labels()
    table = shard_table(labels, 100, range(10))
    assert table[0] == [10, 82, 8, 0]  # observed with flwr-datasets 0.6.1; a change means new shard draws
    for row in table.values():
        assert sum(row) == 100 and row[1] >= 75 and row[2] + row[3] <= 12
    counts = label_counts(labels, partition_indices(labels, "shards:2", 100, 0), 10)
    print(format_label_counts(counts[:10]))
    assert counts.sum(axis=0).tolist() == MNIST_COUNTS  # 60000 = 200 * 300: nothing dropped


def test_shards_balanced_labels_never_straddle():
    # 6000 per class is 20 whole shards of 300: every shard is one label.
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 6000))
    table = shard_table(labels, 100, range(3))
    assert table == {0: [11, 89, 0, 0], 1: [9, 91, 0, 0], 2: [10, 90, 0, 0]}


def test_shards_small_and_paper_construction():
    parts = partition_indices(LABELS, "shards", 10, seed=0)  # 20 shards of 300, one label each
    per_client = labels_per_client(LABELS, parts)
    assert {len(p) for p in parts} == {600} and per_client.max() <= 2
    counts = label_counts(LABELS, parts, 10)
    assert set(np.unique(counts)) <= {0, 300, 600}  # whole shards of one label


def test_shards_drop_the_remainder_at_random():
    labels = synthetic_labels(6007)
    parts = partition_indices(labels, "shards:3", 10, seed=0)  # 30 shards of 200, 7 dropped
    assert {len(p) for p in parts} == {600}
    flat = np.concatenate(parts)
    assert flat.size == 6000 and np.unique(flat).size == 6000


# --- dirichlet --------------------------------------------------------------------------------


def test_dirichlet_min_size_and_skew():
    parts = partition_indices(LABELS, "dirichlet:0.1", 10, seed=0)
    assert min(len(p) for p in parts) >= 10
    skewed = label_counts(LABELS, parts, 10)
    flat = label_counts(LABELS, partition_indices(LABELS, "dirichlet:1000", 10, seed=0), 10)
    # small alpha: a client's largest label dominates; huge alpha: close to iid
    assert (skewed.max(axis=1) / skewed.sum(axis=1)).mean() > 0.5
    assert (flat.max(axis=1) / flat.sum(axis=1)).mean() < 0.2


def test_dirichlet_small_data_no_empty_client():
    labels = synthetic_labels(60, 3)
    parts = partition_indices(labels, "dirichlet:0.5", 12, seed=0)  # min size max(1, min(10, 60 // 48)) = 1
    assert min(len(p) for p in parts) >= 1
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(60))


def test_dirichlet_gives_up_with_advice():
    with pytest.raises(ValueError, match="use a larger alpha or fewer clients"):
        partition_indices(np.arange(20) % 2, "dirichlet:0.1", 20, seed=0)


# --- labels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 10])
@pytest.mark.parametrize("num_partitions", [10, 25])
def test_labels_exactly_k(k, num_partitions):
    parts = partition_indices(LABELS, f"labels:{k}", num_partitions, seed=0)
    assert (labels_per_client(LABELS, parts) == k).all()
    # deterministic assignment: every label is used, each by about the same number of clients
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


# --- full -----------------------------------------------------------------------------------


def test_full_permutations_per_client():
    parts = partition_indices(LABELS, "full", 5, seed=7)
    for cid, p in enumerate(parts):
        assert np.array_equal(np.sort(p), np.arange(len(LABELS)))
        assert np.array_equal(p, np.random.default_rng((7, cid)).permutation(len(LABELS)))
    assert len({p.tobytes() for p in parts}) == 5


# --- counts, table, plot ----------------------------------------------------------------------


def test_label_counts_rows_and_columns():
    parts = partition_indices(LABELS, "dirichlet", 10, seed=0)
    counts = label_counts(LABELS, parts, 10)
    assert counts.shape == (10, 10) and np.issubdtype(counts.dtype, np.integer)
    assert counts.sum(axis=1).tolist() == [len(p) for p in parts]
    assert counts.sum(axis=0).tolist() == np.bincount(LABELS, minlength=10).tolist()
    with pytest.raises(ValueError, match=r"0\.\.4"):
        label_counts(LABELS, parts, 5)


def test_format_label_counts():
    counts = np.array([[3, 0, 12], [0, 5, 0]])
    text = format_label_counts(counts)
    lines = text.splitlines()
    assert len(lines) == 2 + 2
    assert lines[0].split() == ["client", "|", "0", "1", "2", "|", "total", "|", "labels"]
    assert lines[2].split() == ["0", "|", "3", ".", "12", "|", "15", "|", "2"]
    assert lines[3].split() == ["1", "|", ".", "5", ".", "|", "5", "|", "1"]


def test_plot_label_counts_writes_png(tmp_path):
    counts = label_counts(LABELS, partition_indices(LABELS, "shards", 10, seed=0), 10)
    path = tmp_path / "counts.png"
    plot_label_counts(counts, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_natural_partitions_give_one_client_per_id_as_flwr_datasets_does():
    from datasets import Dataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    ids = np.array(["w3", "w1", "w2", "w1", "w3", "w3", "w2"])
    parts = partition_indices(LABELS[:7], "natural:writer", 3, seed=0, ids=ids)
    ref = NaturalIdPartitioner(partition_by="writer")
    ref.dataset = Dataset.from_dict({"writer": ids, "index": np.arange(7)})
    assert [p.tolist() for p in parts] == [ref.load_partition(i)["index"] for i in range(3)]
    assert sorted(len(set(ids[p])) for p in parts) == [1, 1, 1]
    with pytest.raises(ValueError, match="3 distinct ids, so there are 3 clients; set num-nodes = 3"):
        partition_indices(LABELS[:7], "natural:writer", 4, seed=0, ids=ids)
    with pytest.raises(ValueError, match="needs the data to carry a column 'writer'"):
        partition_indices(LABELS[:7], "natural:writer", 3, seed=0)


# --- tables: flat index arrays, drawn clients, hold-out views ------------------------------


def test_index_table_is_the_partitions_read_only_and_compact():
    parts = partition_indices(mnist_labels(), "dirichlet:0.3", 50, seed=4)
    table = client_partitions(mnist_labels(), "dirichlet:0.3", 50, seed=4)
    assert isinstance(table, IndexTable) and len(table) == 50
    assert all(np.array_equal(a, b) for a, b in zip(parts, table, strict=True))
    assert table.sizes().tolist() == [len(p) for p in parts]
    assert np.array_equal(np.bincount(table.owners(), minlength=50), table.sizes())
    assert table.flat.nbytes == 8 * sum(len(p) for p in parts) and table.offsets.nbytes == 8 * 51
    with pytest.raises(ValueError, match="read-only"):
        table[3][0] = 0
    assert np.array_equal(table[-1], parts[-1]) and [len(x) for x in table[2:4]] == [len(parts[2]), len(parts[3])]
    with pytest.raises(IndexError, match=r"outside 0\.\.49"):
        table[50]


def test_sample_draws_k_distinct_examples_per_client_more_clients_than_examples():
    labels = synthetic_labels(500)
    parts = client_partitions(labels, "sample:40", 100_000, seed=9)
    assert isinstance(parts, DrawnPartitions) and parts.overlapping and len(parts) == 100_000
    for pid in (0, 1, 77_777, 99_999):
        idx = parts[pid]
        assert idx.dtype == np.int64 and len(idx) == 40 and len(np.unique(idx)) == 40
        assert idx.min() >= 0 and idx.max() < 500
        assert np.array_equal(idx, parts[pid])  # drawn again: the same
    assert not np.array_equal(parts[0], parts[1])
    clear_cache()
    assert np.array_equal(client_partitions(labels, "sample:40", 100_000, seed=9)[5], parts[5])
    assert not np.array_equal(client_partitions(labels, "sample:40", 100_000, seed=10)[5], parts[5])
    assert parts.sizes().tolist() == [40] * 100_000
    # every example is about equally likely: 2,000 clients x 40 draws over 500 examples
    hits = np.bincount(np.concatenate([parts[i] for i in range(2000)]), minlength=500)
    assert hits.min() > 100 and hits.max() < 220  # mean 160, sd ~12.6


def test_full_is_drawn_per_client_with_its_own_seeded_order():
    parts = client_partitions(LABELS, "full", 7, seed=3)
    assert isinstance(parts, DrawnPartitions)
    for pid in range(7):
        assert np.array_equal(parts[pid], np.random.default_rng((3, pid)).permutation(len(LABELS)))


@pytest.mark.parametrize("spec", ["iid", "sample:30"])
def test_held_out_views_split_each_client_in_two(spec):
    base = client_partitions(LABELS, spec, 40, seed=1)
    train, test = HeldOut(base, 0.2, 1, test=False), HeldOut(base, 0.2, 1, test=True)
    for pid in (0, 13, 39):
        a, b = train[pid], test[pid]
        assert np.array_equal(np.sort(np.concatenate([a, b])), np.sort(base[pid]))
        assert len(b) == max(1, round(0.2 * len(base[pid])))
        assert [x for x in base[pid] if x in set(a)] == a.tolist()  # training keeps its order
    assert train.sizes().tolist() == [len(train[i]) for i in range(40)]
    assert test.sizes().tolist() == [len(test[i]) for i in range(40)]
