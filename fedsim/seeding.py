"""Independent, reproducible random streams, one per (purpose, seed, client, round).

Nothing in fedsim draws from a global RNG: Flower samples nodes with Python's global
``random`` and a client that touched it would shift the server's sampling.
"""

from __future__ import annotations

import numpy as np
import torch


def stream_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys by numpy's SeedSequence (order matters)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded with stream_seed(*keys)."""
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(*keys))
    return g
