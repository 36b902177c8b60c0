"""The in-process engine's round-timeout: a client call that blocks is abandoned after
round-timeout seconds, the round goes on with the others (those after it in the round
too), its late reply and state change are discarded, and the run goes on and ends."""

import csv
import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim import cli
from fedsim.engine.inprocess import FIRST_NODE_ID, InProcessGrid

RELEASE = threading.Event()  # set at the end of each test: a blocked client returns (late)
blocking = ClientApp()


@blocking.train()
def _train(msg: Message, context: Context) -> Message:
    count = context.state.config_records.get("count", ConfigRecord({"n": 0}))
    count["n"] = int(count["n"]) + 1
    context.state["count"] = count
    if context.node_config["partition-id"] == msg.content["config"]["block"] and count["n"] == 2:
        RELEASE.wait(60)
    x = msg.content["arrays"]["x"].numpy()
    return Message(RecordDict({"arrays": ArrayRecord({"x": Array(x + 1)}), "metrics": MetricRecord({"calls": count["n"]})}), reply_to=msg)


def _round(grid: InProcessGrid, timeout: float) -> list[Message]:
    content = RecordDict({"arrays": ArrayRecord({"x": Array(np.zeros(2, np.float32))}), "config": ConfigRecord({"block": 1, "server-round": 2})})
    msgs = [grid.create_message(content, MessageType.TRAIN, n, "") for n in grid.get_node_ids()]
    return list(grid.send_and_receive(msgs, timeout=timeout))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_blocked_client_is_abandoned_and_its_late_reply_discarded(workers, caplog):
    RELEASE.clear()
    grid = InProcessGrid(blocking, 3, run_config={}, workers=workers)
    try:
        assert len(_round(grid, timeout=30)) == 3
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="flwr"):
            replies = _round(grid, timeout=1.0)  # node 1 blocks in its second call
        took = time.monotonic() - t0
        assert 0.9 < took < 10, took
        assert sorted(r.metadata.src_node_id for r in replies) == [FIRST_NODE_ID, FIRST_NODE_ID + 2]
        assert "round 2: node 1002 overran the round-timeout (1 s); the round goes on without it" in caplog.text
        RELEASE.set()  # the late call returns now: its reply and its state change are dropped
        deadline = time.monotonic() + 10
        while "node 1002 replied after the round-timeout" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "round 2: node 1002 replied after the round-timeout; its reply is discarded" in caplog.text
        assert grid.contexts[FIRST_NODE_ID + 1].state["count"]["n"] == 1
        assert grid.contexts[FIRST_NODE_ID].state["count"]["n"] == 2
        third = _round(grid, timeout=30)  # a fresh thread serves the next round, every node replies
        assert [r.content["metrics"]["calls"] for r in third] == [3, 2, 3]
    finally:
        RELEASE.set()
        grid.close()


BLOCKER = '''
import threading
import torch

RELEASE = threading.Event()
CALLS = [0]


class Net(torch.nn.Module):
    """digits-logreg whose 5th forward pass with gradients (round 2's second client) blocks."""

    def __init__(self, num_classes):
        super().__init__()
        self.fc = torch.nn.Linear(64, num_classes)

    def forward(self, x):
        if torch.is_grad_enabled():
            CALLS[0] += 1
            if CALLS[0] == 5:
                RELEASE.wait(120)
        return self.fc(x.flatten(1))
'''


def test_fedsim_run_with_a_blocking_client_ends_and_uses_the_others(tmp_path, monkeypatch, caplog):
    (tmp_path / "blocker.py").write_text(BLOCKER)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    args = ["run", str(Path(__file__).resolve().parents[1] / "experiments/quick.toml"), "--set", "model='blocker:Net'",
            "--set", "strategy='fedsgd'", "--set", "batch-mode=0", "--set", "num-nodes=3", "--set", "num-server-rounds=4",
            "--set", "round-timeout=3.0", "--set", "eval-every=1", "--results-dir", str(out)]
    t0 = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="flwr"):
            rc = cli.main(args)
    finally:
        import blocker  # type: ignore[import-not-found]

        blocker.RELEASE.set()
    assert rc == 0
    assert time.monotonic() - t0 < 60
    with open(out / "rounds.csv") as f:
        clients = {int(r["round"]): int(r["clients"]) for r in csv.DictReader(f)}
    assert clients[1] == 3 and clients[2] == 2 and clients[3] == 3 and clients[4] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["rounds_below_min_replies"] == 0 and not summary["failed"]
    assert "round 2: node 1002 overran the round-timeout (3 s); the round goes on without it" in caplog.text
