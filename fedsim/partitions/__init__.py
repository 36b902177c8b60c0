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
"""

from fedsim.partitions.counts import format_label_counts, label_counts, plot_label_counts
from fedsim.partitions.partition import clear_cache, partition_indices
from fedsim.partitions.spec import SCHEMES, PartitionSpec

__all__ = [
    "SCHEMES",
    "PartitionSpec",
    "clear_cache",
    "format_label_counts",
    "label_counts",
    "partition_indices",
    "plot_label_counts",
]
