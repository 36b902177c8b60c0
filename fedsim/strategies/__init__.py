"""fedsim's Flower strategy: ``FedsimStrategy`` drives any registered algorithm
(fedsim.algorithms); ``build_strategy`` makes the one a run config names."""

from __future__ import annotations

import torch

from fedsim.algorithms import REGISTRY, Algorithm
from fedsim.config import RunConfig
from fedsim.protocol import ModelSpec
from fedsim.strategies.base import FedsimStrategy, Reply, RoundEndHook


def build_algorithm(cfg: RunConfig, model: ModelSpec, max_clients: int | None = None, device: torch.device | str = "cpu") -> Algorithm:
    """The server half of the algorithm named by the run config's ``strategy`` key."""
    cls = REGISTRY[cfg.strategy]
    return cls(cls.hyperparams(cfg), model, device, max_clients)


def build_strategy(
    cfg: RunConfig,
    model: ModelSpec,
    num_partitions: int | None = None,
    max_examples: int | None = None,
    device: torch.device | str = "cpu",
) -> FedsimStrategy:
    """The strategy for ``cfg``. ``num_partitions`` and ``max_examples`` bound what replies
    may claim (see FedsimStrategy); ``device`` is where the algorithm keeps server-side
    state (the LLR vote's counts)."""
    return FedsimStrategy(
        build_algorithm(cfg, model, num_partitions, device), fraction_train=cfg.fraction_train, seed=cfg.seed,
        num_partitions=num_partitions, max_examples=max_examples, min_replies=cfg.min_replies,
    )


__all__ = ["FedsimStrategy", "Reply", "RoundEndHook", "build_algorithm", "build_strategy"]
