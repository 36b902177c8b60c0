"""Run an experiment on the in-process engine: the project's ServerApp and ClientApp,
one process, ``num-nodes`` simulated nodes."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict

from fedsim.config import RunConfig
from fedsim.engine import parse_threads, parse_workers
from fedsim.engine.flower_internals import SUPERLINK_NODE_ID
from fedsim.engine.inprocess import InProcessGrid


def run_inprocess(
    run_config: RunConfig | Mapping[str, Any],
    node_configs: list[dict[str, Any]] | None = None,
    threads: int = 1,
    on_round: Callable[[Any], None] | None = None,
    quiet: bool = False,
    workers: int | str = "auto",
) -> Path:
    """Run ``run_config`` (a RunConfig, or a run-config mapping that RunConfig validates;
    must set ``results-dir``) to the end and return the results folder. ``threads``: torch
    intra-op threads per worker (more than 1 lets torch split its sums, so results then
    depend on it). ``quiet``: hide Flower's per-round INFO log lines (warnings, e.g.
    rejected replies, still show). ``workers``: "auto" plans each round on the available
    cores (``fedsim.engine.inprocess.plan_round``), a number runs clients on that many
    threads; results are the same bits for any value. ``fedsim.engine.run_engine`` calls
    this and records ``threads`` and ``workers`` in the run's summary.json."""
    import torch

    from fedsim.client_app import app as client_app
    from fedsim.server_app import app as server_app

    cfg = run_config if isinstance(run_config, RunConfig) else RunConfig.from_mapping(run_config)
    if not cfg.results_dir:
        raise ValueError("run_inprocess needs results-dir: the folder the run's results go to")
    torch.set_num_threads(parse_threads(threads))
    keep_freed_memory()
    mapping = cfg.to_mapping()  # Flower's boundary: the grid and the Context carry the mapping
    grid = InProcessGrid(client_app, cfg.num_nodes, mapping, node_configs, workers=parse_workers(workers))
    grid.on_round = on_round  # the ServerApp reports each round to this hook when present
    context = Context(run_id=grid.run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config=mapping)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if quiet:
        flwr_logger.setLevel(logging.WARNING)
    try:
        server_app(grid, context)
    finally:
        flwr_logger.setLevel(level)
        grid.close()
    return Path(cfg.results_dir)


@functools.cache
def keep_freed_memory() -> bool:
    """glibc's malloc: keep freed memory for reuse instead of handing each large block back to
    the OS (mmap threshold 32 MiB, trim threshold 1 GiB), so that a training step's tensors
    reuse mapped pages instead of page-faulting in fresh ones: 0-35% less time per example
    for the MNIST CNN on one thread in the runs here (most for large batches; README
    "Speed"). The process keeps its peak memory. Whether
    it applied; not where MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ are set, nor
    without glibc. Arithmetic is unchanged."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
