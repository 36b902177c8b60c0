"""fedsim's in-process engine: a ``flwr.serverapp.Grid`` that hands each message
straight to a ``ClientApp`` in this process.

One persistent ``Context`` per simulated node (node config with ``partition-id`` and
``num-partitions``, and its own ``state``); no Ray, no SuperLink, no polling. The same
ServerApp and ClientApp objects that ``flwr run .`` loads run on it unchanged.

Semantics kept from Flower's runtime:
- each client receives its own structural copy of the message content (strategies put
  one shared RecordDict into every message; one client's edits must not leak);
- a client that raises becomes an error reply (``Error(code=2, ...)``, as in Flower's
  simulation) and its ``context.state`` changes are discarded;
- replies carry message ids and ``reply_to`` metadata like the SuperLink's.
With ``workers > 1`` the messages of a round run concurrently on a thread pool (torch
releases the GIL in its kernels, so clients use several cores); replies come back in
push order and every client draws from its own seeded stream, so results do not depend
on the number of workers. A node never gets two messages at once (one per round).
"""

from __future__ import annotations

import copy
import itertools
import os
import traceback
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from logging import ERROR

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.user_config import UserConfig
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedsim.engine.flower_internals import Run, assign_message_id, copy_record, set_server_identity

FIRST_NODE_ID = 1001  # simulated node ids: FIRST_NODE_ID + partition id


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
        workers: int = 1,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedsim-node") if workers > 1 else None
        extra = list(node_configs) if node_configs is not None else [{}] * num_nodes
        if len(extra) != num_nodes:
            raise ValueError(f"got {len(extra)} node configs for {num_nodes} nodes")
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        set_server_identity(run_id)
        self.contexts: dict[int, Context] = {}
        for pid, more in enumerate(extra):
            node_id = FIRST_NODE_ID + pid
            node_config = {"partition-id": pid, "num-partitions": num_nodes, **dict(more)}
            self.contexts[node_id] = Context(run_id, node_id, node_config, RecordDict(), dict(run_config))
        self._pending: dict[str, Message] = {}
        self.on_round: Callable[[Any], None] | None = None  # see fedsim.server_app.RoundReporter
        self._ids = itertools.count(1)

    # --- Grid interface ----------------------------------------------------------------

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        self._run = Run.create_empty(run_id)

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"message for unknown node {msg.metadata.dst_node_id}")
            message_id = f"m{next(self._ids)}"
            assign_message_id(msg, message_id)
            self._pending[message_id] = msg
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        msgs = [self._pending.pop(mid) for mid in message_ids if mid in self._pending]
        if self._pool is None or len(msgs) < 2:
            return [self._deliver(m) for m in msgs]
        return list(self._pool.map(self._deliver, msgs))

    def close(self) -> None:
        """Stop the worker threads (if any)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    # --- delivery ----------------------------------------------------------------------

    def _deliver(self, msg: Message) -> Message:
        """Run the ClientApp on a private copy of ``msg``; commit node state only on success."""
        node = self.contexts[msg.metadata.dst_node_id]
        state = copy.deepcopy(node.state) if len(node.state) else RecordDict()  # a private copy: rolled back on error
        ctx = Context(node.run_id, node.node_id, node.node_config, state, node.run_config)
        inbound = Message(metadata=msg.metadata, content=_copy_content(msg.content))
        try:
            reply = self.client_app(inbound, ctx)
            node.state = ctx.state
        except Exception as ex:  # noqa: BLE001 - a raising client is an error reply, as in Flower
            # One line; the traceback only on request (a client's failure is often a setup problem, not a bug)
            detail = "\n" + traceback.format_exc() if os.environ.get("FEDSIM_DEBUG", "") not in ("", "0") else ""
            log(ERROR, "node %d raised %s: %s%s", node.node_id, type(ex).__name__, ex, detail)
            reason = f"{type(ex)}:<'{ex}'>"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
        assign_message_id(reply, f"r{next(self._ids)}")
        return reply


def _copy_content(content: RecordDict) -> RecordDict:
    """A structural copy: new record containers, shared immutable values (array bytes,
    numbers, strings); list values of config/metric records are copied too."""
    out = RecordDict()
    for key, record in content.items():
        new = copy_record(record)
        if isinstance(record, (ConfigRecord, MetricRecord)):
            data = new.__dict__["_data"]
            for k, v in data.items():
                if isinstance(v, list):
                    data[k] = list(v)
        out[key] = new
    return out
