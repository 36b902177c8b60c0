"""Every non-public Flower API fedsim uses (fedsim.engine.flower_internals), checked against
the installed flwr: each test names the API it needs, so a flwr upgrade that changes one
fails here with that name rather than somewhere deep in a run.

Also: no other fedsim module (or test) imports a non-public flwr module.
"""

import ast
import inspect
import typing
from pathlib import Path

import flwr
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedsim.engine import flower_internals as fi
from fedsim.engine.inprocess import InProcessGrid

ROOT = Path(__file__).resolve().parents[1]
PINNED = "1.42.0"


def test_installed_flwr_is_the_pinned_one():
    # flower_internals was checked against this version; another one may have moved things.
    pin = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if '"flwr[simulation]==' in line)
    assert f"=={PINNED}" in pin, f"pyproject pins {pin.strip()}, this test checks {PINNED}: update PINNED after checking flower_internals"
    assert flwr.__version__ == PINNED, f"installed flwr {flwr.__version__}, fedsim pins {PINNED}: reinstall (pip install -e .)"


def test_task_identity_sets_run_and_source_of_new_messages():
    # flwr.supercore.task_identity.TaskIdentity: Message(content, dst, type) reads it.
    fi.set_server_identity(4242, task_id=7)
    msg = Message(RecordDict(), 1001, MessageType.TRAIN)
    assert msg.metadata.run_id == 4242, "TaskIdentity.run_id no longer reaches Message metadata (flwr.supercore.task_identity)"
    assert msg.metadata.src_node_id == fi.SUPERLINK_NODE_ID, "TaskIdentity.node_id no longer reaches Message.metadata.src_node_id"
    assert msg.metadata.dst_node_id == 1001 and msg.metadata.message_type == MessageType.TRAIN
    fi.set_server_identity(4243)
    assert Message(RecordDict(), 1001, MessageType.TRAIN).metadata.run_id == 4243, "TaskIdentity.run_id is read once, not per message"


def test_superlink_node_id_is_an_int():
    # flwr.common.constant.SUPERLINK_NODE_ID: the ServerApp's node id (fedsim.engine.runner).
    assert isinstance(fi.SUPERLINK_NODE_ID, int), f"flwr.common.constant.SUPERLINK_NODE_ID is {fi.SUPERLINK_NODE_ID!r}"


def test_assign_message_id_sets_the_read_only_message_id():
    # Metadata.message_id has no setter; Flower writes metadata.__dict__["_message_id"].
    fi.set_server_identity(1)
    msg = Message(RecordDict(), 1001, MessageType.TRAIN)
    with pytest.raises(AttributeError):
        msg.metadata.message_id = "x"  # if this works, flwr made it public: drop assign_message_id
    fi.assign_message_id(msg, "m17")
    assert msg.metadata.message_id == "m17", "Metadata no longer keeps message_id in __dict__['_message_id']"
    reply = Message(RecordDict(), reply_to=msg)
    assert reply.metadata.reply_to_message_id == "m17", "a reply no longer takes reply_to_message_id from message_id"
    assert reply.metadata.dst_node_id == msg.metadata.src_node_id and reply.metadata.run_id == 1


def test_message_with_metadata_keeps_the_metadata_and_takes_the_content():
    # Message(metadata=..., content=...): flwr's "internal use only" constructor path.
    fi.set_server_identity(5)
    msg = Message(RecordDict({"c": ConfigRecord({"a": 1})}), 1002, MessageType.EVALUATE, group_id="3")
    fi.assign_message_id(msg, "m1")
    content = RecordDict({"c": ConfigRecord({"a": 2})})
    copy = fi.message_with_metadata(msg.metadata, content)
    assert copy.metadata is msg.metadata, "Message(metadata=...) no longer keeps the given Metadata"
    assert copy.content is content and copy.content["c"]["a"] == 2
    assert (copy.metadata.message_id, copy.metadata.group_id, copy.metadata.dst_node_id) == ("m1", "3", 1002)


def test_run_create_empty_and_grid_set_run_signature():
    # flwr.supercore.run.Run types Grid.set_run(run) / Grid.run (abstract in flwr.serverapp.Grid).
    run = fi.Run.create_empty(31)
    assert run.run_id == 31, "flwr.supercore.run.Run.create_empty(run_id) changed"
    params = list(inspect.signature(Grid.set_run).parameters)
    assert params == ["self", "run"], f"Grid.set_run now takes {params}; InProcessGrid.set_run(run) must follow"
    assert typing.get_type_hints(Grid.set_run)["run"] is fi.Run, "Grid.set_run no longer takes flwr.supercore.run.Run"
    assert typing.get_type_hints(Grid.run.fget)["return"] is fi.Run, "Grid.run no longer returns flwr.supercore.run.Run"


def test_in_process_grid_implements_every_abstract_grid_method():
    missing = set(InProcessGrid.__abstractmethods__)
    assert not missing, f"flwr.serverapp.Grid gained abstract methods InProcessGrid lacks: {sorted(missing)}"
    grid = InProcessGrid(ClientApp(), 2, run_config={}, run_id=8)
    try:
        assert grid.run.run_id == 8
        grid.set_run(fi.Run.create_empty(9))  # as Flower's run_serverapp calls it
        assert grid.run.run_id == 9
    finally:
        grid.close()


@pytest.mark.parametrize(
    "record",
    [
        ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))}),
        ConfigRecord({"lr": 0.1, "name": "x", "ids": [1, 2, 3]}),
        MetricRecord({"loss": 0.5, "per-class": [0.1, 0.2]}),
    ],
    ids=["ArrayRecord", "ConfigRecord", "MetricRecord"],
)
def test_copy_record_is_equal_and_independent(record):
    # A record's items live in record.__dict__["_data"] (flwr.app.message.typeddict.TypedDict).
    assert isinstance(record.__dict__.get("_data"), dict), f"{type(record).__name__} no longer keeps its items in __dict__['_data']"
    copy = fi.copy_record(record)
    assert type(copy) is type(record) and copy is not record
    assert copy == record, f"copy_record gave a {type(record).__name__} unequal to the original"
    key = next(iter(record))
    assert copy[key] is record[key] or isinstance(record[key], list), "values other than lists are shared, not copied"
    copy["new"] = record[key] if not isinstance(record[key], list) else [9]
    assert "new" not in record, "a key added to the copy reached the original: the copy shares its container"
    for k, v in record.items():
        if isinstance(v, list):
            copy[k].append(99)
            assert 99 not in record[k], f"editing list {k!r} in the copy changed the original"


def test_client_app_error_has_flowers_error_code():
    # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION, as Flower's simulation replies.
    assert fi.CLIENT_APP_RAISED_EXCEPTION == 2, f"ErrorCode.CLIENT_APP_RAISED_EXCEPTION is now {fi.CLIENT_APP_RAISED_EXCEPTION}"
    err = fi.client_app_error("<class 'RuntimeError'>:<'boom'>")
    assert isinstance(err, Error) and err.code == 2 and err.reason == "<class 'RuntimeError'>:<'boom'>"


def test_fab_functions_keep_their_signatures():
    # flwr.cli.build.build_fab_from_disk and flwr.cli.install.install_from_fab (tests/test_fab.py runs them).
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.install import install_from_fab

    assert list(inspect.signature(build_fab_from_disk).parameters) == ["app"], "flwr.cli.build.build_fab_from_disk changed"
    params = inspect.signature(install_from_fab).parameters
    assert {"fab_file", "install_dir", "skip_prompt"} <= set(params), f"flwr.cli.install.install_from_fab takes {list(params)}"


# Public flwr: these modules (and flwr.common.logger's log). Anything else goes through
# fedsim.engine.flower_internals.
PUBLIC = {"flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy"}
# Known uses elsewhere: only tests, for an independent oracle (keep fedsim's own code free of
# them, or move the use into flower_internals). tests/test_robust.py checks fedsim's robust
# aggregators against Flower's legacy ones (flwr.server.strategy.aggregate).
KNOWN: set[tuple[str, str, str]] = {
    ("tests/test_robust.py", "flwr.server.strategy.aggregate", name)
    for name in ("aggregate", "aggregate_bulyan", "aggregate_krum", "aggregate_median", "aggregate_trimmed_avg")
}


def _flwr_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "flwr":
            for alias in node.names:
                yield node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "flwr" and alias.name != "flwr":
                    yield alias.name, None


def test_no_non_public_flwr_import_outside_flower_internals():
    skip = {ROOT / "fedsim/engine/flower_internals.py", Path(__file__).resolve()}
    found = []
    for path in sorted([*(ROOT / "fedsim").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        if path in skip:
            continue
        rel = path.relative_to(ROOT).as_posix()
        for module, name in _flwr_imports(path):
            if module in PUBLIC or (module == "flwr.common.logger" and name == "log"):
                continue
            if (rel, module, name) in KNOWN:
                mod = __import__(module, fromlist=[name])
                assert hasattr(mod, name), f"{rel} imports {module}.{name}, which flwr {flwr.__version__} no longer has"
                continue
            found.append(f"{rel}: from {module} import {name}")
    assert not found, "non-public flwr imports outside fedsim/engine/flower_internals.py:\n" + "\n".join(found)
