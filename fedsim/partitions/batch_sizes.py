"""Per-client batch sizes: heterogeneous compute as in signSGD-FV's "batch modes".

Seed 000 (M = 15, total batch 960): mode 1: all 15 clients B = 64; mode 2: 9 clients
B = 4, 6 clients B = 154; mode 3: 12 x 4 + 3 x 304; mode 4: 14 x 4 + 1 x 904.

Generalised to any M (``batch_mode_sizes``): the total batch is 64 M; the number of
small (B = 4) clients is 0, round(0.6 M), round(0.8 M), M - 1 for modes 1-4 (exactly the
paper's 0, 9, 12, 14 at M = 15); the large clients share the rest equally, the first
``rest % n_large`` of them taking one example more. Which clients are small is a random
choice drawn from the seed.
"""

from __future__ import annotations

import numpy as np

SMALL_BATCH = 4
BATCH_PER_CLIENT = 64


def num_small_clients(mode: int, num_clients: int) -> int:
    """How many clients get B = 4 in batch mode 1-4."""
    if mode not in (1, 2, 3, 4):
        raise ValueError(f"batch mode must be 1, 2, 3 or 4, got {mode}")
    if num_clients < 2 and mode > 1:
        raise ValueError(f"batch mode {mode} needs at least 2 clients, got {num_clients}")
    fraction = {1: 0.0, 2: 0.6, 3: 0.8}.get(mode)
    small = num_clients - 1 if fraction is None else round(fraction * num_clients)
    return min(small, num_clients - 1)


def batch_mode_sizes(mode: int, num_clients: int, seed: int) -> list[int]:
    """Batch size of each client (by partition id) in batch mode 1-4; sums to 64 M."""
    small = num_small_clients(mode, num_clients)
    large = num_clients - small
    rest = BATCH_PER_CLIENT * num_clients - SMALL_BATCH * small
    sizes_large = [rest // large + (1 if i < rest % large else 0) for i in range(large)]
    order = np.random.default_rng([seed, 0xBA7C4]).permutation(num_clients)
    sizes = [0] * num_clients
    for rank, client in enumerate(order):
        sizes[client] = SMALL_BATCH if rank < small else sizes_large[rank - small]
    return sizes


def parse_batch_sizes(text: str, num_clients: int) -> list[int]:
    """Parse an explicit comma-separated list, one batch size per partition id."""
    try:
        sizes = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"batch-sizes={text!r}: expected comma-separated integers like '4,4,64'") from None
    if len(sizes) != num_clients:
        raise ValueError(
            f"batch-sizes lists {len(sizes)} sizes but there are {num_clients} clients: give one per client"
        )
    if any(b < 0 for b in sizes):
        raise ValueError(f"batch-sizes={text!r}: sizes must be >= 0 (0 = the whole local set)")
    return sizes


def client_batch_sizes(batch_size: int, batch_sizes: str, batch_mode: int, num_clients: int, seed: int) -> list[int]:
    """Every client's batch size from the run config: explicit list, batch mode, or one B for all."""
    if batch_sizes:
        return parse_batch_sizes(batch_sizes, num_clients)
    if batch_mode:
        return batch_mode_sizes(batch_mode, num_clients, seed)
    return [batch_size] * num_clients
