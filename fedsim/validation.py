"""Reading a run config: ``load_config`` parses it with the algorithms' keys and checks
every value against the registries (algorithms, data sets, models, attacks, devices,
partitionings), before any data is loaded. What a config means for a run, checked
against the data, is ``fedsim.plan``'s.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from fedsim.algorithms import REGISTRY, options
from fedsim.algorithms.aggregating import AGGREGATOR
from fedsim.attacks import ATTACKS
from fedsim.config import MAX_BATCH_SIZE, ConfigError, RunConfig, batch_size_cap_message
from fedsim.data.formats import USER_FORMATS
from fedsim.data.load import DATASETS
from fedsim.device import DEVICE_FORMS, valid_device_name
from fedsim.models import MODELS
from fedsim.partitions import PartitionSpec
from fedsim.partitions.batch_sizes import parse_batch_sizes
from fedsim.plugins import is_import_path


def load_config(values: Mapping[str, Any]) -> RunConfig:
    """The RunConfig of a Flower run config (kebab-case keys); ConfigError naming the
    first unknown key or invalid value, and what to do."""
    strategy = values.get("strategy", RunConfig.strategy)
    used = frozenset(o.key for o in REGISTRY[strategy].all_options()) if isinstance(strategy, str) and strategy in REGISTRY else None
    cfg = RunConfig.from_mapping(values, options=options(), used=used)
    check_names(cfg)
    return cfg


def load_config_cached(values: Mapping[str, Any]) -> RunConfig:
    """``load_config``, memoised on the values (a client reads the same config per message)."""
    return _cached(tuple(sorted(values.items())))


@functools.lru_cache(maxsize=64)
def _cached(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return load_config(dict(items))


def check_names(cfg: RunConfig) -> None:
    """Raise ConfigError for a value that no registry knows, or that does not apply."""
    attacks = REGISTRY[cfg.strategy].attacks if cfg.strategy in REGISTRY else ()
    downlinks = REGISTRY[cfg.strategy].downlinks if cfg.strategy in REGISTRY else ("model",)
    votes = [name for name, cls in REGISTRY.items() if cfg.downlink in cls.downlinks]
    checks = [
        (cfg.strategy in REGISTRY, f"strategy={cfg.strategy!r}: choose one of {list(REGISTRY)}"),
        (cfg.dataset in DATASETS or cfg.dataset in USER_FORMATS or is_import_path(cfg.dataset),
         f"dataset={cfg.dataset!r}: choose one of {list(DATASETS)}, or your own data: {', '.join(USER_FORMATS)} "
         "(files at data-dir) or a loader of yours as 'package.module:attr'"),
        (cfg.model == "auto" or cfg.model in MODELS or is_import_path(cfg.model),
         f"model={cfg.model!r}: choose 'auto', one of {sorted(MODELS)}, or a model of yours as 'package.module:attr'"),
        (valid_device_name(cfg.device), f"device={cfg.device!r}: choose {DEVICE_FORMS}"),
        (cfg.attack in ATTACKS, f"attack={cfg.attack!r}: choose one of {list(ATTACKS)}"),
        (cfg.attackers == 0 or cfg.attack in attacks,
         f"attack={cfg.attack!r} does not apply to strategy={cfg.strategy!r}: choose one of {list(attacks)}"),
        (cfg.downlink in downlinks,
         f"downlink={cfg.downlink!r} does not apply to strategy={cfg.strategy!r}: it works with {votes}; use downlink = 'model'"),
        (not cfg.loss or is_import_path(cfg.loss), f"loss={cfg.loss!r}: expected 'package.module:fn' (or '' for cross-entropy)"),
        (not cfg.metrics or is_import_path(cfg.metrics), f"metrics={cfg.metrics!r}: expected 'package.module:fn' (or '' for accuracy)"),
        (cfg.option("aggregator") == "mean" or cfg.strategy not in REGISTRY or AGGREGATOR in REGISTRY[cfg.strategy].all_options(),
         f"aggregator={cfg.option('aggregator')!r} does not apply to strategy={cfg.strategy!r}: it applies to "
         f"{[n for n, c in REGISTRY.items() if AGGREGATOR in c.all_options()]} (the sign votes have their own rules); set aggregator='mean'"),
        (all(is_import_path(c) for c in callback_paths(cfg)),
         f"callbacks={cfg.callbacks!r}: expected comma-separated 'package.module:attr' names"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        PartitionSpec.parse(cfg.partitioning)
        sizes = parse_batch_sizes(cfg.batch_sizes, cfg.num_nodes) if cfg.batch_sizes else []
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for pid, size in enumerate(sizes):
        if size > MAX_BATCH_SIZE:
            raise ConfigError(batch_size_cap_message(f"batch-sizes={cfg.batch_sizes!r}: entry {pid} (partition-id {pid}) is {size}"))
    problem = REGISTRY[cfg.strategy].config_problem(cfg)
    if problem is not None:
        raise ConfigError(problem)


def callback_paths(cfg: RunConfig) -> list[str]:
    """The user callbacks the run config names (``callbacks``, comma-separated)."""
    return [c.strip() for c in cfg.callbacks.split(",") if c.strip()]
