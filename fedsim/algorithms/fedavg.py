"""FedAvg (McMahan et al. 2017): x^{t+1} = sum_{k in S_t} (n_k / m_t) x_k^{t+1}.

Client: E local epochs of minibatch SGD (batch B, rate eta) from x^t; uploads its whole
state_dict. Server: the example-weighted mean, or the run's ``aggregator`` of the models,
x^{t+1} = agg(x_1..x_n) (fedsim.algorithms.aggregating; the same as x^t + agg of the
updates, every rule being translation-equivariant). Coordinate-wise rules (mean, median,
trimmed mean) go entry by entry; Krum, Multi-Krum and Bulyan see each client's whole state
as one vector. Entries are aggregated in float64; integer ones (e.g. BatchNorm's batch
counter) are rounded back to their dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

from fedsim.algorithms.aggregating import Aggregating, Aggregation
from fedsim.algorithms.base import ClientStep, Option, Upload, random_floats
from fedsim.arrays import to_array_record
from fedsim.attacks import UPDATE_ATTACKS
from fedsim.clients.tasks import local_epochs
from fedsim.protocol import ARRAYS, Reply, checked_arrays

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class LocalSGD(Aggregation):
    """eta (the run config's ``lr``), E (``local-epochs``) and the aggregator."""

    local_epochs: int


class FedAvg(Aggregating[LocalSGD]):
    """The aggregate (default: the example-weighted mean) of the clients' locally trained models."""

    name = "fedavg"
    record = ARRAYS
    params = LocalSGD
    sends_buffers = False  # the whole state_dict travels in ARRAYS
    attacks = UPDATE_ATTACKS
    options = (
        Option("local-epochs", 1, lambda v: v >= 1, "must be >= 1", "E: local epochs per round (FedAvg)"),
    )

    @classmethod
    def client_step(cls, hp: LocalSGD, step: ClientStep) -> Upload:
        start = {k: v.detach().clone() for k, v in step.model.state_dict().items()} if step.attack.kind != "none" else None
        loss, _ = local_epochs(step.model, step.data, hp.local_epochs, step.batch_size, hp.lr, step.generator, step.objective)
        state = step.model.state_dict()
        if start is not None:  # an attacker sends x + attack(x_k - x) for its float entries
            state = {k: start[k] + step.attack.update(v - start[k], step.generator) if v.is_floating_point() else v for k, v in state.items()}
        return Upload({k: v.detach().cpu().numpy() for k, v in state.items()}, loss)

    def parse(self, msg: Message) -> State:
        return checked_arrays(msg, ARRAYS, self.model.arrays)

    def sample_upload(self, rng: np.random.Generator) -> State:
        return random_floats(self.model.arrays, rng)

    def server_rule(self, server_round: int, current: ArrayRecord, replies: list[Reply[State]]) -> ArrayRecord:
        keys = list(self.model.arrays)
        merged = self.aggregate_arrays([r.payload for r in replies], keys, [r.metrics.num_examples for r in replies])
        out: dict[str, np.ndarray] = {}
        for key, agg in zip(keys, merged, strict=True):
            shape, dtype = self.model.arrays[key]
            if not np.issubdtype(dtype, np.floating):
                agg = agg.round()
            out[key] = agg.cpu().numpy().reshape(shape).astype(dtype)
        return to_array_record(out)
