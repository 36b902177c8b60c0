"""What both apps stand on: the dataset on a device, models, client views, evaluation.

Neither app imports the other's package: the ServerApp and the ClientApp both import
this module (and ``fedsim.algorithms``), nothing else of each other.

Lifetime. A ``Runtime`` holds one dataset on one device and everything built on it in
this process: the test set as the models see it, every client's index view, and one
model object per (model, worker thread) into which clients load the global weights. It
is built on first use by ``runtime(plan, device)`` and lives until
``release_runtimes()``: the in-process engine calls it when a run ends (so a long
notebook holds no dataset or GPU model between runs; the run plans go too); a Flower
simulation actor or a SuperNode's process keeps its runtime for the process's life.
Nothing else in fedsim caches tensors.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedsim.clients.tasks import LocalData
from fedsim.data.splits import DatasetSplits
from fedsim.models import build_model
from fedsim.objective import CLASSIFICATION, Objective, accuracy, checked_metrics
from fedsim.plan import RunPlan, release_plans

# Client views kept per runtime, least recently used dropped first: a view is rebuilt from
# the plan's index table in microseconds, so memory does not grow with the clients sampled.
MAX_CLIENT_VIEWS = 4096


@dataclass
class ClientSetup:
    """What a client needs for a train message: its data view, batch size and a model."""

    partition_id: int
    num_partitions: int
    batch_size: int
    data: LocalData
    model: nn.Module
    device: torch.device

    @property
    def param_names(self) -> list[str]:
        """Names of the trainable parameters, in ``model.parameters()`` order."""
        return model_facts(self.model)[0]

    @property
    def float_buffers(self) -> dict[str, torch.Tensor]:
        """Float state that is not a parameter (BatchNorm running statistics), live views."""
        return model_facts(self.model)[1]


@dataclass
class Runtime:
    """One dataset on one device, and what this process built on it (module docstring)."""

    splits: DatasetSplits
    device: torch.device
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _models: dict[tuple[str, int], nn.Module] = field(default_factory=dict)
    _clients: OrderedDict[tuple[object, ...], ClientSetup] = field(default_factory=OrderedDict)
    _test_inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.splits.num_classes

    def thread_model(self, plan: RunPlan) -> nn.Module:
        """This thread's model object of the plan's model (worker threads never share one);
        weights are loaded into it per message, so its initial values do not matter."""
        key = (plan.model_name, threading.get_ident())
        with self._lock:
            if key not in self._models:
                self._models[key] = build_model(plan.model, num_classes=self.num_classes, seed=0).to(self.device)
            return self._models[key]

    def client(self, plan: RunPlan, partition_id: int, node_batch_size: int | None = None) -> ClientSetup:
        """The client's data view, batch size (the node config's wins) and this thread's model
        (views cached, at most MAX_CLIENT_VIEWS)."""
        if not 0 <= partition_id < plan.num_partitions:
            raise ValueError(f"partition-id {partition_id} is outside 0..{plan.num_partitions - 1}")
        key = (plan.cfg, plan.num_partitions, partition_id, node_batch_size, threading.get_ident())
        setup = self._clients.get(key)
        if setup is None:
            # a copy (the table is read-only); from_numpy of a fresh int64 array: torch.tensor costs 8x more per client
            indices = torch.from_numpy(plan.partitions[partition_id].astype(np.int64)).to(self.device)
            batch_size = plan.batch_sizes[partition_id] if node_batch_size is None else node_batch_size
            data = LocalData(x=self.x_train, y=self.y_train, indices=indices, augment=plan.augment)
            setup = ClientSetup(partition_id, plan.num_partitions, batch_size, data, self.thread_model(plan), self.device)
            with self._lock:
                self._clients[key] = setup
                while len(self._clients) > MAX_CLIENT_VIEWS:
                    self._clients.popitem(last=False)
        else:
            with self._lock:
                if key in self._clients:
                    self._clients.move_to_end(key)
        return setup

    def test_inputs(self, plan: RunPlan) -> torch.Tensor:
        """The test inputs as the plan's model sees them (its evaluation transform applied)."""
        with self._lock:
            if plan.model_name not in self._test_inputs:
                transform = plan.eval_transform
                self._test_inputs[plan.model_name] = transform(self.x_test) if transform is not None else self.x_test
            return self._test_inputs[plan.model_name]


_RUNTIMES: dict[tuple[str, str, str, torch.device], Runtime] = {}
_RUNTIMES_LOCK = threading.Lock()


def runtime(plan: RunPlan, device: torch.device) -> Runtime:
    """This process's runtime of the plan's dataset on ``device``, built on first use."""
    splits = plan.splits
    # a node on its own data (fedsim.plan.node_plan) is its own data set: its source names it
    key = (plan.cfg.dataset, plan.cfg.data_dir, str(splits.info.get("source", "")), device)
    with _RUNTIMES_LOCK:  # concurrent first calls (worker threads) would each copy the dataset
        found = _RUNTIMES.get(key)
        if found is None or found.splits is not splits:
            found = _RUNTIMES[key] = Runtime(
                splits, device, splits.x_train.to(device), splits.y_train.to(device),
                splits.x_test.to(device), splits.y_test.to(device),
            )
        return found


def release_runtimes() -> None:
    """Drop every runtime and plan of this process (datasets on devices, models, client
    views); on CUDA also return the cached blocks to the driver."""
    with _RUNTIMES_LOCK:
        had_cuda = any(d.type == "cuda" for *_, d in _RUNTIMES)
        _RUNTIMES.clear()
    release_plans()
    if had_cuda:
        torch.cuda.empty_cache()


_FACTS: weakref.WeakKeyDictionary[nn.Module, tuple[list[str], dict[str, torch.Tensor]]] = weakref.WeakKeyDictionary()


def model_facts(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(trainable parameter names in ``parameters()`` order, float buffers that are not
    parameters as live views), cached per model object."""
    facts = _FACTS.get(model)
    if facts is None:
        params = [n for n, p in model.named_parameters() if p.requires_grad]
        all_params = {n for n, _ in model.named_parameters()}
        buffers = {k: v for k, v in model.state_dict().items() if k not in all_params and v.is_floating_point()}
        facts = _FACTS[model] = (params, buffers)
    return facts


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective = CLASSIFICATION, batch_size: int = 1000
) -> tuple[float, dict[str, float]]:
    """(mean loss, metrics) of ``model`` on (x, y): the objective's loss summed in float64
    over batches of ``batch_size``, and its metrics on all outputs at once (the default:
    cross-entropy and ``{"accuracy": ...}``, counted per batch)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    n = max(len(x), 1)
    if objective.builtin and objective.metrics is accuracy:
        correct = torch.zeros((), dtype=torch.int64, device=x.device)
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size])
            target = y[start : start + batch_size]
            loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
            correct += (logits.argmax(dim=1) == target).sum()
        return float(loss_sum) / n, {"accuracy": float(correct) / n}
    outputs = []
    for start in range(0, len(x), batch_size):
        out = model(x[start : start + batch_size])
        loss_sum += objective.loss_sum(out, y[start : start + batch_size]).double()
        outputs.append(out)
    values = objective.metrics(torch.cat(outputs), y) if objective.metrics is not None and outputs else {}
    return float(loss_sum) / n, checked_metrics(values, "metrics")
