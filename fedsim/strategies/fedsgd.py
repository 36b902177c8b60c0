"""FedSGD (McMahan et al. 2017): x^{t+1} = x^t - eta * sum_{k in S_t} (n_k / m_t) g_k.

Each sampled client uploads its gradient at x^t over a minibatch of B examples, or over
its whole local set (B = 0, the paper's B = inf). Flower ships no FedSGD (flower #1158).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from fedsim.arrays import to_array_record
from fedsim.protocol import GRADS, TASK_GRADIENT, checked_arrays
from fedsim.strategies.aggregate import weighted_mean
from fedsim.strategies.base import FedsimStrategy, Reply
from fedsim.strategies.model_vector import flatten, to_state, unflatten_into


class FedSGD(FedsimStrategy):
    """One server SGD step on the example-weighted mean of the clients' gradients."""

    task = TASK_GRADIENT

    def parse(self, msg: Message) -> dict[str, np.ndarray]:
        return checked_arrays(msg, GRADS, {k: self.model_spec[k] for k in self.param_keys})

    def apply(self, server_round: int, current: ArrayRecord, replies: list[Reply]) -> ArrayRecord:
        # np.concatenate copies the read-only message views into one writable vector per client
        grads = [torch.from_numpy(np.concatenate([r.payload[k].reshape(-1) for k in self.param_keys])) for r in replies]
        g = weighted_mean(grads, [r.metrics.num_examples for r in replies])
        state = to_state(current)
        x = flatten(state, self.param_keys)
        unflatten_into(state, self.param_keys, x - self.lr * g.to(x.dtype))
        return to_array_record({k: v.numpy() for k, v in state.items()})
