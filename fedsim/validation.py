"""Checks of a run config against its data, made before any folder is created or any
process is started (``fedsim run``, ``fedsim sweep``, the ServerApp).

``RunConfig.validate`` checks values on their own; ``check_experiment`` loads the
dataset (cached per process, so the run that follows does not load it again) and checks
what depends on it and on this machine: the device, the data files, the model against the data's shape, the
partitioning against the number of clients, examples and labels, the batch-size table.
"""

from __future__ import annotations

from fedsim.config import ConfigError, RunConfig


def check_experiment(cfg: RunConfig, num_nodes: int | None = None) -> None:
    """Raise ConfigError naming the key and what to do if ``cfg`` cannot run on its data
    with ``num_nodes`` clients (default: the config's ``num-nodes``)."""
    from fedsim.partitions.batch_sizes import client_batch_sizes
    from fedsim.runtime import input_transforms
    from fedsim.data import DataError, load_dataset
    from fedsim.data.paths import given_dir
    from fedsim.device import resolve_device
    from fedsim.partitions import partition_indices

    nodes = cfg.num_nodes if num_nodes is None else num_nodes
    resolve_device(cfg.device)  # CUDA asked for where there is none
    try:
        if cfg.data_dir:  # checked for every dataset: a mistyped folder is a mistake even where it is not read
            given_dir(cfg.data_dir)
        splits = load_dataset(cfg.dataset, cfg.data_dir or None)
    except DataError as err:
        raise ConfigError(f"dataset={cfg.dataset!r}, data-dir={cfg.data_dir!r}: {err}") from None
    input_transforms(cfg.dataset, splits.input_shape, cfg.model_name)  # raises ConfigError naming both shapes
    try:
        partition_indices(splits.y_train.numpy(), cfg.partitioning, nodes, cfg.seed)
    except ValueError as err:
        raise ConfigError(f"partitioning={cfg.partitioning!r} with {nodes} clients on {cfg.dataset}: {err}") from None
    try:
        client_batch_sizes(cfg.batch_size, cfg.batch_sizes, cfg.batch_mode, nodes, cfg.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
