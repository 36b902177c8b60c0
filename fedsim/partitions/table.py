"""Every client's example indices, held so that a client that exists costs next to nothing.

Two forms, one interface (a read-only ``Sequence[np.ndarray]``: ``parts[i]`` is client
i's int64 indices, ``len(parts)`` the number of clients):

- ``IndexTable``: disjoint schemes (flwr-datasets' partitioners). All clients' indices in
  one flat int64 array plus N + 1 offsets: 8 bytes per client beyond the examples
  themselves, and ``parts[i]`` is a view (no copy).
- ``DrawnPartitions``: schemes where clients overlap ("full", "sample:K"). Client i's
  indices are drawn from its own seeded stream when asked for, so an idle client costs
  0 bytes and N can exceed the number of examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import overload

import numpy as np

from fedsim.seeding import stream_seed


class Partitions(Sequence[np.ndarray]):
    """Client -> its example indices (module docstring). Subclasses give ``_get`` and ``sizes``."""

    num_partitions: int

    def __len__(self) -> int:
        return self.num_partitions

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[np.ndarray]: ...
    def __getitem__(self, i: int | slice) -> np.ndarray | Sequence[np.ndarray]:
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(self.num_partitions))]
        j = int(i)
        if j < 0:
            j += self.num_partitions
        if not 0 <= j < self.num_partitions:
            raise IndexError(f"client {i} is outside 0..{self.num_partitions - 1}")
        return self._get(j)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self._get(j) for j in range(self.num_partitions))

    def _get(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def sizes(self) -> np.ndarray:
        """Each client's number of examples, int64 [N]."""
        raise NotImplementedError

    @property
    def overlapping(self) -> bool:
        """Whether two clients may hold the same example."""
        return False


class IndexTable(Partitions):
    """Disjoint partitions as one flat index array and offsets: client i holds
    ``flat[offsets[i]:offsets[i + 1]]``."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat = np.ascontiguousarray(flat, dtype=np.int64)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.flat.flags.writeable = False  # views are handed out: nobody may edit a client's data
        self.num_partitions = len(self.offsets) - 1

    @classmethod
    def of(cls, parts: Sequence[np.ndarray]) -> IndexTable:
        """The table of a list of index arrays (concatenated once)."""
        sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if len(parts) else np.empty(0, np.int64)
        return cls(flat, offsets)

    def _get(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def owners(self) -> np.ndarray:
        """The client of each entry of ``flat``, int64 (for vectorised per-client counts)."""
        return np.repeat(np.arange(self.num_partitions, dtype=np.int64), self.sizes())


class DrawnPartitions(Partitions):
    """Client i's indices are ``draw(i)``, ``size`` of them, computed on access (seeded,
    so the same on every call and in every process)."""

    def __init__(self, num_partitions: int, size: int, draw: Callable[[int], np.ndarray]) -> None:
        self.num_partitions, self.size, self._draw = num_partitions, size, draw

    def _get(self, i: int) -> np.ndarray:
        out = self._draw(i)
        out.flags.writeable = False
        return out

    def sizes(self) -> np.ndarray:
        return np.full(self.num_partitions, self.size, dtype=np.int64)

    @property
    def overlapping(self) -> bool:
        return True


_HOLD_OUT = 0x7E57  # purpose of the hold-out permutations


class HeldOut(Partitions):
    """One side of every client's (training, held-out test) split of ``base``, computed on
    access: a fraction ``fraction`` of client i's examples (at least one, at most all but
    one), chosen by a permutation seeded with (seed, i), is held out; the rest, in their
    order, train. ``test`` picks the side."""

    def __init__(self, base: Partitions, fraction: float, seed: int, test: bool) -> None:
        self.base, self.fraction, self.seed, self.test = base, fraction, seed, test
        self.num_partitions = base.num_partitions

    def held(self, size: int) -> int:
        """How many of ``size`` examples are held out."""
        return min(size - 1, max(1, round(self.fraction * size)))

    def _get(self, i: int) -> np.ndarray:
        idx = self.base[i]
        k = self.held(len(idx))
        held = np.sort(np.random.default_rng(stream_seed(self.seed, i, _HOLD_OUT)).permutation(len(idx))[:k])
        if self.test:
            return idx[held]
        keep = np.ones(len(idx), bool)
        keep[held] = False
        return idx[keep]

    def sizes(self) -> np.ndarray:
        total = self.base.sizes()
        held = np.minimum(total - 1, np.maximum(1, np.round(self.fraction * total).astype(np.int64)))
        return held if self.test else total - held

    @property
    def overlapping(self) -> bool:
        return self.base.overlapping
