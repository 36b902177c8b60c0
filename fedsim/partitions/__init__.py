"""Who holds which training examples: flwr-datasets partitioners, seeded.

Schemes (``PartitionSpec.parse`` text in quotes):

- "iid": IidPartitioner on the seeded shuffle; equal sizes (within 1), disjoint, complete.
- "shards[:S]": ShardPartitioner, the FedAvg paper's pathological non-IID split: sort by
  label, cut into num_partitions * S equal shards, S random shards per client (default 2).
- "dirichlet[:ALPHA]": DirichletPartitioner on the label, Dir(alpha) shares per label,
  self-balancing, at least min(10, n // (4 * num_partitions)) (>= 1) examples per client
  (default alpha 0.5).
- "labels[:K]": PathologicalPartitioner, exactly K labels per client, client i holding
  labels i..i+K-1 (mod the number of labels); default K 2.
- "full": every client holds every example, in its own order (numpy rng seeded with
  (seed, client id)); no flwr-datasets equivalent.
- "sample[:K]": every client holds K distinct examples drawn at random from the whole set,
  independently of the other clients (numpy rng seeded with (seed, client id)); clients
  overlap, so there may be more clients than examples (cross-device studies: 100,000
  clients on MNIST). pfl-research's artificial federated data set draws users the same
  way; flwr-datasets has no equivalent. Default K 100.

``client_partitions`` returns them as a ``Partitions`` table (fedsim.partitions.table):
one flat index array for the disjoint schemes, drawn on access for "full" and "sample",
so a client that is never sampled costs at most 8 bytes.
"""

from fedsim.partitions.counts import format_label_counts, label_counts, plot_label_counts
from fedsim.partitions.partition import clear_cache, client_partitions, partition_indices
from fedsim.partitions.spec import SCHEMES, PartitionSpec
from fedsim.partitions.table import DrawnPartitions, HeldOut, IndexTable, Partitions

__all__ = [
    "SCHEMES",
    "DrawnPartitions",
    "HeldOut",
    "IndexTable",
    "PartitionSpec",
    "Partitions",
    "clear_cache",
    "client_partitions",
    "format_label_counts",
    "label_counts",
    "partition_indices",
    "plot_label_counts",
]
