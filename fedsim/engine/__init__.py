"""The engines that run an experiment, and ``run_engine``, the one place that picks one.

- ``inprocess`` (``fedsim.engine.runner.run_inprocess``): fedsim's in-process engine,
  one process; ``workers`` ("auto", the default, or a number of threads; the same
  results for any value).
- ``flower`` (``fedsim.engine.flower_runtime.run_flower``): Flower's simulation runtime
  (Ray) behind a private SuperLink; each client gets ``cpus_per_client`` CPUs and
  ``gpus_per_client`` of a GPU.

This module imports nothing heavy (no torch, no flwr): the CLI checks its options with
it before it creates a folder or loads an engine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsim.config import ConfigError, RunConfig
from fedsim.errors import RunFailed
from fedsim.run_folder import RunFolder

ENGINES = ("inprocess", "flower")

__all__ = ["ENGINES", "check_engine_options", "parse_workers", "run_engine"]


def parse_workers(value: int | str) -> int | str:
    """"auto" or an int >= 1 (also as text); ConfigError (one line, exit 2 from the CLI) otherwise."""
    number = value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        number = int(text) if text.isdigit() else 0
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ConfigError(f"workers must be 'auto' or an integer >= 1, got {value!r} (--workers or FEDSIM_WORKERS)")
    return number


def check_engine_options(engine: str, workers: int | str | None = None) -> None:
    """Raise ConfigError for an unknown engine or a bad ``workers`` (None: not given)."""
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: choose one of {list(ENGINES)} (--engine)")
    if workers is not None:
        parse_workers(workers)


def run_engine(
    cfg: RunConfig,
    engine: str = "inprocess",
    *,
    workers: int | str | None = None,
    cpus_per_client: float = 1.0,
    gpus_per_client: float | None = None,
    on_round: Callable[[Any], None] | None = None,
    quiet: bool = False,
) -> Path:
    """Run ``cfg`` (``results_dir`` set) to the end on ``engine`` and return its results
    folder.

    inprocess: ``workers`` (default "auto"; ignored by flower), ``on_round`` (called
    with each round's row), ``quiet`` (hide Flower's per-round INFO lines). flower:
    ``cpus_per_client``, ``gpus_per_client`` (None: fedsim.device's share), ``quiet``
    (Flower's streamed log is shown only if the run fails). Raises ConfigError for a bad
    option, RunFailed when the run ended without a usable result (summary.json says why).
    """
    check_engine_options(engine, workers)
    if not cfg.results_dir:
        raise ValueError("run_engine needs results_dir: the folder the run's results go to")
    run: Callable[[], Path]
    if engine == "inprocess":
        from fedsim.engine import runner  # the module, so that a test may replace run_inprocess

        def run() -> Path:
            return runner.run_inprocess(cfg, workers=workers, on_round=on_round, quiet=quiet)
    else:
        if on_round is not None:
            raise ValueError("on_round is the inprocess engine's; Flower's runtime reports rounds in its log")
        from fedsim.engine import flower_runtime

        gpus = flower_runtime.gpu_share(cfg, cpus_per_client, gpus_per_client)

        def run() -> Path:
            return flower_runtime.run_flower(cfg, cpus_per_client=cpus_per_client, gpus_per_client=gpus, echo=not quiet)

    out = run()
    failed = (RunFolder(out).read_summary() or {}).get("failed")
    if failed:  # the in-process engine raises RunFailed itself; Flower's runtime only logs it
        raise RunFailed(f"{failed}; results in {out}")
    return out
