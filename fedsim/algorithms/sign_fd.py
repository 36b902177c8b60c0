"""signSGD with federated defense (signSGD-FD; Park and Lee, "SignSGD with Federated Defense:
Harnessing Adversarial Attacks through Gradient Sign Decoding", ICML 2024; the authors'
code: github.com/chanho26/SignSGD_Codec, Algorithms/train_signSGD_FD.py).

Client: as signSGD-MV (one packed sign vector of its minibatch gradient; a zero
coordinate as ``zero-sign`` says: ``abstain`` is the authors' sign(0) = 0, which adds
nothing to the vote and matches only a tied decision). Server: U = sign(sum_m w_m Y_m),
x^{t+1} = x^t - delta * U, where the weights are clipped LLRs of each worker's rate of
agreement with past decoded signs (fedsim.core.fd.FederatedDefense): 1 in the first
round, one weight per worker (its rate pooled over all coordinates) until round
``fd-warmup`` (T_in), one per worker and coordinate after. A worker that mostly disagrees
gets a negative weight, so its votes are flipped rather than dropped. A worker is its
partition id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedsim.algorithms.base import Option
from fedsim.algorithms.sign_vote import SignStep, WeightedSignVote
from fedsim.config import RunConfig
from fedsim.core.fd import FederatedDefense


@dataclass(frozen=True)
class FDParams(SignStep):
    """delta (``lr``), ``zero-sign``, T_in (``fd-warmup``) and the clip C of |w| (``fd-max``)."""

    warmup_rounds: int
    max_llr: float


class SignFederatedDefense(WeightedSignVote[FDParams]):
    """signSGD-FD: the sign vote with LLR weights that may flip a worker's votes."""

    name = "sign-fd"
    params = FDParams
    state_key = "defense"
    options = (
        Option("fd-warmup", 100, lambda v: v >= 1, "must be >= 1",
               "T_in: rounds 2..T_in weight each worker by its pooled agreement rate, later rounds per coordinate", field="warmup_rounds"),
        Option("fd-max", 10.0, lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0", "clip |w| at this", field="max_llr"),
    )
    estimator: FederatedDefense

    @classmethod
    def state_bytes_per_client(cls, cfg: RunConfig, num_params: int) -> int:
        """An int32 match count per coordinate plus an int64 round count."""
        return num_params * 4 + 8

    def build_estimator(self) -> FederatedDefense:
        return FederatedDefense(
            self.model.num_params, warmup_rounds=self.hp.warmup_rounds, max_llr=self.hp.max_llr, device=self.device,
            max_clients=self.max_clients, map_blocks=self.map_blocks,
        )

    def describe(self) -> str:
        d = self.estimator
        return f"federated defense: T_in {d.warmup_rounds} rounds, max |w| {d.max_llr:g}, eps {d.eps:g}"
