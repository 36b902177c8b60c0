"""Real deployment on the devices' own data, on loopback, secured as docs/deployment.md says:
a TLS SuperLink with SuperNode authentication, three registered SuperNodes each with its own
save_to_disk folder and no partition id (two of digits, of 200 and 500 images; one of
10x10 images, which does not fit the run), and ``flwr run`` of a user's project outside
the repository (its own ``Net`` in task.py): the LLR vote for 2 rounds with federated
evaluation, on a server that holds no data. Every process is stopped by PID."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from deploy import make_node_key, make_tls_files
from test_own_data import write_devices

from fedsim.engine.flower_runtime import LocalSuperLink

pytestmark = pytest.mark.flower

PROJECT = '''
[project]
name = "digits-devices"
version = "1.0.0"
dependencies = ["fedsim"]

[tool.flwr.app]
publisher = "me"

[tool.flwr.app.components]
serverapp = "fedsim.server_app:app"
clientapp = "fedsim.client_app:app"

[tool.flwr.app.config]
strategy = "llr-vote"
dataset = "disk"
model = "task:Net"
num-classes = 10
input-shape = "1,8,8"
normalize = "0.3/0.35"
lr = 0.01
llr-warmup = 1
eval-fraction = 1.0
eval-every = 1
num-nodes = 3
num-server-rounds = 2
node-wait = 60.0
round-timeout = 120.0
seed = 0
results-dir = ""
'''

TASK = '''
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.layers(x)
'''


def rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_devices_on_their_own_data_train_the_llr_vote_over_tls(tmp_path):
    project = tmp_path / "digits-devices"
    project.mkdir()
    (project / "pyproject.toml").write_text(PROJECT)
    (project / "task.py").write_text(TASK)
    devices = write_devices(tmp_path / "data", [200, 500]) + write_devices(tmp_path / "wrong", [100], shape=(10, 10))
    home, results = tmp_path / "flwr-home", tmp_path / "results"
    home.mkdir()
    tls = make_tls_files(tmp_path / "certs")
    keys = {name: make_node_key(tmp_path / "keys", name) for name in ("a", "b", "c")}
    with LocalSuperLink(home, simulation=False, tls=tls, supernode_auth=True) as link:
        ids = {name: link.register(keys[name].public) for name in "abc"}
        for name, folder in zip("abc", devices, strict=True):
            link.start_supernode(name, f"dataset-path='{folder}'", private_key=keys[name].private)
        out = subprocess.run(
            ["flwr", "run", str(project), link.connection, "--stream", "--run-config", f"results-dir='{results}'"],
            env=link.env, cwd=home, capture_output=True, text=True, timeout=900,
        )
    left = link.stragglers + link.leftovers()
    log = out.stdout + out.stderr
    (home / "flwr-run.log").write_text(log)
    assert out.returncode == 0 and not left, (left, log[-3000:])
    table = rows(results / "rounds.csv")
    assert [int(r["round"]) for r in table] == [0, 1, 2]
    assert all((int(r["clients"]), int(r["rejected"])) == (2, 1) for r in table[1:]), table
    assert f"rejected the reply of node {ids['c']}" in log and "holds 1x10x10 inputs" in log, log[-3000:]
    clients = rows(results / "clients.csv")
    assert sorted({int(r["node_id"]) for r in clients}) == sorted([ids["a"], ids["b"]])
    assert {int(r["node_id"]): int(r["num_examples"]) for r in clients} == {ids["a"]: 40, ids["b"]: 100}  # 20% of each
    summary = json.loads((results / "summary.json").read_text())
    assert summary["evaluation"] == "federated" and summary["data"]["source"] == "the nodes' own data"
    assert sorted(summary["algorithm"]["mean_llr_weight"]) == sorted(str(i) for i in (ids["a"], ids["b"]))
    assert float(table[-1]["fed_accuracy"]) > float(table[0]["fed_accuracy"])
