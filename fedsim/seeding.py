"""Independent, reproducible random streams, one per (purpose, seed, client, round).

Nothing in fedsim draws from a global RNG: Flower samples nodes with Python's global
``random`` and a client that touched it would shift the server's sampling.
"""

from __future__ import annotations

import hashlib

import torch


def stream_seed(*keys: int) -> int:
    """A 63-bit seed derived from non-negative integer keys (order matters): BLAKE2b of
    their 8-byte encodings, so nearby keys give unrelated seeds; cheap enough per message."""
    digest = hashlib.blake2b(b"".join(int(k).to_bytes(8, "little") for k in keys), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded with stream_seed(*keys)."""
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(*keys))
    return g
