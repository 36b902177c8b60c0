"""What a run config means for one side of a run, resolved once: ``RunPlan``.

The facts derived from the config and the number of clients (the data set and its shape
and classes, the model, every client's examples and batch size, the server's device; the
attackers come from the config alone, so both sides agree on them) are computed once per side and read by validation, the server and the
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

from fedsim.attacks import HONEST, SERVER_PLAYED, Attack, run_attackers
from fedsim.config import ConfigError, RunConfig, parse_shape
from fedsim.data import DataError, augment_batch, center_crop
from fedsim.data.formats import USER_FORMATS
from fedsim.data.load import DatasetEntry, DataSpec, dataset_entry, load_data
from fedsim.data.paths import given_dir
from fedsim.data.splits import DatasetSplits
from fedsim.device import resolve_device
from fedsim.models import ModelEntry, build_model, count_parameters, model_entry
from fedsim.objective import Objective, checked_metrics, user_objective
from fedsim.partitions import HeldOut, IndexTable, Partitions, PartitionSpec, client_partitions
from fedsim.partitions.batch_sizes import client_batch_sizes

LABEL_SCHEMES = ("shards", "dirichlet", "labels")  # partitionings that read class labels

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
    partitions: Partitions  # client -> its example indices into the training set
    batch_sizes: tuple[int, ...]  # client -> its batch size (B = 0: the whole local set)
    attackers: tuple[int, ...]  # the attacking clients' partition ids, sorted (fedsim.attacks.run_attackers)
    augment: Augment | None  # training augmentation of a batch (None: none)
    eval_transform: Transform | None  # what the model's test inputs go through (None: nothing)
    device: torch.device | None  # the server's device; None in a client's plan
    objective: Objective  # the task's loss and metrics
    metric_names: tuple[str, ...]  # what the objective's metrics report
    num_params: int  # trainable parameters of the model
    local_test: Partitions | None = None  # client -> its held-out examples (federated evaluation)

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
        return Attack.of(self.cfg)


def own_data(cfg: RunConfig) -> bool:
    """Whether the run's nodes bring their own data: a user's format (``disk``,
    ``imagefolder``, ``npz``) and no ``data-dir`` on the server. Each node then names its
    files with ``--node-config "dataset-path=..."``; the server holds no training data."""
    return cfg.dataset in USER_FORMATS and not cfg.data_dir


def server_plan(cfg: RunConfig, num_partitions: int | None = None) -> RunPlan:
    """The server's plan for ``num_partitions`` clients (default: ``num-nodes``)."""
    n = cfg.num_nodes if num_partitions is None else num_partitions
    if not own_data(cfg):
        return _plan(cfg, n, True)
    try:
        return _plan_without_data(cfg, n)
    except ConfigError as err:
        raise ConfigError(
            f"dataset={cfg.dataset!r} with no data-dir is a run on the nodes' own data (each SuperNode's --node-config "
            f"\"dataset-path=...\"; to simulate on one folder, set data-dir): {err}"
        ) from None


def client_plan(cfg: RunConfig, num_partitions: int) -> RunPlan:
    """A client's plan, the number of partitions from its node config."""
    return _plan(cfg, num_partitions, False)


def release_plans() -> None:
    """Forget this process's plans (their data sets go with them)."""
    _plan.cache_clear()
    _plan_without_data.cache_clear()
    node_plan.cache_clear()


@functools.lru_cache(maxsize=8)
def _plan(cfg: RunConfig, num_partitions: int, server: bool) -> RunPlan:
    device = resolve_device(cfg.device) if server else None  # CUDA asked for where there is none
    entry, splits = _data(cfg)
    model = _model(cfg, entry, splits)
    augment, transform = input_transforms(entry, splits.input_shape, model)
    objective = user_objective(cfg.loss, cfg.metrics, splits.classification)
    names, num_params = check_model(model, objective, splits, transform)
    parts = _partitions(cfg, splits, num_partitions)
    local_test = None
    if cfg.eval_fraction > 0:
        parts, local_test = hold_out(parts, cfg.local_test_fraction, cfg.seed)
    try:
        sizes = client_batch_sizes(cfg.batch_size, cfg.batch_sizes, cfg.batch_mode, num_partitions, cfg.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    attackers = run_attackers(cfg)  # from num-nodes on both sides, not num_partitions (fedsim.attacks)
    return RunPlan(
        cfg, entry, splits, model, num_partitions, parts, tuple(sizes), tuple(attackers), augment, transform, device,
        objective, names, num_params, local_test,
    )


@functools.lru_cache(maxsize=4)
def _plan_without_data(cfg: RunConfig, num_nodes: int) -> RunPlan:
    """The server's plan of a run on the nodes' own data: the model, classes and input
    shape from the run config (``num-classes``, ``input-shape`` or the model's own), and
    the central test set ``server-test`` if given, else none (federated evaluation)."""
    entry = dataset_entry(cfg.dataset)
    if cfg.model == "auto":
        raise ConfigError("set model to yours ('package.module:Net') or a built-in")
    if cfg.attack in SERVER_PLAYED and (cfg.attackers or cfg.attacker_ids):
        raise ConfigError(f"attack={cfg.attack!r} is played by the server on the attackers' partition ids, and nodes on their own data have "
                          "none: choose another attack (and give the attacking nodes --node-config \"attacker=true\")")
    if cfg.normalize == "auto":
        raise ConfigError("normalize='auto' would standardise each device's data with its own mean and std; on the nodes' own data "
                          "set normalize='MEAN/STD' (e.g. '0.2860/0.3530') or 'none', so that every device and the server see the same inputs")
    model = model_entry(cfg.model)
    test = _server_test(cfg)
    splits = _shape_only(cfg, model, test)
    augment, transform = input_transforms(entry, splits.input_shape, model)
    objective = user_objective(cfg.loss, cfg.metrics, splits.classification)
    names, num_params = check_model(model, objective, splits, transform)
    return RunPlan(cfg, entry, splits, model, num_nodes, IndexTable.of([]), (), (), augment, transform, resolve_device(cfg.device),
                   objective, names, num_params, None)


def _server_test(cfg: RunConfig) -> DatasetSplits | None:
    """``server-test``'s examples (its test split, else all of it), or None."""
    if not cfg.server_test:
        return None
    spec = DataSpec(cfg.dataset, cfg.server_test, cfg.image_column, cfg.label_column, cfg.normalize, bool(cfg.loss), holdout=None)
    try:
        return load_data(spec)
    except DataError as err:
        raise ConfigError(f"server-test={cfg.server_test!r}: {err}") from None


def _shape_only(cfg: RunConfig, model: ModelEntry, test: DatasetSplits | None) -> DatasetSplits:
    """Splits with no training examples: the central test set (or none), the classes and
    input shape the run config (or the model, or the test set) gives; ConfigError when
    they are missing or disagree."""
    shape = parse_shape(cfg.input_shape) or model.input_shape or (test.input_shape if test is not None else ())
    k = cfg.num_classes or (test.num_classes if test is not None else 0)
    if not shape or not k:
        raise ConfigError("the server holds no data, so set num-classes and input-shape (e.g. num-classes=10 input-shape='1,28,28'), "
                          "or server-test to a test set")
    if test is not None and (tuple(test.input_shape) != tuple(shape) or test.num_classes > k):
        raise ConfigError(f"server-test={cfg.server_test!r} holds {test.input_shape} inputs and {test.num_classes} classes, "
                          f"but the run has input-shape {shape} and num-classes {k}")
    if test is None:
        x_test, y_test = torch.zeros((0, *shape)), torch.zeros(0, dtype=torch.int64)
    elif len(test.y_test):
        x_test, y_test = test.x_test, test.y_test  # its test split
    else:
        x_test, y_test = test.x_train, test.y_train  # all of it
    info = {"source": "the nodes' own data", "test": f"server-test {cfg.server_test}" if test is not None else "none (federated evaluation)"}
    return DatasetSplits(cfg.dataset, torch.zeros((0, *shape)), y_test[:0], x_test, y_test, k, info=info)


@functools.lru_cache(maxsize=4)
def node_plan(cfg: RunConfig, dataset_path: str) -> RunPlan:
    """A node's plan on its own data (``--node-config "dataset-path=..."``): its files in the
    run's format, its test split (or, for federated evaluation, ``local-test-fraction`` of
    them) held out; checked against the run's input shape and classes (ConfigError: the
    node replies with it and the server leaves it out)."""
    entry = dataset_entry(cfg.dataset)
    holdout = cfg.local_test_fraction if cfg.eval_fraction > 0 else None
    spec = DataSpec(cfg.dataset, dataset_path, cfg.image_column, cfg.label_column, cfg.normalize, bool(cfg.loss), holdout)
    try:
        mine = load_data(spec)
    except DataError as err:
        raise ConfigError(f"dataset-path={dataset_path!r}: {err}") from None
    model = model_entry(cfg.model)
    shape = parse_shape(cfg.input_shape) or model.input_shape or mine.input_shape
    if tuple(mine.input_shape) != tuple(shape) or (cfg.num_classes and mine.num_classes > cfg.num_classes):
        raise ConfigError(f"dataset-path={dataset_path!r} holds {'x'.join(map(str, mine.input_shape))} inputs and labels up to "
                          f"{mine.num_classes - 1}, but the run has input-shape {'x'.join(map(str, shape))} and num-classes {cfg.num_classes}")
    n = len(mine.y_train)
    x = torch.cat([mine.x_train, mine.x_test])
    y = torch.cat([mine.y_train, mine.y_test])
    splits = DatasetSplits(cfg.dataset, x, y, mine.x_test[:0], mine.y_test[:0], cfg.num_classes or mine.num_classes, info=mine.info)
    augment, transform = input_transforms(entry, splits.input_shape, model)
    objective = user_objective(cfg.loss, cfg.metrics, splits.classification)
    local_test = IndexTable.of([np.arange(n, len(y), dtype=np.int64)]) if cfg.eval_fraction > 0 else None
    return RunPlan(cfg, entry, splits, model, 1, IndexTable.of([np.arange(n, dtype=np.int64)]), (cfg.batch_size,), (), augment, transform,
                   None, objective, (), 0, local_test)


def _model(cfg: RunConfig, entry: DatasetEntry, splits: DatasetSplits) -> ModelEntry:
    """The model the config names; ``auto`` is the data set's default (a user's data has none)."""
    if cfg.model != "auto":
        return model_entry(cfg.model)
    if not entry.default_model:
        shape = "x".join(map(str, splits.input_shape))
        raise ConfigError(
            f"dataset={cfg.dataset!r} has no default model: set model to yours ('package.module:Net') "
            f"or a built-in that takes {shape} inputs"
        )
    return model_entry(entry.default_model)


def check_model(model: ModelEntry, objective: Objective, splits: DatasetSplits, transform: Transform | None) -> tuple[tuple[str, ...], int]:
    """One forward pass on two test examples: the model takes the data's inputs and gives
    one output per class (or target), the loss and metrics work on them. Returns the
    metrics' names and the model's parameter count; ConfigError naming both shapes."""
    x, y = splits.x_test[:2], splits.y_test[:2]
    if not len(x):  # a server without data: zeros of the run's input shape
        x, y = torch.zeros((2, *splits.input_shape)), torch.zeros((2, *splits.y_test.shape[1:]), dtype=splits.y_test.dtype)
    x = transform(x) if transform is not None else x
    net = build_model(model, num_classes=splits.num_classes, seed=0)
    where = f"model {model.name!r}"
    try:
        with torch.no_grad():
            out = net.eval()(x)
    except Exception as err:
        raise ConfigError(f"{where} cannot take inputs of shape {tuple(x.shape)} ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    want = (len(x), splits.num_classes) if splits.classification or y.dim() == 2 else (len(x),)
    fits = isinstance(out, torch.Tensor) and (tuple(out.shape) == want or (want == (len(x),) and tuple(out.shape) == (len(x), 1)))
    if not fits:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        what = f"{splits.num_classes} classes" if splits.classification else f"targets of shape {tuple(y.shape[1:]) or 'scalar'}"
        raise ConfigError(f"{where} gives outputs of shape {got} for inputs of shape {tuple(x.shape)}, but the data has {what}: expected {want}")
    return _metric_names(objective, out, y), count_parameters(net)


def _metric_names(objective: Objective, out: torch.Tensor, y: torch.Tensor) -> tuple[str, ...]:
    """The loss and metrics tried on a forward pass's outputs; the metrics' names."""
    try:
        float(objective.loss(out, y))
        values = objective.metrics(out, y) if objective.metrics is not None else {}
    except Exception as err:
        raise ConfigError(f"the loss or metrics fail on the model's outputs of shape {tuple(out.shape)}: {type(err).__name__}: {err}") from None
    return tuple(checked_metrics(values, "metrics"))


def _partitions(cfg: RunConfig, splits: DatasetSplits, num_partitions: int) -> Partitions:
    """Every client's training examples (flwr-datasets partitioners)."""
    spec = PartitionSpec.parse(cfg.partitioning)
    if spec.scheme in LABEL_SCHEMES and not splits.classification:
        raise ConfigError(f"partitioning={cfg.partitioning!r} splits by class label, but the targets are numbers (regression); use iid")
    labels = splits.y_train.numpy() if splits.classification else np.zeros(len(splits.y_train), np.int64)
    ids = None
    if spec.column:
        ids = (splits.columns or {}).get(spec.column)
        if ids is None:
            raise ConfigError(f"partitioning={cfg.partitioning!r}: the data has no column {spec.column!r} (it has {sorted(splits.columns or {})})")
    try:
        return client_partitions(labels, spec, num_partitions, cfg.seed, ids=ids)
    except ValueError as err:
        raise ConfigError(f"partitioning={cfg.partitioning!r} with {num_partitions} clients on {cfg.dataset}: {err}") from None


def hold_out(parts: Partitions, fraction: float, seed: int) -> tuple[Partitions, Partitions]:
    """Each client's examples split into (training, held-out test), computed per client on
    access (fedsim.partitions.HeldOut: a fraction ``fraction``, at least one, chosen by a
    permutation seeded with (seed, client); the rest, in their order, train). ConfigError
    for a client with fewer than two examples."""
    sizes = parts.sizes()
    if len(sizes) and int(sizes.min()) < 2:
        pid = int(np.argmin(sizes))
        raise ConfigError(f"client {pid} holds {int(sizes[pid])} example(s): federated evaluation (eval-fraction > 0) needs two or more per client")
    return HeldOut(parts, fraction, seed, test=False), HeldOut(parts, fraction, seed, test=True)


def _data(cfg: RunConfig) -> tuple[DatasetEntry, DatasetSplits]:
    """The data set's entry and its loaded splits; ConfigError naming dataset and folder."""
    spec = DataSpec(cfg.dataset, cfg.data_dir, cfg.image_column, cfg.label_column, cfg.normalize, bool(cfg.loss))
    try:
        entry = dataset_entry(cfg.dataset)
        if cfg.data_dir and cfg.dataset not in ("npz",) and not (entry.user and cfg.dataset not in ("disk", "imagefolder")):
            # a folder (a mistyped one is a mistake even where it is not read); npz and a loader of yours may take a file
            given_dir(cfg.data_dir)
        return entry, load_data(spec)
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
