"""fedsim's Flower strategy: ``FedsimStrategy`` drives any registered algorithm
(fedsim.algorithms); ``build_strategy`` makes the one a run config names.

The public entry point for a Flower user's own ServerApp is ``strategy_for(model,
run_config)``: a Flower ``Strategy`` running the algorithm the run config names on the
model's parameters; start it with Flower's ``strategy.start(grid=..., initial_arrays=...,
num_rounds=...)`` or fedsim's ``strategy.run(...)``. Its clients run fedsim's ClientApp
(``fedsim.client_app:app``), or, for ``fedavg``, any Flower ClientApp that replies with its
model and ``num-examples``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedsim.algorithms import REGISTRY, Algorithm
from fedsim.arrays import to_array_record
from fedsim.attacks import SERVER_PLAYED, run_attackers
from fedsim.config import RunConfig, node_partition_map
from fedsim.core.blocks import BlockMap, sequential_blocks
from fedsim.protocol import ModelSpec, Reply, array_spec
from fedsim.strategies.base import FedsimStrategy, RoundEndHook
from fedsim.strategies.evaluation import FederatedEvaluation, FederatedEvaluator
from fedsim.validation import load_config


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
        node_partitions=node_partition_map(cfg.node_partitions), downlink=cfg.downlink,
        liars=run_attackers(cfg) if cfg.attack in SERVER_PLAYED else (),
    )


def strategy_for(model: nn.Module, run_config: Mapping[str, Any] | None = None, num_partitions: int | None = None) -> FedsimStrategy:
    """A Flower strategy of fedsim's algorithm ``run_config["strategy"]`` (default fedavg)
    for ``model``'s parameters: ``run_config`` is a Flower run config (fedsim's keys,
    checked by ``fedsim.validation.load_config``: a ConfigError names a bad one);
    ``num_partitions`` bounds the partition ids replies may claim (default: ``num-nodes``)."""
    cfg = load_config(dict(run_config or {}))
    spec = array_spec(to_array_record({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}))
    keys = [n for n, p in model.named_parameters() if p.requires_grad]
    return build_strategy(cfg, ModelSpec.of(spec, keys), num_partitions=num_partitions or cfg.num_nodes)


__all__ = [
    "FederatedEvaluation", "FederatedEvaluator", "FedsimStrategy", "Reply", "RoundEndHook", "build_algorithm", "build_strategy",
    "strategy_for",
]
