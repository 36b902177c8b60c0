"""Federated evaluation: a fraction of the clients evaluate the global model on their own
held-out data, and the server aggregates what they report.

Every ``eval-every`` rounds (and round 0 and the last), ``eval-fraction`` of the nodes
(at least one) are sampled with a stream of their own (the training sample is not moved
by it) and sent an evaluate message; their replies are untrusted like train replies:
checked one by one (fedsim.protocol.eval_reply_metrics), a node may speak only for the
partition it is bound to, one reply per partition; a bad one is logged in one line with
its node id and left out. The figures (fedsim.core.aggregate.evaluation_figures) are
example-weighted means of the loss and each metric, and the accuracy's per-client mean,
10th percentile and minimum.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from fedsim.core.aggregate import evaluation_figures
from fedsim.errors import one_line
from fedsim.protocol import ARRAYS, CONFIG, BadReply, EvalMetrics, eval_reply_metrics
from fedsim.seeding import stream_seed

_EVAL_STREAM = 0xE7A1  # the purpose of the sampling stream's seed


@dataclass(frozen=True)
class FederatedEvaluation:
    """One evaluation round: the figures (``loss``, each metric, ``accuracy_p10``, ...,
    ``clients``) and every used reply."""

    round: int
    figures: dict[str, float]
    clients: list[EvalMetrics]


class FederatedEvaluator:
    """Samples, sends and checks one evaluation round; ``owner(node) -> bound partition``
    and ``holder(partition) -> bound node`` are the strategy's identity bindings."""

    def __init__(self, fraction: float, names: Sequence[str], seed: int, num_partitions: int | None, max_examples: int | None) -> None:
        self.fraction, self.names = fraction, tuple(names)
        self.num_partitions, self.max_examples = num_partitions, max_examples
        self.rng = random.Random(stream_seed(seed, _EVAL_STREAM))

    def messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, nodes: Sequence[int]) -> list[Message]:
        """The evaluate messages to a sample of ``nodes`` (none when the fraction is 0)."""
        if self.fraction <= 0 or not nodes:
            return []
        k = max(1, round(self.fraction * len(nodes)))
        chosen = sorted(self.rng.sample(sorted(nodes), k)) if k < len(nodes) else sorted(nodes)
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        record = RecordDict({ARRAYS: arrays, CONFIG: cfg})
        return [Message(content=record, dst_node_id=n, message_type=MessageType.EVALUATE) for n in chosen]

    def collect(self, server_round: int, replies: Iterable[Message], bound: Callable[[int, int], str | None]) -> FederatedEvaluation:
        """The round's figures from its checked replies; ``bound(node, partition)`` says
        why a node may not report for a partition (None: it may)."""
        used: list[EvalMetrics] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                r = eval_reply_metrics(msg, self.names, num_partitions=self.num_partitions, max_examples=self.max_examples)
                reason = bound(r.node_id, r.partition_id) if r.partition_id is not None else None
                if reason is None and any(u.client == r.client for u in used):
                    reason = f"{'partition-id' if r.partition_id is not None else 'node'} {r.client} already reported this evaluation round"
                if reason is not None:
                    raise BadReply(reason)
                used.append(r)
            except Exception as err:
                reason = str(err) if isinstance(err, BadReply) else f"{type(err).__name__}: {err}"
                log(WARNING, "round %d: rejected the evaluate reply of node %d: %s", server_round, node, one_line(reason))
        used.sort(key=lambda r: r.client)
        figures = evaluation_figures(
            [r.num_examples for r in used], [r.loss for r in used], {n: [r.values[n] for r in used] for n in self.names},
        )
        return FederatedEvaluation(server_round, figures, used)

    def state(self) -> list[object]:
        version, internal, gauss = self.rng.getstate()
        return [version, list(internal), gauss]

    def load(self, state: list[object]) -> None:
        version, internal, gauss = state
        self.rng.setstate((version, tuple(internal), gauss))  # type: ignore[arg-type]
