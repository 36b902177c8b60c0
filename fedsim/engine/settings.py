"""The engines' settings, checked once: which engine, its workers and threads, and what
summary.json records of them (``engine_settings``). A leaf: no torch, no flwr, so that the
CLI checks its options before it creates a folder or loads an engine."""

from __future__ import annotations

from typing import Any

from fedsim.config import ConfigError

ENGINES = ("inprocess", "flower")


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


def check_engine_options(
    engine: str, workers: int | str | None = None, threads: int | None = None
) -> tuple[int | str | None, int | None]:
    """``(workers, threads)`` parsed (None: not given); ConfigError for an unknown engine,
    a bad ``workers`` or ``threads``, or either given for an engine that does not take them."""
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: choose one of {list(ENGINES)} (--engine)")
    if engine != "inprocess" and (workers is not None or threads is not None):
        raise ConfigError(
            "--workers and --threads set the inprocess engine; on --engine flower each client gets "
            "--cpus-per-client CPUs and --gpus-per-client of a GPU"
        )
    return (None if workers is None else parse_workers(workers), None if threads is None else parse_threads(threads))
