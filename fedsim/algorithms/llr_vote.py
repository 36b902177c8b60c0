"""The LLR-weighted sign vote with online cross-probability estimation (signSGD-FV,
seed 000; the seeds' IT-signSGD).

Client: as signSGD-MV (one packed sign vector). Server: U_n = sign(sum_m w_{m,n} Y_{m,n})
with w the clipped LLR of client m's agreement rate with the vote on coordinate n
(fedsim.core.votes.CrossProbabilityEstimator); plain majority during the first
``llr-warmup`` rounds while the counts accumulate. A client is its partition id.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedsim.algorithms.base import Option
from fedsim.algorithms.sign_mv import SignMajorityVote, SignStep
from fedsim.config import RunConfig
from fedsim.core.votes import CrossProbabilityEstimator
from fedsim.protocol import ModelSpec


@dataclass(frozen=True)
class LLRParams(SignStep):
    """delta (``lr``), ``zero-sign`` and the estimator's settings (``llr-*``)."""

    eps: float
    max_llr: float
    warmup_rounds: int
    forgetting: float


class LLRWeightedVote(SignMajorityVote):
    """signSGD-FV: the majority vote with per-client, per-coordinate LLR weights."""

    name = "llr-vote"
    options = SignMajorityVote.options + (
        Option("llr-eps", 1e-5, lambda v: 0.0 < v < 0.5, "must be in (0, 0.5) (it smooths agreement rates in [0, 1])",
               "smoothing of the agreement rates"),
        Option("llr-max", 10.0, lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0", "clip |w| at this"),
        Option("llr-warmup", 100, lambda v: v >= 0, "must be >= 0", "rounds of plain majority before the weights are used"),
        Option("llr-forgetting", 1.0, lambda v: 0.0 < v <= 1.0, "must be in (0, 1]", "factor on a client's counts before each update"),
    )

    @classmethod
    def hyperparams(cls, cfg: RunConfig) -> LLRParams:  # type: ignore[override]
        return LLRParams(
            cfg.lr, str(cfg.option("zero-sign")), float(cfg.option("llr-eps")), float(cfg.option("llr-max")),
            int(cfg.option("llr-warmup")), float(cfg.option("llr-forgetting")),
        )

    def __init__(self, hp: LLRParams, model: ModelSpec, device: torch.device | str = "cpu", max_clients: int | None = None) -> None:
        """``device``: where the M x N agreement counts live and the vote runs (the training
        device); ``max_clients``: the most partitions that may hold counts."""
        super().__init__(hp, model, device, max_clients)  # type: ignore[arg-type]
        self.estimator = CrossProbabilityEstimator(
            model.num_params, eps=hp.eps, max_llr=hp.max_llr, warmup_rounds=hp.warmup_rounds, forgetting=hp.forgetting,
            max_clients=max_clients, device=device,
        )

    def vote(self, client_ids: list[int], signs: torch.Tensor) -> torch.Tensor:
        return self.estimator.vote(client_ids, signs)

    def state_dict(self) -> dict[str, Any]:
        return {"estimator": self.estimator.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.estimator.load_state_dict(state["estimator"])

    def report(self) -> dict[str, Any]:
        """Each client's LLR weight averaged over the coordinates, by partition id: how much
        the vote trusted it at the end (negative: its signs are flipped)."""
        clients = self.estimator.state_dict()["clients"]
        if not clients:
            return {}
        w = self.estimator.mean_weights(clients).tolist()
        return {"mean_llr_weight": {int(c): float(v) for c, v in sorted(zip(clients, w))}}

    def describe(self) -> str:
        e = self.estimator
        return f"LLR vote: eps {e.eps:g}, max-llr {e.max_llr:g}, warm-up {e.warmup_rounds} rounds, forgetting {e.forgetting:g}"
