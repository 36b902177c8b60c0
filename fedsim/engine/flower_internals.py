"""Every non-public Flower API fedsim uses, in one place (pinned: flwr 1.42.0).

flwr is pinned exactly (pyproject.toml) because of these; tests/test_flower_internals.py
checks each one against the installed flwr and names the API when it changed. Each was
read in the installed sources of flwr 1.41.0 and 1.42.0: the files holding them are
identical in both. What 1.42.0 changed (a diff of the two installed packages: tracing
spans and middleware removed, a token count for the run-series' compacted context in its
proto and state, agent/model task processes) touches nothing fedsim uses.

1. ``set_server_identity``: ``Message(content, dst_node_id, message_type)`` reads run id,
   source node and task id from the process-global
   ``flwr.supercore.task_identity.TaskIdentity``; the in-process engine (and tests that
   build messages) must set it as Flower's ServerApp process does.
2. ``assign_message_id``: every message needs an id, and ``Metadata.message_id`` is
   read-only: Flower's own runtime writes ``metadata.__dict__["_message_id"]``.
3. ``Run``: ``flwr.serverapp.Grid.set_run(run)`` / ``Grid.run`` are abstract and typed with
   ``flwr.supercore.run.Run``, so a Grid subclass must build one (``Run.create_empty``).
4. ``copy_record`` (speed only): a record's items live in ``__dict__["_data"]`` (flwr's
   ``TypedDict``); copying that dict gives a new container without re-checking every key
   and value, which was the largest per-message cost of the engine with small models.
5. ``client_app_error``: the ``Error`` Flower's runtime puts in the reply of a ClientApp
   that raised: code ``flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION`` (2).
6. ``SUPERLINK_NODE_ID`` (``flwr.common.constant``): the ServerApp's node id, the source
   of every message it sends (fedsim.engine.runner compares with it).
7. ``message_with_metadata``: ``Message(metadata=..., content=...)``, documented by
   flwr as "for internal use only": the in-process engine hands each ClientApp a message
   with the pushed message's metadata (ids, run, nodes) and its own copy of the content.
8. ``build_fab`` / ``install_fab`` (tests/test_fab.py only): ``flwr.cli.build`` and
   ``flwr.cli.install``, the functions ``flwr run`` and the simulation process use to
   pack and unpack this project; imported when called.

Not here (a file this module's owner may not edit): ``fedsim/strategies/base.py`` imports
``flwr.serverapp.strategy.strategy_utils.log_strategy_start_info``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from flwr.app import Error, Message, Metadata, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = [
    "CLIENT_APP_RAISED_EXCEPTION",
    "SUPERLINK_NODE_ID",
    "Run",
    "assign_message_id",
    "build_fab",
    "client_app_error",
    "copy_record",
    "install_fab",
    "message_with_metadata",
    "set_server_identity",
]

R = TypeVar("R")

CLIENT_APP_RAISED_EXCEPTION: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def copy_record(record: R) -> R:
    """A new record container holding the same (immutable) values: a private shallow copy.
    List values (config and metric records may hold lists) are copied too, so editing one
    in the copy leaves the original as it was."""
    new = type(record).__new__(type(record))
    new.__dict__.update(record.__dict__)
    data = dict(record.__dict__["_data"])
    for key, value in data.items():
        if isinstance(value, list):
            data[key] = list(value)
    new.__dict__["_data"] = data
    return new


def set_server_identity(run_id: int, task_id: int = 1) -> None:
    """Make this process the ServerApp of ``run_id`` so that ``Message(...)`` can be built."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = task_id


def assign_message_id(msg: Message, message_id: str) -> None:
    """Give ``msg`` the id a SuperLink would have given it."""
    msg.metadata.__dict__["_message_id"] = message_id


def message_with_metadata(metadata: Metadata, content: RecordDict) -> Message:
    """A message holding ``content`` with ``metadata`` as given (nothing derived or checked)."""
    return Message(metadata=metadata, content=content)  # type: ignore[call-overload]  # Flower's own (untyped) path


def client_app_error(reason: str) -> Error:
    """The error a reply carries when its ClientApp raised, as Flower's runtime writes it."""
    return Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason)


def build_fab(project: Path) -> bytes:
    """The FAB (zip bytes) ``flwr run <project>`` would build and send to the SuperLink."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(project)


def install_fab(fab: bytes, install_dir: Path) -> Path:
    """Unpack and validate ``fab`` under ``install_dir`` as a SuperNode does; the app's folder."""
    from flwr.cli.install import install_from_fab

    return install_from_fab(fab, install_dir=install_dir, skip_prompt=True)
