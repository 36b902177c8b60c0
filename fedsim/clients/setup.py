"""A client's long-lived pieces (device, data, model), built once per process.

In Flower's simulation an actor process serves many nodes and many messages, and in
fedsim's in-process engine all nodes share one process: data and models are cached here
so that a message costs only its computation. In deployment every message starts a fresh
process and these caches simply start empty.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedsim.clients.batch_sizes import client_batch_sizes
from fedsim.clients.tasks import LocalData
from fedsim.config import ConfigError, RunConfig


_LOAD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def device_dataset(dataset: str, data_dir: str, device: torch.device):
    """The dataset's tensors, moved to ``device`` once per process."""
    from fedsim.data import load_dataset  # lazy: keeps the client module's import light

    splits = load_dataset(dataset, data_dir or None)
    return (
        splits.x_train.to(device),
        splits.y_train.to(device),
        splits.x_test.to(device),
        splits.y_test.to(device),
        splits,
    )


@functools.lru_cache(maxsize=64)
def _thread_model(name: str, num_classes: int, device: torch.device, thread: int) -> nn.Module:
    """One model object per (name, device, thread) in this process; clients load weights
    into it. Per thread so that the in-process engine's worker threads never share one."""
    from fedsim.models import build_model

    return build_model(name, num_classes=num_classes, seed=0).to(device)  # weights are overwritten per message; seed only to leave the global RNG alone


def input_transforms(
    dataset: str, data_shape: tuple[int, int, int], model_name: str
) -> tuple[Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None, Callable[[torch.Tensor], torch.Tensor] | None]:
    """(train augmentation, evaluation transform) for feeding ``dataset`` to the model.

    A model that takes smaller images than the dataset has (the FedAvg paper's CIFAR CNN:
    24x24 of 32x32) trains on random crops + flips and is evaluated on the centre crop;
    a full-size CIFAR model trains on pad-4 random crops + flips. A model whose input
    does not fit the data is a ConfigError that names both shapes.
    """
    from fedsim.data import augment_batch, center_crop
    from fedsim.models import MODEL_INPUT_SHAPES

    c, h, w = MODEL_INPUT_SHAPES[model_name]
    dc, dh, dw = data_shape
    if c != dc or h > dh or w > dw or h != w:
        raise ConfigError(
            f"model {model_name!r} takes {c}x{h}x{w} inputs but dataset {dataset!r} has {dc}x{dh}x{dw}; "
            f"set model to one for this dataset (or model='auto')"
        )
    if h < dh:
        return functools.partial(augment_batch, pad=0, flip=True, size=h), functools.partial(center_crop, size=h)
    if dataset == "cifar10":
        return augment_batch, None
    return None, None


@functools.lru_cache(maxsize=8)
def device_partitions(
    dataset: str, data_dir: str, partitioning: str, num_partitions: int, seed: int, device: torch.device
) -> list[torch.Tensor]:
    """Every client's example indices (flwr-datasets partitioners), on ``device``."""
    from fedsim.partitions import partition_indices

    splits = device_dataset(dataset, data_dir, device)[4]
    parts = partition_indices(splits.y_train.numpy(), partitioning, num_partitions, seed)
    return [torch.as_tensor(p, dtype=torch.long, device=device) for p in parts]


@dataclass
class ClientSetup:
    """What a client needs for a train message."""

    partition_id: int
    num_partitions: int
    batch_size: int
    data: LocalData
    model: nn.Module
    device: torch.device

    @property
    def param_names(self) -> list[str]:
        """Names of the trainable parameters, in ``model.parameters()`` order."""
        return _model_facts(self.model)[0]

    @property
    def float_buffers(self) -> dict[str, torch.Tensor]:
        """Float state that is not a parameter (BatchNorm running statistics), live views."""
        return _model_facts(self.model)[1]


@functools.lru_cache(maxsize=64)
def _model_facts(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    params = [n for n, p in model.named_parameters() if p.requires_grad]
    all_params = {n for n, _ in model.named_parameters()}
    buffers = {k: v for k, v in model.state_dict().items() if k not in all_params and v.is_floating_point()}
    return params, buffers


def client_setup(
    cfg: RunConfig, partition_id: int, num_partitions: int, node_batch_size: int | None, device: torch.device
) -> ClientSetup:
    """The client's data view, model and batch size (node config's batch size wins) on
    ``device`` (fedsim.device.client_device); built once per (config, node, device,
    thread) in this process."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    return _client_setup(cfg, partition_id, num_partitions, node_batch_size, device, threading.get_ident())


@functools.lru_cache(maxsize=4096)
def _client_setup(
    cfg: RunConfig, partition_id: int, num_partitions: int, node_batch_size: int | None, device: torch.device, thread: int
) -> ClientSetup:
    with _LOAD_LOCK:  # concurrent first calls (worker threads) would each load the dataset
        x, y, _, _, splits = device_dataset(cfg.dataset, cfg.data_dir, device)
        parts = device_partitions(cfg.dataset, cfg.data_dir, cfg.partitioning, num_partitions, cfg.seed, device)
    indices = parts[partition_id]
    if node_batch_size is None:
        sizes = client_batch_sizes(cfg.batch_size, cfg.batch_sizes, cfg.batch_mode, num_partitions, cfg.seed)
        batch_size = sizes[partition_id]
    else:
        batch_size = node_batch_size
    augment, _ = input_transforms(cfg.dataset, splits.input_shape, cfg.model_name)
    data = LocalData(x=x, y=y, indices=indices, augment=augment)
    model = _thread_model(cfg.model_name, splits.num_classes, device, thread)
    return ClientSetup(partition_id, num_partitions, batch_size, data, model, device)


