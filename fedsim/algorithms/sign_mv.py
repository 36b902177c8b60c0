"""signSGD with majority vote (Bernstein et al. 2018/2019).

Client: s_m = sign(g_m) of one minibatch gradient, packed at 1 bit per coordinate (zero
is sent as +1: fedsim.core.signs). Server: U = sign(sum_m s_m) in {-1, 0, +1}^N (a tie
is 0: no step) and x^{t+1} = x^t - delta * U on the trainable parameters, delta being the
run config's ``lr``. ``vote`` is the one step that the LLR-weighted vote replaces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from fedsim.algorithms.base import Algorithm, ClientStep, Upload
from fedsim.arrays import to_array_record, to_state
from fedsim.clients.tasks import flat_gradient
from fedsim.config import RunConfig
from fedsim.core.model_vector import flatten, unflatten_into
from fedsim.core.signs import pack_signs, packed_size, unpack_signs
from fedsim.core.votes import majority_vote
from fedsim.protocol import PACKED, SIGNS, packed_signs


@dataclass(frozen=True)
class SignStep:
    """delta: the server's step size (the run config's ``lr``)."""

    lr: float


class SignMajorityVote(Algorithm[SignStep]):
    """signSGD-MV: U = sign(sum_m s_m)."""

    name = "sign-mv"
    record = SIGNS

    @classmethod
    def hyperparams(cls, cfg: RunConfig) -> SignStep:
        return SignStep(cfg.lr)

    @classmethod
    def client_step(cls, hp: object, step: ClientStep) -> Upload:
        vec, loss, _ = flat_gradient(step.model, step.data, step.batch_size, step.generator)
        return Upload({PACKED: pack_signs(vec)}, loss)

    def parse(self, msg: Message) -> np.ndarray:
        return packed_signs(msg, packed_size(self.model.num_params))

    def vote(self, client_ids: list[int], signs: torch.Tensor) -> torch.Tensor:
        """The aggregated sign U from the clients' signs [M, N]."""
        return majority_vote(signs)

    def server_rule(self, server_round: int, current: ArrayRecord, replies: list) -> ArrayRecord:
        signs = torch.stack([unpack_signs(r.payload, self.model.num_params) for r in replies])
        u = self.vote([r.metrics.partition_id for r in replies], signs)  # partition ids: stable across runs, unlike node ids
        state = to_state(current)
        keys = self.model.param_keys
        x = flatten(state, keys)
        unflatten_into(state, keys, x - self.hp.lr * u.to(x.device, x.dtype))
        return to_array_record({k: v.numpy() for k, v in state.items()})
