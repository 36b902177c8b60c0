"""The LLR-weighted sign vote with online cross-probability estimation (signSGD-FV,
seed 000; the seeds' IT-signSGD).

Client: as signSGD-MV (one packed sign vector). Server: U_n = sign(sum_m w_{m,n} Y_{m,n})
with w the clipped LLR of client m's agreement rate with the vote on coordinate n
(fedsim.core.votes.CrossProbabilityEstimator); plain majority during the first
``llr-warmup`` rounds while the counts accumulate. A client is its partition id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedsim.algorithms.base import Option
from fedsim.algorithms.sign_vote import SignStep, WeightedSignVote
from fedsim.config import RunConfig
from fedsim.core.votes import CrossProbabilityEstimator


@dataclass(frozen=True)
class LLRParams(SignStep):
    """delta (``lr``), ``zero-sign`` and the estimator's settings (``llr-*``)."""

    eps: float
    max_llr: float
    warmup_rounds: int
    forgetting: float


class LLRWeightedVote(WeightedSignVote[LLRParams]):
    """signSGD-FV: the majority vote with per-client, per-coordinate LLR weights."""

    name = "llr-vote"
    params = LLRParams
    state_key = "estimator"
    options = (
        Option("llr-eps", 1e-5, lambda v: 0.0 < v < 0.5, "must be in (0, 0.5) (it smooths agreement rates in [0, 1])",
               "smoothing of the agreement rates", field="eps"),
        Option("llr-max", 10.0, lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0", "clip |w| at this", field="max_llr"),
        Option("llr-warmup", 100, lambda v: v >= 0, "must be >= 0", "rounds of plain majority before the weights are used",
               field="warmup_rounds"),
        Option("llr-forgetting", 1.0, lambda v: 0.0 < v <= 1.0, "must be in (0, 1]", "factor on a client's counts before each update",
               field="forgetting"),
    )
    estimator: CrossProbabilityEstimator

    @classmethod
    def state_bytes_per_client(cls, cfg: RunConfig, num_params: int) -> int:
        """A float32 agreement count per coordinate (and a float32 abstention count under
        zero-sign "abstain") plus a float64 round count."""
        return num_params * (8 if cfg.option("zero-sign") == "abstain" else 4) + 8

    def build_estimator(self) -> CrossProbabilityEstimator:
        hp = self.hp
        return CrossProbabilityEstimator(
            self.model.num_params, eps=hp.eps, max_llr=hp.max_llr, warmup_rounds=hp.warmup_rounds, forgetting=hp.forgetting,
            max_clients=self.max_clients, device=self.device, map_blocks=self.map_blocks,
        )

    def report(self) -> dict[str, Any]:
        """Each client's LLR weight averaged over the coordinates, by partition id: how much
        the vote trusted it at the end (negative: its signs are flipped)."""
        clients = self.estimator.table.clients
        if not clients:
            return {}
        w = self.estimator.mean_weights(clients).tolist()
        return {"mean_llr_weight": {int(c): float(v) for c, v in sorted(zip(clients, w, strict=True))}}  # type: ignore[call-overload]

    def describe(self) -> str:
        e = self.estimator
        return f"LLR vote: eps {e.eps:g}, max-llr {e.max_llr:g}, warm-up {e.warmup_rounds} rounds, forgetting {e.forgetting:g}"
