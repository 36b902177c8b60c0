"""Real deployment on loopback, insecure (local testing only; the secure sequence of
docs/deployment.md is tests/test_deployment_secure.py): a deployment SuperLink, SuperNodes
started with ``flower-supernode --node-config``, and ``flwr run`` against them, as the
README's deployment section describes. Every message starts a fresh ClientApp process.

Slow (~1 min): marked ``flower``. Every process the test starts is stopped by PID
(``LocalSuperLink``) and the test checks that none is left.
"""

import csv
import json

import pytest

from fedsim.engine.flower_runtime import PROJECT_ROOT, LocalSuperLink

pytestmark = pytest.mark.flower

NODE_CONFIGS = [
    "partition-id=0 num-partitions=2 batch-size=4",
    "partition-id=1 num-partitions=2 batch-size=64",
    "",  # a misconfigured node: its replies are errors, rejected by the server every round
]


def test_superlink_and_supernodes_train_with_node_configs(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    results = tmp_path / "results"
    with LocalSuperLink(home, simulation=False) as link:
        for i, node_config in enumerate(NODE_CONFIGS):
            link.start_supernode(f"supernode-{i}", node_config)
        run_config = f"strategy='fedavg' lr=0.1 num-server-rounds=2 num-nodes=3 seed=0 results-dir='{results}'"
        out = link.flwr("run", str(PROJECT_ROOT), link.connection, "--stream", "--run-config", run_config, timeout=420)
    left = link.stragglers + link.leftovers()
    text = out.stdout + out.stderr
    (home / "flwr-run.log").write_text(text)
    assert out.returncode == 0, text[-3000:]
    assert not left, f"processes left running: {left}"

    with open(results / "rounds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert (int(r["clients"]), int(r["rejected"])) == (2, 1), r
    accuracy = [float(r["test_accuracy"]) for r in rows]
    assert accuracy[-1] > 0.8 > accuracy[0], accuracy
    summary = json.loads((results / "summary.json").read_text())
    assert summary["batch_sizes_reported"] == {"0": 4, "1": 64}  # from the nodes' --node-config
    assert summary["num_nodes"] == 3
    assert "rejected the reply of node" in text and "partition-id" in text, text[-3000:]
