"""FedAvg (McMahan et al. 2017): x^{t+1} = sum_{k in S_t} (n_k / m_t) x_k^{t+1}.

Each sampled client runs E local epochs of minibatch SGD (batch B, lr eta) from x^t and
uploads its whole state_dict; integer entries (e.g. BatchNorm's batch counter) are
averaged in float64 and rounded back to their dtype.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from fedsim.arrays import to_array_record
from fedsim.protocol import ARRAYS, TASK_LOCAL_EPOCHS, checked_arrays
from fedsim.strategies.aggregate import weighted_mean
from fedsim.strategies.base import FedsimStrategy, Reply


class FedAvg(FedsimStrategy):
    """Example-weighted mean of the clients' locally trained models."""

    task = TASK_LOCAL_EPOCHS

    def parse(self, msg: Message) -> dict[str, np.ndarray]:
        return checked_arrays(msg, ARRAYS, self.model_spec)

    def apply(self, server_round: int, current: ArrayRecord, replies: list[Reply]) -> ArrayRecord:
        weights = [r.metrics.num_examples for r in replies]
        out: dict[str, np.ndarray] = {}
        for key, (_, dtype) in self.model_spec.items():
            mean = weighted_mean([torch.from_numpy(r.payload[key].astype(np.float64)) for r in replies], weights)
            if not np.issubdtype(dtype, np.floating):
                mean = mean.round()
            out[key] = mean.numpy().astype(dtype)
        return to_array_record(out)
