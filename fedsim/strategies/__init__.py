"""fedsim's strategies (Flower ``Strategy`` subclasses) and the math they call."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsim.config import RunConfig
from fedsim.protocol import ArraySpec
from fedsim.strategies.base import FedsimStrategy
from fedsim.strategies.fedavg import FedAvg
from fedsim.strategies.fedsgd import FedSGD
from fedsim.strategies.sign_vote import LLRWeightedVote, SignMajorityVote

STRATEGY_CLASSES: dict[str, type[FedsimStrategy]] = {
    "fedsgd": FedSGD,
    "fedavg": FedAvg,
    "sign-mv": SignMajorityVote,
    "llr-vote": LLRWeightedVote,
}


def build_strategy(
    cfg: RunConfig,
    model_spec: ArraySpec,
    param_keys: Sequence[str],
    num_partitions: int | None = None,
    max_examples: int | None = None,
    device: torch.device | str = "cpu",
) -> FedsimStrategy:
    """The strategy named by the run config's ``strategy`` key. ``num_partitions`` and
    ``max_examples`` bound what replies may claim (see FedsimStrategy); ``device`` is
    where the LLR vote keeps its counts and votes."""
    common = dict(
        lr=cfg.lr, fraction_train=cfg.fraction_train, local_epochs=cfg.local_epochs, seed=cfg.seed,
        num_partitions=num_partitions, max_examples=max_examples, min_replies=cfg.min_replies,
    )
    if cfg.strategy == "llr-vote":
        return LLRWeightedVote(
            model_spec, param_keys, eps=cfg.llr_eps, max_llr=cfg.llr_max,
            warmup_rounds=cfg.llr_warmup, forgetting=cfg.llr_forgetting, device=device, **common,
        )
    return STRATEGY_CLASSES[cfg.strategy](model_spec, param_keys, **common)


__all__ = ["FedAvg", "FedSGD", "FedsimStrategy", "LLRWeightedVote", "SignMajorityVote", "STRATEGY_CLASSES", "build_strategy"]
