"""What a run config means for one side of a run, resolved once: ``RunPlan``.

The facts derived from the config and the number of clients (the data set and its shape
and classes, the model, every client's examples and batch size, the attackers, the
server's device) are computed once per side and read by validation, the server and the
clients; nothing recomputes them per message. Building a plan is also the check of a
config against its data: a mistake is one ConfigError that names the key and what to do.

Server: ``server_plan(cfg, num_partitions)`` (``fedsim run`` builds it before any folder
is made; the run in the same process reuses it). Client: ``client_plan(cfg,
num_partitions)``, the partition count from its node config; each node resolves its own
device (fedsim.device.client_device), so a client's plan holds none. Plans are cached per
process (``release_plans``, called with fedsim.runtime.release_runtimes, drops them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedsim.attacks import HONEST, Attack, attacker_ids
from fedsim.config import ConfigError, RunConfig
from fedsim.data import DataError, augment_batch, center_crop
from fedsim.data.load import DatasetEntry, dataset_entry, load_dataset
from fedsim.data.paths import given_dir
from fedsim.data.splits import DatasetSplits
from fedsim.device import resolve_device
from fedsim.models import ModelEntry, model_entry
from fedsim.partitions import partition_indices
from fedsim.partitions.batch_sizes import client_batch_sizes

Transform = Callable[[torch.Tensor], torch.Tensor]
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True, eq=False)
class RunPlan:
    """A run config resolved against its data for ``num_partitions`` clients (module docstring)."""

    cfg: RunConfig
    dataset: DatasetEntry
    splits: DatasetSplits
    model: ModelEntry
    num_partitions: int
    partitions: tuple[np.ndarray, ...]  # client -> its example indices into the training set
    batch_sizes: tuple[int, ...]  # client -> its batch size (B = 0: the whole local set)
    attackers: tuple[int, ...]  # the attacking clients' partition ids, sorted
    augment: Augment | None  # training augmentation of a batch (None: none)
    eval_transform: Transform | None  # what the model's test inputs go through (None: nothing)
    device: torch.device | None  # the server's device; None in a client's plan

    @property
    def num_classes(self) -> int:
        return self.splits.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.splits.input_shape

    @property
    def model_name(self) -> str:
        return self.model.name

    def attack_of(self, partition_id: int) -> Attack:
        """What client ``partition_id`` does to its upload (HONEST unless it attacks)."""
        if partition_id not in self.attackers:
            return HONEST
        return Attack(self.cfg.attack, self.cfg.attack_scale, self.cfg.attack_noise)


def server_plan(cfg: RunConfig, num_partitions: int | None = None) -> RunPlan:
    """The server's plan for ``num_partitions`` clients (default: ``num-nodes``)."""
    return _plan(cfg, cfg.num_nodes if num_partitions is None else num_partitions, True)


def client_plan(cfg: RunConfig, num_partitions: int) -> RunPlan:
    """A client's plan, the number of partitions from its node config."""
    return _plan(cfg, num_partitions, False)


def release_plans() -> None:
    """Forget this process's plans (their data sets go with them)."""
    _plan.cache_clear()


@functools.lru_cache(maxsize=8)
def _plan(cfg: RunConfig, num_partitions: int, server: bool) -> RunPlan:
    device = resolve_device(cfg.device) if server else None  # CUDA asked for where there is none
    entry, splits = _data(cfg)
    model = model_entry(entry.default_model if cfg.model == "auto" else cfg.model)
    augment, transform = input_transforms(entry, splits.input_shape, model)
    labels = splits.y_train.numpy()
    try:
        parts = partition_indices(labels, cfg.partitioning, num_partitions, cfg.seed)
    except ValueError as err:
        raise ConfigError(f"partitioning={cfg.partitioning!r} with {num_partitions} clients on {cfg.dataset}: {err}") from None
    try:
        sizes = client_batch_sizes(cfg.batch_size, cfg.batch_sizes, cfg.batch_mode, num_partitions, cfg.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    attackers = attacker_ids(cfg.seed, num_partitions, min(cfg.attackers, num_partitions))
    return RunPlan(
        cfg, entry, splits, model, num_partitions, tuple(parts), tuple(sizes), tuple(attackers), augment, transform, device,
    )


def _data(cfg: RunConfig) -> tuple[DatasetEntry, DatasetSplits]:
    """The data set's entry and its loaded splits; ConfigError naming dataset and folder."""
    try:
        if cfg.data_dir:  # checked for every dataset: a mistyped folder is a mistake even where it is not read
            given_dir(cfg.data_dir)
        return dataset_entry(cfg.dataset), load_dataset(cfg.dataset, cfg.data_dir or None)
    except DataError as err:
        raise ConfigError(f"dataset={cfg.dataset!r}, data-dir={cfg.data_dir!r}: {err}") from None


def input_transforms(dataset: DatasetEntry, data_shape: tuple[int, ...], model: ModelEntry) -> tuple[Augment | None, Transform | None]:
    """(train augmentation, evaluation transform) for feeding ``dataset`` to ``model``.

    A model that takes smaller images than the dataset has (the FedAvg paper's CIFAR CNN:
    24x24 of 32x32) trains on random crops + flips and is evaluated on the centre crop;
    a full-size model of a "crop-flip" dataset trains on pad-4 random crops + flips. A
    model whose input does not fit the data is a ConfigError that names both shapes.
    """
    if model.input_shape is None:
        return None, None
    shape = "x".join(map(str, model.input_shape))
    mismatch = ConfigError(
        f"model {model.name!r} takes {shape} inputs but dataset {dataset.name!r} has {'x'.join(map(str, data_shape))}; "
        f"set model to one for this dataset (or model='auto')"
    )
    if len(model.input_shape) != 3 or len(data_shape) != 3:
        if tuple(model.input_shape) != tuple(data_shape):
            raise mismatch
        return None, None
    c, h, w = model.input_shape
    dc, dh, dw = data_shape
    if c != dc or h > dh or w > dw or h != w:
        raise mismatch
    if h < dh:
        return functools.partial(augment_batch, pad=0, flip=True, size=h), functools.partial(center_crop, size=h)
    if dataset.augment == "crop-flip":
        return augment_batch, None
    return None, None
