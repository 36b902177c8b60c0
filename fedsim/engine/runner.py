"""Run an experiment on the in-process engine: the ServerApp's run_experiment and the ClientApp,
one process, ``num-nodes`` simulated nodes."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedsim.callbacks import Callback
from fedsim.client_app import app as client_app
from fedsim.config import RunConfig
from fedsim.engine.inprocess import InProcessGrid
from fedsim.engine.settings import engine_settings
from fedsim.parallel import available_cores
from fedsim.runtime import release_runtimes
from fedsim.server_app import run_experiment
from fedsim.validation import load_config


def run_inprocess(
    run_config: RunConfig | Mapping[str, Any],
    node_configs: list[dict[str, Any]] | None = None,
    threads: int = 1,
    callbacks: Sequence[Callback] = (),
    quiet: bool = False,
    workers: int | str = "auto",
) -> Path:
    """Run ``run_config`` (a RunConfig, or a run-config mapping that ``load_config``
    checks; ``results-dir`` set) to the end and return the results folder.
    ``threads``: torch intra-op threads per worker (more than 1 lets torch split its sums,
    so results then depend on it). ``callbacks``: the caller's (fedsim.callbacks), after
    the row is recorded. ``quiet``: hide Flower's per-round INFO log lines (warnings,
    e.g. rejected replies, still show). ``workers``: "auto" plans each round on the
    available cores (``fedsim.engine.inprocess.plan_round``), a number runs clients on
    that many threads; the LLR vote's blocks use as many cores; results are the same bits
    for any value. Both are recorded in the run's summary.json (``engine_settings``).
    ``threads`` and ``workers`` are taken as checked (``fedsim.engine.check_engine_options``)."""
    cfg = run_config if isinstance(run_config, RunConfig) else load_config(run_config)
    if not cfg.results_dir:
        raise ValueError("run_inprocess needs results-dir: the folder the run's results go to")
    torch.set_num_threads(threads)
    keep_freed_memory()
    mapping = cfg.to_mapping()  # Flower's boundary: the grid and the clients' Contexts carry the mapping
    grid = InProcessGrid(client_app, cfg.num_nodes, mapping, node_configs, workers=workers)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if quiet:
        flwr_logger.setLevel(logging.WARNING)
    cores = available_cores() if workers == "auto" else int(workers)
    try:
        run_experiment(
            grid, cfg, engine=InProcessGrid.engine_name, callbacks=callbacks, cores=cores * threads,
            engine_settings=engine_settings(InProcessGrid.engine_name, threads=threads, workers=workers),
        )
    finally:
        flwr_logger.setLevel(level)
        grid.close()
        release_runtimes()  # the run's datasets, models and plans go with it (fedsim.runtime)
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
