"""The three non-public Flower 1.41 touchpoints the in-process engine needs, in one place.

flwr is pinned exactly (pyproject) because of these; tests/test_engine.py exercises each.
1. ``Message(content, dst_node_id, message_type)`` reads run id, source node and task id
   from the process-global ``flwr.supercore.task_identity.TaskIdentity``.
2. Every message needs an id, and ``Metadata.message_id`` is read-only: Flower's own
   runtime writes ``metadata.__dict__["_message_id"]``.
3. ``Grid.set_run`` / ``Grid.run`` use ``flwr.supercore.run.Run``.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["Run", "SUPERLINK_NODE_ID", "assign_message_id", "set_server_identity"]


def set_server_identity(run_id: int, task_id: int = 1) -> None:
    """Make this process the ServerApp of ``run_id`` so that ``Message(...)`` can be built."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = task_id


def assign_message_id(msg: Message, message_id: str) -> None:
    """Give ``msg`` the id a SuperLink would have given it."""
    msg.metadata.__dict__["_message_id"] = message_id
