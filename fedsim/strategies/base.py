"""The Flower strategy that drives any registered algorithm (fedsim.algorithms).

It samples a fraction C of the nodes, sends each the global model and the algorithm's
name, checks every reply and hands the good ones to the algorithm's ``server_rule``.
Replies are untrusted and checked one by one (metrics in range, the algorithm's payload
decoded byte-exactly by its ``parse``, no extra records, one reply per partition, a
partition's num-examples the same as in its first used reply, the node's partition the
one it was bound to): a bad one, or one whose check raises anything, is logged in one
line with its node id and reason and left out; the round goes on with the rest. Fewer
than ``min_replies`` valid replies, or fewer than the algorithm's server rule needs
(``Algorithm.replies_problem``: Krum's n > 2f + 2, ...), leave the global model
unchanged, with one WARNING line. Replies are used in
partition-id order so that results do not depend on arrival order.

Identity: a node's first used reply binds that node to the partition it claims (node id
-> partition id, one node per partition). Later a reply claiming another partition, or
a partition bound to another node, is rejected naming both nodes. Within a round, among
nodes not bound yet, the lowest node id per partition wins (replies sorted by partition
id, then node id). The binding is part of ``state_dict``; after a restore, bindings of
nodes that are not connected any more are dropped at the next round (Flower's simulation
runtime gives nodes new ids in every run), so their partitions bind afresh.

No poison is committed: an algorithm with a plausibility bound (``PlausibilityBound``, e.g.
EF-signSGD's scale against the model's) rejects a reply outside it like any bad reply, and
a new global model with a NaN or an infinity (``non_finite_keys``, one check for every
algorithm) is not committed: the round keeps the previous model and logs one WARNING line
naming the replies with the largest norms. Rounds that keep the model (too few replies, a
non-finite aggregate) are ``failed_rounds``; ``run`` stops after ``max_bad_rounds`` of them
in a row (``stalled_at``).

ALIE (the run's ``attack`` is "lie"): after every check, the replies of the run's
attackers (``liars``: partition ids from the run config, never a mark a reply carries) get
the algorithm's ``lie`` payload, mu - z sigma of the round's honest payloads, z from the
round's valid replies n and attackers among them f (fedsim.attacks.alie_z); the honest
replies are in partition-id order, so the lie is the same for any arrival order or
number of workers. A round with attackers and no honest reply leaves the attackers out.

``run`` is fedsim's round loop with an explicit hook after each round
(``on_round_end(round, arrays, metrics) -> stop?``); Flower's own ``Strategy.start``
(inherited) also works, with client evaluation skipped.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.algorithms.base import Algorithm
from fedsim.algorithms.downlink import SIGNS, DownlinkServer
from fedsim.attacks import alie_z
from fedsim.core.aggregate import non_finite_keys, payload_norm, weighted_mean
from fedsim.errors import one_line
from fedsim.protocol import (
    ARRAYS,
    BUFFERS,
    CONFIG,
    METRICS,
    BadReply,
    PlausibilityBound,
    Reply,
    checked_arrays,
    content_bytes,
    no_extra_records,
    reply_metrics,
)
from fedsim.strategies.evaluation import FederatedEvaluation, FederatedEvaluator

# (round, model after it, the round's train metrics (None for round 0), its federated
# evaluation (None when none was due)) -> stop after this round?
RoundEndHook = Callable[[int, ArrayRecord, MetricRecord | None, FederatedEvaluation | None], bool]

# Why a round kept the previous model (FedsimStrategy.failed_rounds' values).
TOO_FEW_REPLIES = "min-replies"
TOO_FEW_FOR_RULE = "aggregator"  # fewer valid replies than the server rule needs (Algorithm.replies_problem)
NON_FINITE = "non-finite"
NORMS_LOGGED = 3  # a non-finite aggregate's WARNING names this many replies, largest norm first


def _ordered(norm: float) -> float:
    """A norm for sorting, largest first: NaN (a payload holding NaN) counts as infinite."""
    return math.inf if math.isnan(norm) else norm


def _buffers(reply: Reply[Any]) -> dict[str, np.ndarray]:
    """A reply's checked float buffers (present whenever the strategy expects them)."""
    assert reply.buffers is not None
    return reply.buffers


class FedsimStrategy(Strategy):
    """Sample a fraction C of nodes, send the algorithm's task, check replies, apply.

    ``num_partitions``: valid partition ids are 0..num_partitions-1 (None: any id >= 0);
    ``max_examples``: the largest ``num-examples`` a reply may claim (the training set's
    size; None: no cap); ``min_replies``: fewer valid replies than this in a round leave
    the global model unchanged; ``evaluation``: federated evaluation (None: none);
    ``max_node_clients``: the most nodes on their own data (replies without a partition
    id) the server keeps state for (None: no cap); ``own_data``: the nodes train on
    their own data, each its own client (replies carry no partition id);
    ``node_partitions``: node id -> partition id bound ahead of time (the run config's
    ``node-partitions``): only these nodes may reply, each for its partition, from round
    1; ``liars``: the partition ids whose payloads ALIE replaces (module docstring; the
    run's attackers when its ``attack`` is "lie", else none); ``downlink``: "model", or
    "signs" (a sign vote's nodes get votes: fedsim.algorithms.downlink).
    """

    def __init__(
        self,
        algorithm: Algorithm[Any, Any],
        fraction_train: float = 1.0,
        seed: int = 0,
        num_partitions: int | None = None,
        max_examples: int | None = None,
        min_replies: int = 1,
        evaluation: FederatedEvaluator | None = None,
        max_node_clients: int | None = None,
        own_data: bool = False,
        node_partitions: Mapping[int, int] | None = None,
        liars: Collection[int] = (),
        downlink: str = "model",
    ) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
        if min_replies < 1:
            raise ValueError(f"min_replies must be >= 1, got {min_replies}")
        if downlink not in algorithm.downlinks:
            raise ValueError(f"downlink={downlink!r} does not apply to {algorithm.name}: it works with {list(algorithm.downlinks)}")
        self.algorithm = algorithm
        self.model = algorithm.model
        self.fraction_train = fraction_train
        self.num_partitions = num_partitions
        self.max_examples = max_examples
        self.min_replies = min_replies
        self.buffer_spec = self.model.buffer_spec if algorithm.sends_buffers else {}
        self._rng = random.Random(seed)
        self._global: ArrayRecord | None = None
        self._bytes_down = 0
        # the signs downlink's bookkeeping (what each node holds, the recent votes); not in checkpoints
        self.downlink = DownlinkServer(self.model, algorithm.hp.lr) if downlink == SIGNS else None
        # partition id -> batch size its replies report (a deployed node's own config may set it)
        self.reported_batch_sizes: dict[int, int] = {}
        # partition id -> the device its replies trained on (cuda-device: CUDA index, -1 = CPU)
        self.reported_devices: dict[int, int] = {}
        # partition id -> num-examples of its first used reply; later replies must repeat it
        self.pinned_num_examples: dict[int, int] = {}
        # node id -> the partition id of its first used reply (its identity for the run)
        self.node_partitions: dict[int, int] = {}
        self.partition_owner: dict[int, int] = {}  # the inverse: partition id -> its bound node (kept with it)
        self.fixed_partitions: dict[int, int] = dict(node_partitions or {})  # never dropped, never rebound
        self._bind_fixed()
        self._prune_bindings = False  # set by load_state_dict: drop bindings of nodes gone since
        self.evaluation = evaluation
        self.max_node_clients = max_node_clients
        self.own_data = own_data
        # round -> why it kept the previous model (TOO_FEW_REPLIES, NON_FINITE)
        self.failed_rounds: dict[int, str] = {}
        self.stalled_at: int | None = None  # the round after which run() stopped: max_bad_rounds failed in a row
        self.liars = frozenset(liars)

    @staticmethod
    def _sorted_nodes(ids: Iterable[int]) -> Sequence[int]:
        """sorted(ids); an increasing range (the in-process grid's) is already that: no O(N)
        list or sort per round at 100,000 nodes, and random.sample draws the same ids from
        it as from the list."""
        return ids if isinstance(ids, range) and ids.step > 0 else sorted(ids)

    # --- fedsim's round loop -------------------------------------------------------------

    def run(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int,
        on_round_end: RoundEndHook,
        *,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        first_round: int = 1,
        eval_every: int = 1,
        max_bad_rounds: int | None = None,
    ) -> ArrayRecord:
        """Rounds ``first_round``..``num_rounds`` (a resumed run starts after its checkpoint);
        ``on_round_end(round, arrays, metrics, evaluation)`` after each, and for round 0
        (the initial model, metrics None) when starting from round 1, with the round's
        federated evaluation when one is due (round 0, every ``eval_every``, the last). It
        returns True to stop after that round. After ``max_bad_rounds`` failed rounds in a
        row (None: never) the loop stops too, setting ``stalled_at``. Returns the final
        global model."""
        log(INFO, "fedsim %s: %d trainable parameters in %d tensors, fraction-train %g, rounds %d..%d",
            self.algorithm.name, self.model.num_params, len(self.model.param_keys), self.fraction_train, first_round, num_rounds)
        if self.algorithm.describe():
            log(INFO, "fedsim %s: %s", self.algorithm.name, self.algorithm.describe())
        arrays = initial_arrays
        config = ConfigRecord() if train_config is None else train_config

        def evaluated(rnd: int) -> FederatedEvaluation | None:
            due = self.evaluation is not None and (rnd % eval_every == 0 or rnd == num_rounds)
            return self._evaluate(grid, rnd, arrays, config, timeout) if due else None

        if first_round == 1 and on_round_end(0, arrays, None, evaluated(0)):
            return arrays
        for rnd in range(first_round, num_rounds + 1):
            replies = grid.send_and_receive(self.configure_train(rnd, arrays, config, grid), timeout=timeout)
            new, metrics = self.aggregate_train(rnd, replies)
            if new is not None:
                arrays = new
            stop = on_round_end(rnd, arrays, metrics, evaluated(rnd))
            if max_bad_rounds is not None and self.failed_in_a_row(rnd) >= max_bad_rounds:
                self.stalled_at = rnd
                log(WARNING, "round %d: the global model has not changed for %d rounds in a row (max-bad-rounds); stopping",
                    rnd, max_bad_rounds)
                break
            if stop:
                break
        return arrays

    def failed_in_a_row(self, server_round: int) -> int:
        """How many rounds in a row, up to ``server_round``, kept the previous model."""
        k = 0
        while server_round - k >= 1 and server_round - k in self.failed_rounds:
            k += 1
        return k

    def _evaluate(self, grid: Grid, rnd: int, arrays: ArrayRecord, config: ConfigRecord, timeout: float) -> FederatedEvaluation:
        assert self.evaluation is not None
        replies = grid.send_and_receive(self.configure_evaluate(rnd, arrays, config, grid), timeout=timeout)
        return self.evaluation.collect(rnd, replies, self._identity_problem)

    # --- Flower Strategy interface ------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue this strategy exactly: ``{"strategy": the
        node-sampling RNG and what clients reported, "algorithm": the algorithm's state}``
        (lists, dicts, ints, tensors: readable with weights_only=True)."""
        version, internal, gauss = self._rng.getstate()
        own = {
            "rng": [version, list(internal), gauss],
            "reported_batch_sizes": dict(self.reported_batch_sizes),
            "reported_devices": dict(self.reported_devices),
            "num_examples": dict(self.pinned_num_examples),
            "node_partitions": dict(self.node_partitions),
            "failed_rounds": dict(self.failed_rounds),
        }
        if self.evaluation is not None:
            own["eval_rng"] = self.evaluation.state()
        return {"strategy": own, "algorithm": self.algorithm.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s result."""
        self._load_own(state["strategy"])
        self.algorithm.load_state_dict(state["algorithm"])
        self._prune_bindings = True

    def _load_own(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self.reported_batch_sizes = {int(k): int(v) for k, v in state["reported_batch_sizes"].items()}
        self.reported_devices = {int(k): int(v) for k, v in state.get("reported_devices", {}).items()}
        # checkpoints written before num-examples was pinned lack the key: pins start afresh
        self.pinned_num_examples = {int(k): int(v) for k, v in state.get("num_examples", {}).items()}
        self.node_partitions = {int(k): int(v) for k, v in state.get("node_partitions", {}).items()}
        self.partition_owner = {pid: node for node, pid in self.node_partitions.items()}
        self._bind_fixed()  # the run config's bindings win over a checkpoint's
        self.failed_rounds = {int(k): str(v) for k, v in state.get("failed_rounds", {}).items()}  # older checkpoints: none
        if self.evaluation is not None and "eval_rng" in state:
            self.evaluation.load(state["eval_rng"])

    def summary(self) -> None:
        log(INFO, "\t└──> fedsim %s, fraction-train %g, %d trainable parameters", self.algorithm.name, self.fraction_train, self.model.num_params)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample max(1, round(C * K)) of the K nodes and send each the model and the task
        (under the signs downlink: the votes it missed, or the model). bytes-down counts
        what each node is sent."""
        nodes = self._sorted_nodes(grid.get_node_ids())
        if self._prune_bindings:
            self._drop_bindings_of_absent_nodes(server_round, nodes)
        if not nodes:
            log(WARNING, "round %d: no nodes are connected; skipping training", server_round)
            return []
        k = max(1, round(self.fraction_train * len(nodes)))
        chosen = sorted(self._rng.sample(nodes, k)) if k < len(nodes) else list(nodes)
        self._global = arrays
        cfg = ConfigRecord(dict(config))
        cfg.update({"algorithm": self.algorithm.name, "server-round": server_round})
        if self.downlink is not None:
            records = self.downlink.messages(server_round, arrays, cfg, chosen)
            self._bytes_down = sum(content_bytes(records[n]) for n in chosen)
            return [Message(content=records[n], dst_node_id=n, message_type=MessageType.TRAIN) for n in chosen]
        record = RecordDict({ARRAYS: arrays, CONFIG: cfg})
        self._bytes_down = content_bytes(record) * len(chosen)
        return [Message(content=record, dst_node_id=n, message_type=MessageType.TRAIN) for n in chosen]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, drop and log the bad ones, and apply the good ones if there are
        at least ``min_replies`` of them (else the global model is unchanged: None)."""
        replies = list(replies)
        if self.downlink is not None:
            self.downlink.settle(replies)  # who holds this round's model now
        checked, received, bytes_up = self._checked(server_round, replies)
        good = self._keep(server_round, checked, self._plausibility_rule())
        for rule in (self._not_bound_elsewhere, self._first_of_partition, self._pinned_num_examples, self._room_for_node):
            good = self._keep(server_round, good, rule)
        self._remember(good)
        good = self._lie(server_round, good)
        metrics = MetricRecord({"clients": len(good), "rejected": received - len(good), "bytes-up": bytes_up, "bytes-down": self._bytes_down, "updated": 0})
        losses = [(r.metrics.train_loss, r.metrics.num_examples) for r in good if not math.isnan(r.metrics.train_loss)]
        if losses:
            metrics["train-loss"] = float(np.average([v for v, _ in losses], weights=[n for _, n in losses]))
        too_few = self._too_few(server_round, len(good))
        if too_few is not None:
            self.failed_rounds[server_round] = too_few
            return None, metrics
        new = self._aggregate(server_round, good)
        if new is None:
            self.failed_rounds[server_round] = NON_FINITE
            return None, metrics
        metrics["updated"] = 1
        return new, metrics

    def _lie(self, server_round: int, good: list[Reply[Any]]) -> list[Reply[Any]]:
        """ALIE: the liars' replies with the algorithm's ``lie`` payload from the honest ones
        (module docstring); without honest replies, the honest ones (none) with one WARNING."""
        lying = [r for r in good if r.metrics.partition_id in self.liars]
        if not lying:
            return good
        honest = [r for r in good if r.metrics.partition_id not in self.liars]
        if not honest:
            log(WARNING, "round %d: attack 'lie': no honest reply to take the mean and std of; the %d attackers' replies are left out",
                server_round, len(lying))
            return honest
        payload = self.algorithm.lie(honest, alie_z(len(good), len(lying)))
        return [dataclasses.replace(r, payload=payload) if r.metrics.partition_id in self.liars else r for r in good]

    def _too_few(self, server_round: int, n: int) -> str | None:
        """Why n valid replies cannot move the model (TOO_FEW_REPLIES: below ``min_replies``;
        TOO_FEW_FOR_RULE: below what the algorithm's server rule needs), with one WARNING
        line; None: enough."""
        if n < self.min_replies:
            log(WARNING, "round %d: %d valid replies, fewer than min-replies=%d; the global model is unchanged",
                server_round, n, self.min_replies)
            return TOO_FEW_REPLIES
        problem = self.algorithm.replies_problem(n)
        if problem is not None:
            log(WARNING, "round %d: %d valid replies: %s; the global model is unchanged", server_round, n, problem)
            return TOO_FEW_FOR_RULE
        return None

    def _aggregate(self, server_round: int, good: list[Reply[Any]]) -> ArrayRecord | None:
        """The algorithm's new global model (with the replies' mean buffers), or None, with
        one WARNING line, if it holds a NaN or an infinity: such a model is never committed."""
        assert self._global is not None
        new = self.algorithm.server_rule(server_round, self._global, good)
        if self._sends_buffers:
            weights = [r.metrics.num_examples for r in good]
            for key in self.buffer_spec:
                mean = weighted_mean([torch.from_numpy(_buffers(r)[key].copy()) for r in good], weights)
                new[key] = Array(mean.numpy().astype(self.buffer_spec[key][1]))
        bad = non_finite_keys({k: new[k].numpy() for k in new.keys()})
        if not bad:
            return new
        norms = sorted(((payload_norm((r.payload, r.buffers)), r.node_id) for r in good), key=lambda t: (-_ordered(t[0]), t[1]))
        largest = ", ".join(f"node {node} ({norm:.3g})" for norm, node in norms[:NORMS_LOGGED])
        log(WARNING, "round %d: the aggregate of %d replies holds NaN or infinite values in %s; the global model is unchanged; "
            "largest replies by norm: %s", server_round, len(good), bad, largest)
        return None

    def _plausibility_rule(self) -> Callable[[Reply[Any], list[Reply[Any]]], str | None]:
        """Rule: a payload within its algorithm's plausibility bound for this round's model
        (fedsim.protocol.PlausibilityBound; an algorithm without one accepts every payload)."""
        if not isinstance(self.algorithm, PlausibilityBound) or self._global is None:
            return lambda r, _: None
        implausible = self.algorithm.plausibility_rule(self._global)
        return lambda r, _: implausible(r.payload)

    def _checked(self, server_round: int, replies: Iterable[Message]) -> tuple[list[Reply[Any]], int, int]:
        """(the replies that pass their own checks, sorted by client then node; how many came;
        their payload bytes)."""
        checked: list[Reply[Any]] = []
        bytes_up = received = 0
        for msg in replies:
            received += 1
            node = msg.metadata.src_node_id
            try:
                if not msg.has_error():
                    bytes_up += content_bytes(msg.content)
                checked.append(self._check(msg, node))
            except BadReply as err:
                self._reject(server_round, node, str(err))
            except Exception as err:  # a bug or an odd record type rejects this reply, not the run
                self._reject(server_round, node, f"{type(err).__name__}: {err}")
        checked.sort(key=lambda r: (r.client, r.node_id))
        return checked, received, bytes_up

    def _remember(self, good: list[Reply[Any]]) -> None:
        """What the round's used replies bind, pin and report (only replies that passed
        every check: a rejected one changes nothing)."""
        for r in good:
            if r.metrics.partition_id is not None:
                self.node_partitions[r.node_id] = r.metrics.partition_id
                self.partition_owner[r.metrics.partition_id] = r.node_id
        self.pinned_num_examples.update({r.client: r.metrics.num_examples for r in good})
        self.reported_batch_sizes.update({r.client: r.metrics.batch_size for r in good})
        self.reported_devices.update({r.client: r.metrics.cuda_device for r in good if r.metrics.cuda_device is not None})

    def _check(self, msg: Message, node: int) -> Reply[Any]:
        """One reply's metrics and payload, checked (BadReply if unusable)."""
        if not msg.has_error() and self.algorithm.record not in msg.content and ARRAYS in msg.content:
            raise BadReply(
                f"it sends a model ('arrays') as a plain Flower ClientApp does, but strategy={self.algorithm.name!r} needs "
                f"fedsim's ClientApp (clientapp = \"fedsim.client_app:app\"); a plain Flower client can take part in fedavg only"
            )
        metrics = reply_metrics(
            msg, num_partitions=self.num_partitions, max_examples=self.max_examples, own_data=self.own_data,
            plain_ok=self.algorithm.record == ARRAYS,
        )
        payload = self.algorithm.parse(msg)
        buffers = checked_arrays(msg, BUFFERS, self.buffer_spec) if self._sends_buffers else None
        no_extra_records(msg, (METRICS, self.algorithm.record, *([BUFFERS] if self._sends_buffers else [])))
        return Reply(node, metrics, payload, buffers)

    @staticmethod
    def _reject(server_round: int, node: int, reason: str) -> None:
        log(WARNING, "round %d: rejected the reply of node %d: %s", server_round, node, one_line(reason))

    def _keep(
        self, server_round: int, replies: list[Reply[Any]], why_not: Callable[[Reply[Any], list[Reply[Any]]], str | None]
    ) -> list[Reply[Any]]:
        """The replies for which ``why_not(reply, kept so far)`` gives no reason; the others
        are rejected with that reason (one log line each)."""
        out: list[Reply[Any]] = []
        for r in replies:
            reason = why_not(r, out)
            if reason is None:
                out.append(r)
            else:
                self._reject(server_round, r.node_id, reason)
        return out

    def _not_bound_elsewhere(self, r: Reply[Any], _: list[Reply[Any]]) -> str | None:
        """Rule: a reply may claim only its node's bound partition, and no partition bound to
        another node (a node cannot take over another's partition or its LLR history, nor
        wander between partitions)."""
        if r.metrics.partition_id is not None:
            return self._identity_problem(r.node_id, r.metrics.partition_id)
        if r.node_id in self.node_partitions:
            return f"sends no partition-id, but node {r.node_id} is bound to partition-id {self.node_partitions[r.node_id]} by its first used reply"
        return None

    def _bind_fixed(self) -> None:
        """Put the ``node_partitions`` bindings in place (dropping any binding they contradict)."""
        for node, pid in self.fixed_partitions.items():
            self.partition_owner.pop(self.node_partitions.pop(node, -1), None)
            self.node_partitions.pop(self.partition_owner.pop(pid, -1), None)
            self.node_partitions[node], self.partition_owner[pid] = pid, node

    def _identity_problem(self, node: int, pid: int) -> str | None:
        """Why ``node`` may not speak for partition ``pid`` (None: it may)."""
        if self.fixed_partitions and node not in self.fixed_partitions:
            return (f"claims partition-id {pid}, but node {node} is not in node-partitions (the run config binds "
                    f"{len(self.fixed_partitions)} nodes to their partitions); add it there if it is one of yours")
        bound, holder = self.node_partitions.get(node), self.partition_owner.get(pid)
        if bound is not None and bound != pid:
            held = f"; partition-id {pid} is bound to node {holder}" if holder is not None else ""
            return f"claims partition-id {pid}, but node {node} is bound to partition-id {bound} by its first used reply{held}"
        if holder is not None and holder != node:
            return f"claims partition-id {pid}, which is bound to node {holder} by its first used reply (a replaced device: see docs/deployment.md)"
        return None

    @staticmethod
    def _first_of_partition(r: Reply[Any], kept: list[Reply[Any]]) -> str | None:
        """Rule (replies sorted): the first reply per client (partition id, or node on its
        own data); two nodes holding one partition is a deployment mistake, and its data
        must not count twice."""
        if kept and kept[-1].client == r.client:
            what = f"partition-id {r.client}" if r.metrics.partition_id is not None else f"node {r.client}"
            return f"{what} already replied this round (node {kept[-1].node_id}); give each SuperNode its own partition-id"
        return None

    def _room_for_node(self, r: Reply[Any], _: list[Reply[Any]]) -> str | None:
        """Rule: the server keeps state for at most ``max_node_clients`` nodes on their own
        data (a node id is its identity there; registered devices bound it in deployment)."""
        if r.metrics.partition_id is not None or r.client in self.pinned_num_examples or self.max_node_clients is None:
            return None
        known = sum(1 for c in self.pinned_num_examples if c not in self.partition_owner)
        if known >= self.max_node_clients:
            return f"the server keeps state for at most {self.max_node_clients} nodes on their own data (num-nodes x 4); a new node is one too many"
        return None

    def _pinned_num_examples(self, r: Reply[Any], _: list[Reply[Any]]) -> str | None:
        """Rule: num-examples as pinned for the partition by its first used reply (a local
        set does not change size within a run)."""
        pinned = self.pinned_num_examples.get(r.client, r.metrics.num_examples)
        if pinned != r.metrics.num_examples:
            what = f"partition-id {r.client}" if r.metrics.partition_id is not None else f"node {r.client}"
            return f"num-examples={r.metrics.num_examples} differs from the {pinned} {what} reported before; a local set does not change size"
        return None

    def _drop_bindings_of_absent_nodes(self, server_round: int, nodes: Sequence[int]) -> None:
        """After a restore: forget bindings of nodes that are not connected now."""
        self._prune_bindings = False
        connected = set(nodes)
        gone = sorted(n for n in self.node_partitions if n not in connected and n not in self.fixed_partitions)
        if gone:
            log(
                INFO, "round %d: %d node(s) bound before the checkpoint are not connected; their partitions %s bind afresh",
                server_round, len(gone), sorted(self.node_partitions[n] for n in gone),
            )
        for n in gone:
            self.partition_owner.pop(self.node_partitions.pop(n), None)

    @property
    def _sends_buffers(self) -> bool:
        return bool(self.buffer_spec)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation's messages to a sample of the nodes (none without it)."""
        if self.evaluation is None:
            return []
        return self.evaluation.messages(server_round, arrays, config, list(grid.get_node_ids()))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The evaluation round's figures (Flower's interface; fedsim's loop keeps the
        per-client replies too)."""
        if self.evaluation is None:
            return None
        return MetricRecord(dict(self.evaluation.collect(server_round, replies, self._identity_problem).figures))
