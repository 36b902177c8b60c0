"""fedsim's in-process engine: a ``flwr.serverapp.Grid`` that hands each message
straight to a ``ClientApp`` in this process.

One ``Context`` per simulated node (node config with ``partition-id`` and
``num-partitions``, and its own ``state``), made when the node is first sent a message and
kept while its state holds something (``NodeContexts``): a node that exists but is never
sampled costs nothing, so N can be 100,000. No Ray, no SuperLink, no polling. The same
ServerApp and ClientApp objects that ``flwr run .`` loads run on it unchanged.

Semantics kept from Flower's runtime:
- each client receives its own structural copy of the message content (strategies put
  one shared RecordDict into every message; one client's edits must not leak);
- a client that raises becomes an error reply (``Error(code=2, ...)``, as in Flower's
  simulation) and its ``context.state`` changes are discarded;
- replies carry message ids and ``reply_to`` metadata like the SuperLink's.
Cores: with ``workers`` = "auto" (``plan_round``) or a number > 1, the messages of a round
run concurrently on worker threads, one torch intra-op thread each (torch releases the GIL
in its kernels); a client whose minibatch is split into micro-batches
(``fedsim.clients.tasks``) hands its parts to idle workers, so one big client does not
hold the round on one core. Replies come back in push order, every client draws from its
own seeded stream and parts are summed in a fixed order: results are bit-identical for any
number of workers. A node never gets two messages at once (one per round).
"""

from __future__ import annotations

import collections
import copy
import functools
import itertools
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from logging import ERROR, WARNING
from typing import Any, TypeVar

from flwr.app import Context, Message, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedsim.clients.tasks import part_map
from fedsim.engine.deadline import RoundReplies, Runner
from fedsim.engine.flower_internals import (
    Run,
    assign_message_id,
    client_app_error,
    copy_record,
    message_with_metadata,
    set_server_identity,
)
from fedsim.errors import one_line
from fedsim.parallel import available_cores

FIRST_NODE_ID = 1001  # simulated node ids: FIRST_NODE_ID + partition id
# "auto" runs a round on one thread when its clients' work (as last measured) is below this:
# the GIL-held framework work per message (~0.3 ms) would then not overlap, and thread
# hand-offs cost more than they save.
PARALLEL_MIN_ROUND_S = 0.02
# ... and runs a round on all cores only when its recent all-core rounds cost at least this
# much less per client than its recent one-thread rounds (a margin for noise: below it the
# two are a tie, and one thread is the cheaper choice for the machine).
MIN_SPEEDUP = 1.05
# Each setting's cost is the least over its last RECENT rounds: other processes only ever
# slow a round down, so one slow round (another job taking a core) does not decide, and old
# rounds are forgotten (the clients' work changes as a run goes).
RECENT = 3
# The setting that lost is tried again when the round count has grown by this factor since
# its last try (rounds ~6, 12, 24, ...): a try spoiled by a busy machine is not final, and
# the loser's tries cost log2(rounds) rounds only.
RETRY_FACTOR = 2
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class RoundPlan:
    """How a round's messages run: ``workers`` threads (1: one after another on the calling
    thread) taking the messages in ``order`` (indices into the pushed list)."""

    workers: int
    order: tuple[int, ...]


def plan_round(seconds: Sequence[float | None], cores: int, speedup: float | None = None) -> RoundPlan:
    """The plan for a round whose clients took ``seconds`` each on one thread (fastest seen;
    None: not measured), given the ``speedup`` of all cores over one thread (a whole
    round's cost per client on one thread / on all cores, ``RoundCosts``; None: not known).

    One thread when there is one core or client, when no client is measured (the round
    measures them), when the clients' total is under PARALLEL_MIN_ROUND_S or when the
    speedup is under MIN_SPEEDUP. Else one worker per core, each with one torch thread,
    taking the clients longest first (an unmeasured client counts as the measured mean; a
    client split into micro-batches shares its parts with idle workers).
    """
    n = len(seconds)
    known = [s for s in seconds if s is not None]
    one = RoundPlan(1, tuple(range(n)))
    if cores < 2 or n < 2 or not known:
        return one
    mean = sum(known) / len(known)
    cost = [mean if s is None else s for s in seconds]
    if sum(cost) < PARALLEL_MIN_ROUND_S or (speedup is not None and speedup < MIN_SPEEDUP):
        return one
    return RoundPlan(cores, tuple(sorted(range(n), key=lambda i: -cost[i])))  # stable: ties in push order


@dataclass
class RoundCosts:
    """What ``auto`` has measured: per thread count, the wall seconds per client of its
    rounds (a whole round's client work / its clients, so rounds of any size compare)."""

    costs: dict[int, list[float]] = field(default_factory=dict)

    def add(self, workers: int, wall: float, clients: int) -> None:
        if clients > 0 and wall > 0:
            self.costs.setdefault(workers, []).append(wall / clients)

    def speedup(self, cores: int) -> float | None:
        """(one-thread cost / all-core cost), each the least over its last RECENT rounds;
        None until both have run."""
        one, every = self.costs.get(1), self.costs.get(cores)
        if not one or not every:
            return None
        return min(one[-RECENT:]) / min(every[-RECENT:])


class _Workers:
    """``active`` threads' worth of work from one deque; tasks pushed ``front=True`` are taken first.

    ``map_parts`` (a part map, see fedsim.clients.tasks) pushes a task's parts to the front
    and runs every part that no thread has started itself; only then does it wait, for parts
    that are running. While it waits its slot goes to a spare thread, which takes the next
    task (the waiting thread cannot: the part it waits for uses its thread's model). Running
    parts never wait, so the pool cannot deadlock.
    """

    def __init__(self, active: int, spare: int | None = None) -> None:
        self._tasks: collections.deque[tuple[Future, Callable[[], Any]]] = collections.deque()
        self._ready = threading.Condition()
        self._limit, self._active, self._returning = active, 0, 0
        self._closed = False
        self._local = threading.local()
        self.size = active
        count = active + (active if spare is None else spare)
        self._threads = [threading.Thread(target=self._loop, name=f"fedsim-node-{i}", daemon=True) for i in range(count)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[], R], front: bool = False) -> Future:
        future: Future = Future()
        with self._ready:
            (self._tasks.appendleft if front else self._tasks.append)((future, fn))
            self._ready.notify_all()
        return future

    def map_parts(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """[fn(i) for i in items]: the first here, the others by whichever thread is free first."""
        items = list(items)
        futures = [self.submit(functools.partial(fn, item), front=True) for item in reversed(items[1:])][::-1]
        try:
            results: list[Any] = [fn(items[0])] if items else []
            pending = []
            for item, future in zip(items[1:], futures, strict=True):
                if future.cancel():  # nobody started it: run it here
                    results.append(fn(item))
                else:
                    results.append(None)
                    pending.append((len(results) - 1, future))
            for index, future in pending:
                results[index] = self._wait(future)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return results

    def _wait(self, future: Future) -> Any:
        """future.result(), lending this worker's slot to a spare thread meanwhile."""
        if future.done() or not getattr(self._local, "worker", False):
            return future.result()
        with self._ready:
            self._active -= 1
            self._ready.notify_all()
        try:
            return future.result()
        finally:
            with self._ready:
                self._returning += 1  # back before any new task starts
                while self._active >= self._limit:
                    self._ready.wait()
                self._returning -= 1
                self._active += 1

    def close(self) -> None:
        self.abandon()
        for t in self._threads:
            t.join()

    def abandon(self) -> None:
        """Stop taking tasks; each thread exits once its current task returns (never joined)."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def _loop(self) -> None:
        self._local.worker = True
        while True:
            with self._ready:
                while not self._closed and not (self._tasks and self._active + self._returning < self._limit):
                    self._ready.wait()
                if self._closed:
                    return
                future, fn = self._tasks.popleft()
                self._active += 1
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as ex:
                        future.set_exception(ex)
            finally:
                with self._ready:
                    self._active -= 1
                    self._ready.notify_all()


class InProcessGrid(Grid):
    """A Grid whose nodes are ``ClientApp`` calls in this process."""

    engine_name = "inprocess"  # recorded in each run's summary.json

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: UserConfig,
        node_configs: Iterable[Mapping[str, bool | float | int | str]] | None = None,
        run_id: int = 1,
        workers: int | str = 1,
    ) -> None:
        """``workers``: "auto" (plan each round with ``plan_round`` on the available cores)
        or a fixed number of threads (1: one client after another), as checked by
        ``fedsim.engine.parse_workers``."""
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.workers = workers
        threads = available_cores() if workers == "auto" else int(workers)
        self._pool = _Workers(threads) if threads > 1 else None  # plus as many spare threads
        self._runner: Runner | None = None  # one worker: its clients run on this thread
        self._seconds: dict[int, float] = {}  # node id -> its fastest one-thread message time (auto)
        self._costs = RoundCosts()  # auto: whole rounds' cost per client, per thread count
        self._retry_at = 0  # auto: the round count from which the losing setting is tried again
        self._trial = False  # auto: this round tries the setting that lost
        self._pulls = 0
        self.plans: collections.Counter[int] = collections.Counter()  # workers used -> rounds
        extra = list(node_configs) if node_configs is not None else None
        if extra is not None and len(extra) != num_nodes:
            raise ValueError(f"got {len(extra)} node configs for {num_nodes} nodes")
        self.client_app = client_app
        self.num_nodes = num_nodes
        self._run = Run.create_empty(run_id)
        set_server_identity(run_id)
        self.contexts = NodeContexts(run_id, num_nodes, dict(run_config), extra)
        self._pending: dict[str, Message] = {}
        self._ids = itertools.count(1)

    # --- Grid interface ----------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> range:
        """The simulated node ids, in order, as a range: O(1) memory, and a sorted sequence
        the strategy samples from without copying or sorting N ids each round."""
        return range(FIRST_NODE_ID, FIRST_NODE_ID + self.num_nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            if not self.contexts.exists(msg.metadata.dst_node_id):
                raise ValueError(f"message for unknown node {msg.metadata.dst_node_id}")
            message_id = f"m{next(self._ids)}"
            assign_message_id(msg, message_id)
            self._pending[message_id] = msg
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str], timeout: float | None = None) -> list[Message]:
        """The replies to ``message_ids`` in push order; with ``timeout`` (seconds), a client
        call running longer is abandoned and the round goes on without it
        (``fedsim.engine.deadline``)."""
        msgs = [self._pending.pop(mid) for mid in message_ids if mid in self._pending]
        plan = self._plan(msgs)
        self.plans[plan.workers] += 1
        self._pulls += 1
        replies = RoundReplies(len(msgs))
        t0 = time.perf_counter()
        jobs = self._start(msgs, plan, replies, list(plan.order))
        overran = False
        try:
            while not replies.wait(1.0 if timeout is None else replies.next_check(timeout)):
                _raise_failed(jobs)
                late = replies.overrun(timeout) if timeout is not None else []
                if late:
                    overran = True
                    self._log_overrun(msgs, late, timeout)
                    self._retire_workers(plan)
                    jobs += self._start(msgs, plan, replies, replies.unclaimed())
            _raise_failed(jobs)
        except BaseException:  # a KeyboardInterrupt too: nothing may run on unwatched
            self._retire_workers(plan)
            raise
        finally:
            kept = replies.close()
        if self.workers == "auto" and self._pulls > 1 and not overran:  # round 1 also loads data and builds models
            self._costs.add(plan.workers, time.perf_counter() - t0, len(msgs))
            if self._trial:
                self._retry_at = RETRY_FACTOR * self._pulls
        return [kept[i] for i in sorted(kept)]

    def _start(self, msgs: list[Message], plan: RoundPlan, replies: RoundReplies, order: list[int]) -> list[Future]:
        """Hand the messages at ``order`` to the Runner (one worker) or the pool."""
        if not order:
            return []
        if plan.workers == 1 or self._pool is None:
            if self._runner is None or self._runner.retired:
                self._runner = Runner()
            runner = self._runner
            return [runner.submit(functools.partial(self._deliver_all, msgs, order, replies, runner))]
        pool = self._pool
        return [pool.submit(functools.partial(self._parallel_deliver, msgs[i], i, replies, pool.map_parts)) for i in order]

    def _retire_workers(self, plan: RoundPlan) -> None:
        """The threads that may hold an abandoned call take no more work; fresh ones will."""
        if plan.workers == 1 or self._pool is None:
            if self._runner is not None:
                self._runner.retire()
        else:
            self._pool.abandon()
            self._pool = _Workers(self._pool.size)

    def _deliver_all(self, msgs: list[Message], order: list[int], replies: RoundReplies, runner: Runner) -> None:
        """The messages at ``order``, one after another on ``runner``, timing each for ``auto``."""
        for i in order:
            if runner.retired or not replies.start(i):
                continue
            t0 = time.perf_counter()
            self._deliver(msgs[i], i, replies)
            if self._pulls > 1:  # the first round also pays for loading data and building models
                node, took = msgs[i].metadata.dst_node_id, time.perf_counter() - t0
                self._seconds[node] = min(took, self._seconds.get(node, took))  # a hiccup must not look like work

    def _log_overrun(self, msgs: list[Message], late: list[int], timeout: float | None) -> None:
        for i in late:
            log(WARNING, "round %s: node %d overran the round-timeout (%g s); the round goes on without it and its "
                "reply will be discarded", _round_of(msgs[i]), msgs[i].metadata.dst_node_id, timeout)

    def _plan(self, msgs: list[Message]) -> RoundPlan:
        if self._pool is None:
            return RoundPlan(1, tuple(range(len(msgs))))
        if self.workers != "auto":
            return RoundPlan(int(self.workers), tuple(range(len(msgs))))
        cores = available_cores()
        speedup = self._costs.speedup(cores)
        due = speedup is None or self._pulls >= self._retry_at
        if speedup is not None and due:
            speedup = None if speedup < MIN_SPEEDUP else 0.0  # try the setting that lost: all cores, or one thread
        plan = plan_round([self._seconds.get(m.metadata.dst_node_id) for m in msgs], cores, speedup)
        self._trial = due and (plan.workers > 1) == (speedup is None)
        return plan

    def close(self) -> None:
        """Stop the worker threads (if any; an abandoned client's thread is left to itself)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._runner is not None:
            self._runner.retire()
            self._runner = None

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Flower's contract: the replies that came within ``timeout`` seconds (None: wait)."""
        return self.pull_messages(self.push_messages(messages), timeout)

    # --- delivery ----------------------------------------------------------------------

    def _parallel_deliver(self, msg: Message, index: int, replies: RoundReplies, mapper: Callable) -> None:
        """_deliver on a worker thread (unless another thread has it), micro-batches through ``mapper``."""
        if replies.start(index):
            with part_map(mapper):
                self._deliver(msg, index, replies)

    def _deliver(self, msg: Message, index: int, replies: RoundReplies) -> None:
        """Run the ClientApp on a private copy of ``msg``; its reply and node state are kept
        only if the round is still open (``RoundReplies.commit``), the state only on success."""
        node = self.contexts[msg.metadata.dst_node_id]
        state = copy.deepcopy(node.state) if len(node.state) else RecordDict()  # a private copy: rolled back on error
        ctx = Context(node.run_id, node.node_id, node.node_config, state, node.run_config)
        inbound = message_with_metadata(msg.metadata, _copy_content(msg.content))
        ok = False
        try:
            reply = self.client_app(inbound, ctx)
            ok = True
        except Exception as ex:
            # One line; the traceback only on request (a client's failure is often a setup problem, not a bug)
            detail = "\n" + traceback.format_exc() if os.environ.get("FEDSIM_DEBUG", "") not in ("", "0") else ""
            log(ERROR, "node %d raised %s: %s%s", node.node_id, type(ex).__name__, one_line(str(ex)), detail)
            reply = Message(client_app_error(f"{type(ex)}:<'{ex}'>"), reply_to=msg)
        assign_message_id(reply, f"r{next(self._ids)}")

        def settle() -> None:
            if ok:
                node.state = ctx.state
            self.contexts.settle(node)  # kept only while it holds state, failed message or not

        if not replies.commit(index, reply, settle):
            log(WARNING, "round %s: node %d replied after the round-timeout; its reply is discarded", _round_of(msg), node.node_id)


def _round_of(msg: Message) -> str:
    """The server round a fedsim message is for ("?" for a message without one)."""
    try:
        return str(int(msg.content.config_records["config"]["server-round"]))  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return "?"


def _raise_failed(jobs: list[Future]) -> None:
    """Re-raise the error of a delivery job that failed outside a client (a bug, not a client's)."""
    for job in jobs:
        if job.done() and not job.cancelled() and job.exception() is not None:
            raise job.exception()  # type: ignore[misc]


class NodeContexts(dict[int, Context]):
    """node id -> its ``Context``, made when first asked for and dropped again while its
    state is empty, so that a node costs memory only while it has state to keep (a
    stateless algorithm's 100,000 nodes cost none). A dropped node's next Context is made
    afresh from the same node config and run config (a copy each)."""

    def __init__(self, run_id: int, num_nodes: int, run_config: dict, node_configs: list[Mapping[str, Any]] | None) -> None:
        super().__init__()
        self.run_id, self.num_nodes, self.run_config, self.node_configs = run_id, num_nodes, run_config, node_configs

    def exists(self, node_id: int) -> bool:
        return FIRST_NODE_ID <= node_id < FIRST_NODE_ID + self.num_nodes

    def __missing__(self, node_id: int) -> Context:
        if not self.exists(node_id):
            raise KeyError(node_id)
        pid = node_id - FIRST_NODE_ID
        more = dict(self.node_configs[pid]) if self.node_configs is not None else {}
        node_config = {"partition-id": pid, "num-partitions": self.num_nodes, **more}
        ctx = self[node_id] = Context(self.run_id, node_id, node_config, RecordDict(), dict(self.run_config))
        return ctx

    def settle(self, node: Context) -> None:
        """After a message: forget the node's Context if it holds no state."""
        if not len(node.state):
            self.pop(node.node_id, None)


def _copy_content(content: RecordDict) -> RecordDict:
    """A structural copy: new record containers, shared immutable values (array bytes,
    numbers, strings); list values of config/metric records are copied too."""
    out = RecordDict()
    for key, record in content.items():
        out[key] = copy_record(record)
    return out
