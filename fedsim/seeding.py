"""Independent, reproducible random streams, one per (purpose, seed, client, round).

Nothing in fedsim draws from a global RNG: Flower samples nodes with Python's global
``random`` and a client that touched it would shift the server's sampling.
"""

from __future__ import annotations

import hashlib

import numpy as np
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


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's output function of the 64-bit state ``x`` (Steele, Lea, Flood 2014)."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def distinct_draw(key: int, n: int, k: int) -> np.ndarray:
    """``k`` distinct integers drawn uniformly from 0..n-1, in draw order, determined by ``key``.

    Small k (4k <= n): candidates c_j = floor(u_j n / 2^64), u_j = SplitMix64(key + j *
    0x9E3779B97F4A7C15), j = 1, 2, ..., are i.i.d. uniform on 0..n-1; the first k distinct
    ones are a uniform ordered k-subset (sequential rejection; at most 4k/3 candidates
    expected). A few microseconds for tens of values, where building a numpy Generator alone
    costs about 20. Large k: the first k of a permutation from numpy's Generator seeded
    with ``key``.
    """
    if not 0 <= k <= n:
        raise ValueError(f"cannot draw {k} distinct values from 0..{n - 1}")
    if 4 * k > n:
        return np.random.default_rng(key).permutation(n)[:k].astype(np.int64)
    out: list[int] = []
    seen: set[int] = set()
    state = key & _MASK64
    while len(out) < k:
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        c = (_splitmix64(state) * n) >> 64
        if c not in seen:
            seen.add(c)
            out.append(c)
    return np.array(out, dtype=np.int64)
