"""Building a fedsim strategy in tests without a whole run config."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message

from fedsim.callbacks import Callback, RoundEnd
from fedsim.engine.flower_internals import assign_message_id
from fedsim.protocol import ArraySpec, ModelSpec
from fedsim.strategies import FedsimStrategy, build_strategy
from fedsim.validation import load_config


def make(
    name: str, spec: ArraySpec, params: Sequence[str], lr: float, *, fraction_train: float = 1.0, seed: int = 0,
    num_partitions: int | None = None, max_examples: int | None = None, min_replies: int = 1, device: str = "cpu",
    **options: Any,
) -> FedsimStrategy:
    """The strategy of algorithm ``name`` over a model with state ``spec`` and trainable
    ``params``; ``options`` are the algorithm's own keys in snake case (llr_warmup=1)."""
    cfg = load_config({
        "strategy": name, "lr": lr, "fraction-train": fraction_train, "seed": seed, "min-replies": min_replies,
        "num-nodes": 10_000, **{k.replace("_", "-"): v for k, v in options.items()},
    })
    return build_strategy(cfg, ModelSpec.of(spec, params), num_partitions=num_partitions, max_examples=max_examples, device=device)


def sent(strategy: FedsimStrategy, arrays: ArrayRecord, n: int, server_round: int = 1) -> list[Message]:
    """The round's train messages to n nodes (ids 100..), with message ids as a SuperLink gives."""

    class Grid:
        def get_node_ids(self) -> list[int]:
            return list(range(100, 100 + n))

    msgs = list(strategy.configure_train(server_round, arrays, ConfigRecord(), Grid()))
    for i, m in enumerate(msgs):
        assign_message_id(m, f"id{i}")
    return msgs


class each_round(Callback):
    """A callback that calls ``fn(row)`` after every round (``fn`` may raise to crash the run)."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def on_round_end(self, end: RoundEnd) -> None:
        self.fn(end.row)
