"""FedAvg (McMahan et al. 2017): x^{t+1} = sum_{k in S_t} (n_k / m_t) x_k^{t+1}.

Client: E local epochs of minibatch SGD (batch B, rate eta) from x^t; uploads its whole
state_dict. Server: the example-weighted mean; integer entries (e.g. BatchNorm's batch
counter) are averaged in float64 and rounded back to their dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from fedsim.algorithms.base import Algorithm, ClientStep, Option, Upload, random_floats
from fedsim.arrays import to_array_record
from fedsim.attacks import UPDATE_ATTACKS, alie_arrays
from fedsim.clients.tasks import local_epochs
from fedsim.core.aggregate import weighted_mean
from fedsim.protocol import ARRAYS, Reply, checked_arrays

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class LocalSGD:
    """eta (the run config's ``lr``) and E (``local-epochs``)."""

    lr: float
    local_epochs: int


class FedAvg(Algorithm[LocalSGD, State]):
    """Example-weighted mean of the clients' locally trained models."""

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

    def lie(self, honest: list[Reply[State]], z: float) -> State:
        """ALIE: mu - z sigma of the honest models, per coordinate (= x + mu - z sigma of
        their updates x_k - x; integer entries rounded; fedsim.attacks)."""
        return alie_arrays([r.payload for r in honest], z)

    def parse(self, msg: Message) -> State:
        return checked_arrays(msg, ARRAYS, self.model.arrays)

    def sample_upload(self, rng: np.random.Generator) -> State:
        return random_floats(self.model.arrays, rng)

    def server_rule(self, server_round: int, current: ArrayRecord, replies: list[Reply[State]]) -> ArrayRecord:
        weights = [r.metrics.num_examples for r in replies]
        out: dict[str, np.ndarray] = {}
        for key, (_, dtype) in self.model.arrays.items():
            mean = weighted_mean([torch.from_numpy(r.payload[key].astype(np.float64)) for r in replies], weights)
            if not np.issubdtype(dtype, np.floating):
                mean = mean.round()
            out[key] = mean.numpy().astype(dtype)
        return to_array_record(out)
