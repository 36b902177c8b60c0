"""FedSGD (McMahan et al. 2017): x^{t+1} = x^t - eta * sum_{k in S_t} (n_k / m_t) g_k.

Client: the gradient g_k at x^t over a minibatch of B examples, or over the whole local
set (B = 0, the paper's B = inf). Server: one SGD step with the example-weighted mean, or
with the run's ``aggregator`` of the gradients, x^{t+1} = x^t - eta * agg(g_1..g_n)
(fedsim.algorithms.aggregating). Flower ships no FedSGD (flower #1158).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from fedsim.algorithms.aggregating import Aggregating, Aggregation
from fedsim.algorithms.base import ClientStep, Upload, descend, random_floats
from fedsim.attacks import UPDATE_ATTACKS
from fedsim.clients.tasks import minibatch_gradient
from fedsim.protocol import GRADS, Reply, checked_arrays

Grads = dict[str, np.ndarray]


@dataclass(frozen=True)
class StepSize(Aggregation):
    """eta: the server's step size (the run config's ``lr``), and the aggregator."""


class FedSGD(Aggregating[StepSize]):
    """One server SGD step on the aggregate (default: the example-weighted mean) of the clients' gradients."""

    name = "fedsgd"
    record = GRADS
    params = StepSize
    attacks = UPDATE_ATTACKS

    @classmethod
    def client_step(cls, hp: StepSize, step: ClientStep) -> Upload:
        grads, loss, _ = minibatch_gradient(step.model, step.data, step.batch_size, step.generator, step.objective)
        grads = [step.attack.update(g, step.generator) for g in grads]
        return Upload({k: g.detach().cpu().numpy() for k, g in zip(step.param_names, grads, strict=True)}, loss)

    def parse(self, msg: Message) -> Grads:
        return checked_arrays(msg, GRADS, self.model.param_spec)

    def sample_upload(self, rng: np.random.Generator) -> Grads:
        return random_floats(self.model.param_spec, rng)

    def server_rule(self, server_round: int, current: ArrayRecord, replies: list[Reply[Grads]]) -> ArrayRecord:
        keys = self.model.param_keys
        merged = self.aggregate_arrays([r.payload for r in replies], keys, [r.metrics.num_examples for r in replies])
        return descend(current, keys, torch.cat(merged), self.hp.lr)  # descend casts the float64 aggregate to the model's dtype
