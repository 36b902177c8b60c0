"""Blocks of coordinates, and how a caller runs a function over them.

The votes work on blocks of ``BLOCK`` coordinates: an M x BLOCK float temporary stays in
cache and below the allocator's mmap threshold (no page faults per round), whatever N is.
A ``BlockMap`` runs ``fn(block)`` for every block, in any order and on any thread, and
returns when all are done; blocks never touch each other's memory, so every BlockMap
gives the same bits. Which threads run them is not decided here (fedsim.parallel).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

BLOCK = 1 << 16

BlockMap = Callable[[Callable[[Any], None], Sequence[Any]], None]


def sequential_blocks(fn: Callable[[Any], None], blocks: Sequence[Any]) -> None:
    """The BlockMap of one thread: fn(b) for every block, in order."""
    for block in blocks:
        fn(block)


def coordinate_blocks(n: int, size: int = BLOCK) -> list[slice]:
    """Slices of ``size`` coordinates covering 0..n-1, in order."""
    return [slice(start, start + size) for start in range(0, n, size)]
