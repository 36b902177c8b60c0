"""fedsim's Flower strategy: ``FedsimStrategy`` drives any registered algorithm
(fedsim.algorithms); ``build_strategy`` makes the one a run config names.

This is the public entry point for a Flower user's own ServerApp: build a run config with
``fedsim.validation.load_config``, then ``build_strategy(cfg, ModelSpec.of(...))`` and run it
with ``FedsimStrategy.run`` (or Flower's ``Strategy.start``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedsim.algorithms import REGISTRY, Algorithm
from fedsim.config import RunConfig
from fedsim.core.blocks import BlockMap, sequential_blocks
from fedsim.protocol import ModelSpec, Reply
from fedsim.strategies.base import FedsimStrategy, RoundEndHook
from fedsim.strategies.evaluation import FederatedEvaluation, FederatedEvaluator


def build_algorithm(
    cfg: RunConfig, model: ModelSpec, max_clients: int | None = None, device: torch.device | str = "cpu",
    map_blocks: BlockMap = sequential_blocks,
) -> Algorithm[Any, Any]:
    """The server half of the algorithm named by the run config's ``strategy`` key."""
    cls = REGISTRY[cfg.strategy]
    return cls(cls.hyperparams(cfg), model, device, max_clients, map_blocks=map_blocks)


def build_strategy(
    cfg: RunConfig,
    model: ModelSpec,
    num_partitions: int | None = None,
    max_examples: int | None = None,
    device: torch.device | str = "cpu",
    map_blocks: BlockMap = sequential_blocks,
    metric_names: Sequence[str] = ("accuracy",),
    max_clients_by_node: bool = False,
) -> FedsimStrategy:
    """The strategy for ``cfg``. ``num_partitions`` and ``max_examples`` bound what replies
    may claim (see FedsimStrategy); ``device`` is where the algorithm keeps server-side
    state (the LLR vote's counts); ``map_blocks`` runs its blocks of coordinates
    (fedsim.parallel.block_map for several threads); ``metric_names``: what the task's
    evaluate replies report (federated evaluation, with ``eval-fraction`` > 0);
    ``max_clients_by_node``: the clients are nodes on their own data, so the algorithm's
    per-client state is capped at 4 x ``num_partitions`` rather than at the partitions."""
    evaluation = None
    if cfg.eval_fraction > 0:
        evaluation = FederatedEvaluator(cfg.eval_fraction, metric_names, cfg.seed, num_partitions, max_examples)
    # nodes without a partition id (on their own data, or plain Flower clients) are keyed by
    # node id; the server keeps state for at most 4 per expected node
    node_cap = None if num_partitions is None else 4 * num_partitions
    return FedsimStrategy(
        build_algorithm(cfg, model, node_cap if max_clients_by_node else num_partitions, device, map_blocks),
        fraction_train=cfg.fraction_train, seed=cfg.seed, num_partitions=num_partitions, max_examples=max_examples,
        min_replies=cfg.min_replies, evaluation=evaluation, max_node_clients=node_cap, own_data=max_clients_by_node,
    )


__all__ = ["FederatedEvaluation", "FederatedEvaluator", "FedsimStrategy", "Reply", "RoundEndHook", "build_algorithm", "build_strategy"]
