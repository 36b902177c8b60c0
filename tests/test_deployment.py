"""Real deployment on loopback: a deployment SuperLink, SuperNodes started with
``flower-supernode --node-config``, and ``flwr run`` against them, as the README's
deployment section describes. Every message starts a fresh ClientApp process there.

Slow (~1 min): marked ``flower``. Every process the test starts is stopped by PID and
the test checks that none is left.
"""

import csv
import json
import subprocess

import pytest

from fedsim.engine.flower_runtime import PROJECT_ROOT, LocalSuperLink, free_port, kill_pids, stop_stragglers

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
    supernodes: list[subprocess.Popen] = []
    try:
        with LocalSuperLink(home, simulation=False) as link:
            for i, node_config in enumerate(NODE_CONFIGS):
                cmd = [
                    "flower-supernode", "--insecure", "--superlink", link.address,
                    "--port", str(free_port()),
                ]
                if node_config:
                    cmd += ["--node-config", node_config]
                log = open(home / f"supernode-{i}.out", "wb")
                supernodes.append(subprocess.Popen(cmd, env=link.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            run_config = (
                f"strategy='fedavg' lr=0.1 num-server-rounds=2 num-nodes=3 seed=0 results-dir='{results}'"
            )
            out = subprocess.run(
                ["flwr", "run", str(PROJECT_ROOT), link.connection, "--stream", "--run-config", run_config],
                env=link.env, cwd=home, capture_output=True, text=True, timeout=420,
            )
    finally:
        kill_pids([p.pid for p in supernodes])
        for p in supernodes:
            p.wait(timeout=30)
        left = stop_stragglers(home)
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
