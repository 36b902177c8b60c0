"""The three non-public Flower 1.41 touchpoints the in-process engine needs, in one place.

flwr is pinned exactly (pyproject) because of these; tests/test_engine.py exercises each.
1. ``Message(content, dst_node_id, message_type)`` reads run id, source node and task id
   from the process-global ``flwr.supercore.task_identity.TaskIdentity``.
2. Every message needs an id, and ``Metadata.message_id`` is read-only: Flower's own
   runtime writes ``metadata.__dict__["_message_id"]``.
3. ``Grid.set_run`` / ``Grid.run`` use ``flwr.supercore.run.Run``.
4. (speed only) A record's items live in ``__dict__["_data"]`` (flwr's TypedDict); copying
   that dict gives a new container without re-checking every key and value, which was
   the largest per-message cost of the engine with small models.
"""

from __future__ import annotations

from typing import TypeVar

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["Run", "SUPERLINK_NODE_ID", "assign_message_id", "copy_record", "set_server_identity"]

R = TypeVar("R")


def copy_record(record: R) -> R:
    """A new record container holding the same (immutable) values: a private shallow copy."""
    new = type(record).__new__(type(record))  # type: ignore[call-overload]
    new.__dict__.update(record.__dict__)
    new.__dict__["_data"] = dict(record.__dict__["_data"])
    return new


def set_server_identity(run_id: int, task_id: int = 1) -> None:
    """Make this process the ServerApp of ``run_id`` so that ``Message(...)`` can be built."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = task_id


def assign_message_id(msg: Message, message_id: str) -> None:
    """Give ``msg`` the id a SuperLink would have given it."""
    msg.metadata.__dict__["_message_id"] = message_id
