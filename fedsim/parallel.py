"""How much of the machine a run uses: cores, and the thread pools that share them.

The math in ``fedsim.core`` takes a ``BlockMap`` (``map_blocks(fn, blocks)``) and never
owns threads; this module decides how blocks run: in order on the calling thread, or on
one shared pool per thread count (torch releases the GIL in its kernels, so blocks of
coordinates that touch disjoint memory run truly in parallel, with the same bits).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fedsim.core.blocks import BlockMap, sequential_blocks

_POOLS: dict[int, ThreadPoolExecutor] = {}


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ThreadBlocks:
    """A BlockMap on ``threads`` threads: one pool per thread count, shared by every caller
    of the process (concurrent maps queue in it); ``threads`` < 2 or one block: in order
    on the calling thread."""

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads

    def __call__(self, fn: Callable[[Any], None], blocks: Sequence[Any]) -> None:
        if self.threads < 2 or len(blocks) < 2:
            sequential_blocks(fn, blocks)
            return
        if self.threads not in _POOLS:
            _POOLS[self.threads] = ThreadPoolExecutor(self.threads, thread_name_prefix="fedsim-vote")
        for _ in _POOLS[self.threads].map(fn, blocks):  # consumes the iterator: a block's error is raised here
            pass


def block_map(threads: int) -> BlockMap:
    """The BlockMap of ``threads`` threads (``ThreadBlocks``)."""
    return ThreadBlocks(threads)
