"""Sign votes: signSGD with majority vote (Bernstein et al. 2018/2019) and the
LLR-weighted vote with online cross-probability estimation (signSGD-FV, seed 000).

Each client uploads s_m = sign(g_m) packed at 1 bit per coordinate (zero -> +1); the
server decodes, votes U in {-1, 0, +1}^N (a tie is 0: no step) and applies
x^{t+1} = x^t - delta * U to the trainable parameters, delta being the run's ``lr``.
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from fedsim.arrays import to_array_record
from fedsim.protocol import TASK_SIGN, ArraySpec, packed_signs
from fedsim.strategies.base import FedsimStrategy, Reply
from fedsim.strategies.model_vector import flatten, to_state, unflatten_into
from fedsim.strategies.signs import packed_size, unpack_signs
from fedsim.strategies.votes import CrossProbabilityEstimator, majority_vote


class SignMajorityVote(FedsimStrategy):
    """signSGD-MV: U = sign(sum_m s_m)."""

    task = TASK_SIGN

    def parse(self, msg: Message) -> np.ndarray:
        return packed_signs(msg, packed_size(self.num_params))

    def vote(self, client_ids: list[int], signs: torch.Tensor) -> torch.Tensor:
        """The aggregated sign U from the clients' signs [M, N]."""
        return majority_vote(signs)

    def apply(self, server_round: int, current: ArrayRecord, replies: list[Reply]) -> ArrayRecord:
        signs = torch.stack([unpack_signs(r.payload, self.num_params) for r in replies])
        u = self.vote([r.metrics.partition_id for r in replies], signs)  # partition ids: stable across runs, unlike node ids
        state = to_state(current)
        x = flatten(state, self.param_keys)
        unflatten_into(state, self.param_keys, x - self.lr * u.to(x.device, x.dtype))
        return to_array_record({k: v.numpy() for k, v in state.items()})


class LLRWeightedVote(SignMajorityVote):
    """signSGD-FV: U_n = sign(sum_m w_{m,n} Y_{m,n}), w from CrossProbabilityEstimator.

    Plain majority during the first ``warmup_rounds`` rounds; agreement counts are kept
    per client (partition id) and coordinate from round 1 on.
    """

    def __init__(
        self,
        model_spec: ArraySpec,
        param_keys: Sequence[str],
        lr: float,
        *,
        eps: float = 1e-5,
        max_llr: float = 10.0,
        warmup_rounds: int = 100,
        forgetting: float = 1.0,
        device: torch.device | str = "cpu",
        **common: Any,
    ) -> None:
        """``device``: where the agreement counts live and the vote runs (the training
        device: on a GPU the M x N counts and the vote stay there); ``common``:
        FedsimStrategy's options (fraction_train, seed, num_partitions, ...)."""
        super().__init__(model_spec, param_keys, lr, **common)
        self.estimator = CrossProbabilityEstimator(
            self.num_params, eps=eps, max_llr=max_llr, warmup_rounds=warmup_rounds, forgetting=forgetting,
            max_clients=self.num_partitions, device=device,
        )

    def summary(self) -> None:
        super().summary()
        e = self.estimator
        log(INFO, "\t└──> LLR vote: eps %g, max-llr %g, warm-up %d rounds, forgetting %g", e.eps, e.max_llr, e.warmup_rounds, e.forgetting)

    def vote(self, client_ids: list[int], signs: torch.Tensor) -> torch.Tensor:
        return self.estimator.vote(client_ids, signs)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "estimator": self.estimator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.estimator.load_state_dict(state["estimator"])
