"""The engines that run an experiment, and ``run_engine``, the one place that picks one.

- ``inprocess`` (``fedsim.engine.runner.run_inprocess``): fedsim's in-process engine,
  one process; ``threads`` torch intra-op threads per worker (default 1; more lets torch
  split its sums, which changes results in the last bits) and ``workers`` ("auto", the
  default, or a number of threads; the same results for any value).
- ``flower`` (``fedsim.engine.flower_runtime.run_flower``): Flower's simulation runtime
  (Ray) behind a private SuperLink; each client gets ``cpus_per_client`` CPUs and
  ``gpus_per_client`` of a GPU.

``run_engine`` records the settings it ran with in the run's ``summary.json``
(``engine_settings``). This module imports nothing heavy (no torch, no flwr): the CLI
checks its options with it before it creates a folder or loads an engine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsim.config import ConfigError, RunConfig
from fedsim.errors import RunFailed
from fedsim.run_folder import RunFolder

ENGINES = ("inprocess", "flower")

__all__ = ["ENGINES", "check_engine_options", "engine_settings", "parse_threads", "parse_workers", "run_engine"]


def engine_settings(
    engine: str, threads: int | None = None, workers: int | str | None = None,
    cpus_per_client: float | None = None, gpus_per_client: float | None = None,
) -> dict[str, Any]:
    """What summary.json records as ``engine_settings``: every key, None where the engine
    does not take the setting."""
    return {"engine": engine, "threads": threads, "workers": workers, "cpus_per_client": cpus_per_client, "gpus_per_client": gpus_per_client}


def parse_workers(value: int | str) -> int | str:
    """"auto" or an int >= 1 (also as text); ConfigError (one line, exit 2 from the CLI) otherwise."""
    number = value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        number = int(text) if text.isdigit() else 0
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ConfigError(f"workers must be 'auto' or an integer >= 1, got {value!r} (--workers)")
    return number


def parse_threads(value: int) -> int:
    """An int >= 1; ConfigError (one line, exit 2 from the CLI) otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"threads must be an integer >= 1, got {value!r} (--threads)")
    return value


def check_engine_options(engine: str, workers: int | str | None = None, threads: int | None = None) -> None:
    """Raise ConfigError for an unknown engine, a bad ``workers`` or ``threads``, or either
    given for an engine that does not take them (None: not given)."""
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: choose one of {list(ENGINES)} (--engine)")
    if engine != "inprocess" and (workers is not None or threads is not None):
        raise ConfigError(
            "--workers and --threads set the inprocess engine; on --engine flower each client gets "
            "--cpus-per-client CPUs and --gpus-per-client of a GPU"
        )
    if workers is not None:
        parse_workers(workers)
    if threads is not None:
        parse_threads(threads)


def run_engine(
    cfg: RunConfig,
    engine: str = "inprocess",
    *,
    workers: int | str | None = None,
    threads: int | None = None,
    cpus_per_client: float = 1.0,
    gpus_per_client: float | None = None,
    on_round: Callable[[Any], None] | None = None,
    quiet: bool = False,
) -> Path:
    """Run ``cfg`` (``results_dir`` set) to the end on ``engine`` and return its results
    folder, with ``engine_settings`` (``engine_settings()``) in its summary.json: the
    in-process engine writes them with the summary, Flower's runtime (whose ServerApp
    cannot see these settings) gets them added here.

    inprocess: ``workers`` (default "auto"), ``threads`` (default 1), ``on_round`` (called
    with each round's row), ``quiet`` (hide Flower's per-round INFO lines). flower:
    ``cpus_per_client``, ``gpus_per_client`` (None: fedsim.device's share), ``quiet``
    (Flower's streamed log is shown only if the run fails). Raises ConfigError for a bad
    option, RunFailed when the run ended without a usable result (summary.json says why).
    """
    check_engine_options(engine, workers, threads)
    if not cfg.results_dir:
        raise ValueError("run_engine needs results_dir: the folder the run's results go to")
    if engine == "inprocess":
        from fedsim.engine import runner  # the module, so that a test may replace run_inprocess

        return runner.run_inprocess(
            cfg, threads=1 if threads is None else threads, workers="auto" if workers is None else workers,
            on_round=on_round, quiet=quiet,
        )
    if on_round is not None:
        raise ValueError("on_round is the inprocess engine's; Flower's runtime reports rounds in its log")
    from fedsim.engine import flower_runtime

    gpus = flower_runtime.gpu_share(cfg, cpus_per_client, gpus_per_client)
    settings = engine_settings(engine, cpus_per_client=cpus_per_client, gpus_per_client=gpus)
    folder = RunFolder(Path(cfg.results_dir))
    try:
        out = flower_runtime.run_flower(cfg, cpus_per_client=cpus_per_client, gpus_per_client=gpus, echo=not quiet)
    except RunFailed:  # raised once the summary saying why is written: it gets the settings too
        if folder.read_summary() is not None:
            folder.add_to_summary(engine_settings=settings)
        raise
    failed = folder.add_to_summary(engine_settings=settings).get("failed")
    if failed:  # Flower's runtime only logs a failed run; here it is an error
        raise RunFailed(f"{failed}; results in {out}")
    return out
