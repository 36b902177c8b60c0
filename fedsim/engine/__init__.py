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

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedsim.config import ConfigError, RunConfig
from fedsim.engine.settings import ENGINES, check_engine_options, engine_settings, parse_threads, parse_workers
from fedsim.errors import RunFailed
from fedsim.run_folder import RunFolder

if TYPE_CHECKING:
    from fedsim.callbacks import Callback

__all__ = ["ENGINES", "check_engine_options", "engine_settings", "parse_threads", "parse_workers", "run_engine"]


def run_engine(
    cfg: RunConfig,
    engine: str = "inprocess",
    *,
    workers: int | str | None = None,
    threads: int | None = None,
    cpus_per_client: float = 1.0,
    gpus_per_client: float | None = None,
    callbacks: Sequence[Callback] = (),
    quiet: bool = False,
    app: Path | None = None,
    ray_address: str | None = None,
) -> Path:
    """Run ``cfg`` (``results_dir`` set) to the end on ``engine`` and return its results
    folder, with ``engine_settings`` (``engine_settings()``) in its summary.json: the
    in-process engine writes them with the summary, Flower's runtime (whose ServerApp
    cannot see these settings) gets them added here.

    inprocess: ``workers`` (default "auto"), ``threads`` (default 1), ``callbacks`` (your
    own fedsim.callbacks objects, beside those the run config names), ``quiet`` (hide
    Flower's per-round INFO lines). flower:
    ``cpus_per_client``, ``gpus_per_client`` (None: fedsim.device's share), ``quiet``
    (Flower's streamed log is shown only if the run fails), ``app`` (the Flower app to
    run, a user's project whose components are fedsim's apps; default: fedsim's own),
    ``ray_address`` (Flower's simulation joins this Ray cluster; None: a private local Ray).
    Raises ConfigError for a bad
    option, RunFailed when the run ended without a usable result (summary.json says why).
    """
    workers, threads = check_engine_options(engine, workers, threads)
    if not cfg.results_dir:
        raise ValueError("run_engine needs results_dir: the folder the run's results go to")
    if engine == "inprocess":
        from fedsim.engine import runner  # the module, so that a test may replace run_inprocess

        return runner.run_inprocess(
            cfg, threads=1 if threads is None else threads, workers="auto" if workers is None else workers,
            callbacks=callbacks, quiet=quiet,
        )
    if callbacks:
        raise ConfigError(
            "callback objects run in this process, on the inprocess engine only; on --engine flower name them in the "
            "run config (tensorboard, mlflow, callbacks = 'module:attr')"
        )
    from fedsim.engine import flower_runtime  # lazy: the CLI imports this module before any engine

    gpus = flower_runtime.gpu_share(cfg, cpus_per_client, gpus_per_client)
    settings = engine_settings(engine, cpus_per_client=cpus_per_client, gpus_per_client=gpus)
    folder = RunFolder(Path(cfg.results_dir))
    try:
        out = flower_runtime.run_flower(
            cfg, cpus_per_client=cpus_per_client, gpus_per_client=gpus, echo=not quiet, app=app, ray_address=ray_address,
        )
    except RunFailed:  # raised once the summary saying why is written: it gets the settings too
        if folder.read_summary() is not None:
            folder.add_to_summary(engine_settings=settings)
        raise
    failed = folder.add_to_summary(engine_settings=settings).get("failed")
    if failed:  # Flower's runtime only logs a failed run; here it is an error
        raise RunFailed(f"{failed}; results in {out}")
    return out
