#!/usr/bin/env python
"""pfl-research's FedAvg on the clients a fedsim benchmark row samples: the pfl side of
rows 5 and 6 (benchmarks/bench_scale.py).

Runs in pfl's own virtual environment (PyPI ``pfl``, which pins its own numpy and torch),
with the project root on PYTHONPATH for ``fedsim.models`` only (pure torch):

    python benchmarks/pfl_fedavg.py SPEC.json                        # one process
    torchrun --nproc_per_node=2 benchmarks/pfl_fedavg.py SPEC.json   # pfl's multi-process mode

SPEC.json names an ``.npz`` the fedsim side wrote: ``x``/``y`` (the training examples the
sampled clients hold, float32 already normalised as fedsim does, int64 labels),
``user_offsets`` (client u holds rows ``user_offsets[u]:user_offsets[u + 1]`` of a flat
``user_rows`` array of indices into x), ``cohorts`` (``[rounds, per_round]``: the client of
each slot, in fedsim's order), ``test_x``/``test_y``, and ``init.pt`` (the model's initial
state dict, the one fedsim starts from). pfl samples the users through a sampler that
returns ``cohorts`` in order, so both frameworks train the same clients each round on the
same data, starting from the same model: plain FedAvg (local SGD at lr for E epochs of
batches of B, the central optimizer SGD at lr 1 on the mean of the clients' model deltas;
all clients here hold the same number of examples, so pfl's unweighted mean equals
fedsim's example-weighted one). pfl iterates a client's batches in stored order where
fedsim shuffles, so the final models differ; the accuracy is reported beside.

Prints one ``BENCH {json}`` line (rank 0): per-round time stamps (after every central
iteration), start-up (after the imports, to the first iteration: reading the examples
fedsim's side chose, building the model and pfl's objects), final test accuracy, peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

T_START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.callback.base import TrainingProcessCallback  # noqa: E402
from pfl.data.dataset import Dataset  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # noqa: E402
from pfl.metrics import Weighted  # noqa: E402
from pfl.model.pytorch import PyTorchModel  # noqa: E402

T_IMPORTED = time.perf_counter()


def build_network(name: str, num_classes: int, init: Path) -> torch.nn.Module:
    """fedsim's network ``name`` with ``loss``/``metrics`` as pfl's PyTorchModel wants them."""
    from fedsim.models import build_model

    net = build_model(name, num_classes=num_classes, seed=0)
    net.load_state_dict(torch.load(init, weights_only=True))

    def loss(x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:
        net.eval() if eval else net.train()
        return torch.nn.functional.cross_entropy(net(x), y)

    def metrics(x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict[str, Any]:
        net.eval()
        with torch.no_grad():
            out = net(x)
        correct = float((out.argmax(1) == y).sum())
        return {"accuracy": Weighted(correct, len(y))}

    net.loss = loss  # type: ignore[method-assign,assignment]
    net.metrics = metrics  # type: ignore[method-assign,assignment]
    return net


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    arrays = np.load(spec["data"])
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    offsets, rows = arrays["user_offsets"], torch.from_numpy(arrays["user_rows"])
    cohorts = arrays["cohorts"]
    order = iter(cohorts.reshape(-1).tolist())

    def make_dataset(user: int) -> Dataset:
        idx = rows[offsets[user]:offsets[user + 1]]
        return Dataset(raw_data=[x[idx], y[idx]], user_id=user)

    training = FederatedDataset(make_dataset, lambda: next(order))
    net = build_network(spec["model"], int(spec["num_classes"]), Path(spec["init"]))
    model = PyTorchModel(net, local_optimizer_create=torch.optim.SGD, central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    stamps: list[float] = []

    class Stamp(TrainingProcessCallback):
        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):  # type: ignore[no-untyped-def]
            stamps.append(time.perf_counter())
            return False, type(aggregate_metrics)()

    rounds, per_round = cohorts.shape
    params = NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=10**9, train_cohort_size=per_round, val_cohort_size=0)
    train = NNTrainHyperParams(local_learning_rate=float(spec["lr"]), local_num_epochs=int(spec["local_epochs"]),
                               local_batch_size=int(spec["batch_size"]))
    backend = SimulatedBackend(training_data=training, val_data=training)
    t_ready = time.perf_counter()
    FederatedAveraging().run(params, backend, model, train, NNEvalHyperParams(local_batch_size=None), callbacks=[Stamp()],
                             send_metrics_to_platform=False)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    with torch.no_grad():
        net.eval()
        acc = float((net(torch.from_numpy(arrays["test_x"])).argmax(1) == torch.from_numpy(arrays["test_y"])).float().mean())
    print("BENCH " + json.dumps({
        "round_stamps": [s - t_ready for s in stamps], "startup_s": t_ready - T_IMPORTED, "imports_s": T_IMPORTED - T_START,
        "final_test_accuracy": acc, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
