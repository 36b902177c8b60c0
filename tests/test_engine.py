"""The in-process Grid: Flower semantics (copies, error replies, node state) on a toy ClientApp."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.engine.inprocess import FIRST_NODE_ID, InProcessGrid
from fedsim.validation import load_config

toy = ClientApp()


@toy.train()
def _train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    cfg["touched"] = context.node_config["partition-id"]  # must not leak to other nodes
    count = context.state.config_records.get("count", ConfigRecord({"n": 0}))
    count["n"] = int(count["n"]) + 1
    context.state["count"] = count
    if cfg.get("fail-on") == context.node_config["partition-id"]:
        raise RuntimeError("deliberate failure")
    x = msg.content["arrays"]["x"].numpy()
    return Message(
        RecordDict({"arrays": ArrayRecord({"x": Array(x + context.node_config["partition-id"])}), "metrics": MetricRecord({"calls": count["n"], "seen": int(cfg.get("touched", -1))})}),
        reply_to=msg,
    )


def _send(grid, config):
    content = RecordDict({"arrays": ArrayRecord({"x": Array(np.zeros(2, np.float32))}), "config": ConfigRecord(config)})
    msgs = [grid.create_message(content, MessageType.TRAIN, n, "1") for n in grid.get_node_ids()]
    return list(grid.send_and_receive(msgs)), content


def test_nodes_get_partition_configs_and_private_copies():
    grid = InProcessGrid(toy, 3, run_config={"a": 1}, node_configs=[{"batch-size": 4}] * 3)
    assert list(grid.get_node_ids()) == [FIRST_NODE_ID, FIRST_NODE_ID + 1, FIRST_NODE_ID + 2]
    assert isinstance(grid.get_node_ids(), range)  # O(1) memory; the strategy samples from it without sorting
    assert grid.contexts[FIRST_NODE_ID + 2].node_config == {"partition-id": 2, "num-partitions": 3, "batch-size": 4}
    replies, content = _send(grid, {})
    assert [r.content["arrays"]["x"].numpy().tolist() for r in replies] == [[0, 0], [1, 1], [2, 2]]
    assert "touched" not in content["config"]  # the server's shared record is untouched
    assert all(r.metadata.reply_to_message_id for r in replies)
    assert len({r.metadata.message_id for r in replies}) == 3


def test_raising_client_gives_error_reply_and_keeps_old_state():
    grid = InProcessGrid(toy, 2, run_config={})
    _send(grid, {})
    replies, _ = _send(grid, {"fail-on": 1})
    assert not replies[0].has_error() and replies[0].content["metrics"]["calls"] == 2
    assert replies[1].has_error() and replies[1].error.code == 2 and "deliberate failure" in replies[1].error.reason
    # node 1's second call raised: its state change was discarded
    assert grid.contexts[FIRST_NODE_ID + 1].state["count"]["n"] == 1
    assert grid.contexts[FIRST_NODE_ID].state["count"]["n"] == 2


def test_fedsim_client_without_partition_in_node_config_replies_with_a_clear_error():
    from fedsim.client_app import app as fedsim_client

    cfg = load_config({}).to_mapping()
    grid = InProcessGrid(fedsim_client, 1, cfg)
    grid.contexts[FIRST_NODE_ID].node_config = {}
    content = RecordDict({"arrays": ArrayRecord({"x": Array(np.zeros(2, np.float32))}), "config": ConfigRecord({"task": "sign", "server-round": 1})})
    (reply,) = grid.send_and_receive([grid.create_message(content, MessageType.TRAIN, FIRST_NODE_ID, "1")])
    assert reply.has_error() and "--node-config" in reply.error.reason


stateless = ClientApp()


@stateless.train()
def _echo(msg: Message, context: Context) -> Message:
    pid = context.node_config["partition-id"]
    return Message(RecordDict({"metrics": MetricRecord({"pid": pid, "n": context.node_config["num-partitions"]})}), reply_to=msg)


def test_a_node_costs_nothing_until_sampled_and_keeps_a_context_only_with_state():
    import tracemalloc

    tracemalloc.start()
    grid = InProcessGrid(stateless, 100_000, run_config={"a": 1})
    made = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert made < 1_000_000  # 100,000 nodes that exist: no Context, no node config each
    ids = grid.get_node_ids()
    assert len(ids) == 100_000 and ids[0] == FIRST_NODE_ID and ids[-1] == FIRST_NODE_ID + 99_999
    content = RecordDict({"config": ConfigRecord({})})
    replies = grid.send_and_receive([grid.create_message(content, MessageType.TRAIN, n, "1") for n in (FIRST_NODE_ID + 7, FIRST_NODE_ID + 99_999)])
    assert [(r.content["metrics"]["pid"], r.content["metrics"]["n"]) for r in replies] == [(7, 100_000), (99_999, 100_000)]
    assert len(grid.contexts) == 0  # stateless nodes: their Contexts went with the message
    stateful = InProcessGrid(toy, 1000, run_config={})
    _ = stateful.send_and_receive([stateful.create_message(RecordDict({"arrays": ArrayRecord({"x": Array(np.zeros(2, np.float32))}), "config": ConfigRecord({})}), MessageType.TRAIN, FIRST_NODE_ID + 3, "1")])
    assert list(stateful.contexts) == [FIRST_NODE_ID + 3] and stateful.contexts[FIRST_NODE_ID + 3].state["count"]["n"] == 1
    with pytest.raises(ValueError, match="unknown node"):
        grid.push_messages([grid.create_message(content, MessageType.TRAIN, FIRST_NODE_ID + 100_000, "1")])
