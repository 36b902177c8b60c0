"""Devices on their own data, and fedsim in a user's own Flower app: nodes that each hold a
save_to_disk folder (``--node-config "dataset-path=..."``) train without partition ids on a
server that holds no training data; a node whose data does not fit is left out; a plain
Flower ClientApp takes part in FedAvg and is refused, in one line, by the sign votes;
``fedsim new`` and ``fedsim split`` write what they say."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim import cli
from fedsim.engine.inprocess import InProcessGrid
from fedsim.engine.runner import run_inprocess
from fedsim.errors import RunFailed
from fedsim.plan import release_plans
from fedsim.server_app import run_experiment
from fedsim.validation import load_config

OWN = {"dataset": "disk", "model": "digits-mlp", "num-classes": 10, "normalize": "0.3/0.35", "num-nodes": 3,
       "num-server-rounds": 6, "eval-every": 3, "eval-fraction": 1.0, "seed": 1}


def rows(folder: Path, name: str = "rounds.csv") -> list[dict[str, str]]:
    with open(folder / name) as f:
        return list(csv.DictReader(f))


def write_devices(root: Path, sizes: list[int], shape: tuple[int, int] = (8, 8)) -> list[Path]:
    """One save_to_disk folder per device, cut from scikit-learn's digits (different examples)."""
    from datasets import ClassLabel, Dataset, Features, Image
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.images * 15).astype(np.uint8), d.target
    feats = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
    folders, start = [], 0
    for k, n in enumerate(sizes):
        images = x[start:start + n] if shape == (8, 8) else np.zeros((n, *shape), np.uint8)
        Dataset.from_dict({"image": list(images), "label": y[start:start + n]}, features=feats).save_to_disk(str(root / f"dev{k}"))
        folders.append(root / f"dev{k}")
        start += n
    return folders


@pytest.fixture(autouse=True)
def _fresh_plans():
    yield
    release_plans()


def test_nodes_train_on_their_own_data_on_a_server_without_data(tmp_path):
    devices = write_devices(tmp_path, [200, 400, 700])
    out = run_inprocess({**OWN, "strategy": "llr-vote", "lr": 0.01, "llr-warmup": 2, "results-dir": str(tmp_path / "run")},
                        node_configs=[{"dataset-path": str(d)} for d in devices], workers=1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluation"] == "federated" and summary["data"]["test"] == "none (federated evaluation)"
    assert sorted(summary["batch_sizes_reported"]) == ["1001", "1002", "1003"]  # keyed by node id: no partitions
    assert sorted(summary["algorithm"]["mean_llr_weight"]) == ["1001", "1002", "1003"]
    clients = rows(out, "clients.csv")
    assert {r["partition_id"] for r in clients} == {""} and len(clients) == 3 * 3  # rounds 0, 3, 6
    held = {int(r["node_id"]): int(r["num_examples"]) for r in clients}
    assert held == {1001: 40, 1002: 80, 1003: 140}  # 20% of each device's own examples
    last = rows(out)[-1]
    assert last["test_accuracy"] == "" and float(last["fed_accuracy"]) > 0.3


def test_a_node_whose_data_does_not_fit_is_left_out_and_the_run_goes_on(tmp_path, caplog):
    devices = write_devices(tmp_path, [300, 300]) + write_devices(tmp_path / "bad", [100], shape=(10, 10))
    out = run_inprocess({**OWN, "strategy": "fedavg", "lr": 0.1, "results-dir": str(tmp_path / "run")},
                        node_configs=[{"dataset-path": str(d)} for d in devices], workers=1)
    assert all((int(r["clients"]), int(r["rejected"])) == (2, 1) for r in rows(out)[1:])
    wrong = [r.getMessage() for r in caplog.records if "rejected the reply of node 1003" in r.getMessage()]
    assert wrong and "holds 1x10x10 inputs" in wrong[0] and "input-shape 1x8x8" in wrong[0]


def test_a_central_test_set_on_a_server_without_training_data(tmp_path):
    devices = write_devices(tmp_path, [300, 300, 300, 200])
    out = run_inprocess({**OWN, "strategy": "fedavg", "lr": 0.1, "eval-fraction": 0.0, "server-test": str(devices[-1]),
                         "results-dir": str(tmp_path / "run")}, node_configs=[{"dataset-path": str(d)} for d in devices[:3]], workers=1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluation"] == "central" and summary["final_test_accuracy"] > 0.5


@pytest.mark.parametrize("override, message", [
    ({"normalize": "auto"}, "normalize='auto' would standardise each device's data with its own mean and std"),
    ({"num-classes": 0, "model": "mnist-2nn"}, "the server holds no data, so set num-classes and input-shape"),
    ({"model": "auto"}, "set model to yours"),
])
def test_a_run_on_the_nodes_own_data_says_what_the_server_needs(override, message, tmp_path, capsys):
    sets = [a for k, v in {**OWN, **override}.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    rc = cli.main(["run", str(Path(__file__).resolve().parents[1] / "experiments/quick.toml"), *sets, "--results-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


plain = ClientApp()


@plain.train()
def _plain_train(msg: Message, context: Context) -> Message:
    """A plain Flower ClientApp, as in Flower's quickstart: it trains the received model on
    its own data and replies with ``arrays`` and ``num-examples`` (and ``train_loss``)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pid = int(context.node_config["partition-id"])
    x = torch.tensor(d.images[pid::4] / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target[pid::4])
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": MetricRecord({"train_loss": float(loss), "num-examples": len(y)})})
    return Message(content, reply_to=msg)


def test_a_plain_flower_client_takes_part_in_fedavg(tmp_path):
    cfg = load_config({"strategy": "fedavg", "num-nodes": 4, "num-server-rounds": 5, "results-dir": str(tmp_path / "run")})
    grid = InProcessGrid(plain, 4, cfg.to_mapping())
    run_experiment(grid, cfg, engine="inprocess")
    table = rows(tmp_path / "run")
    assert all(int(r["clients"]) == 4 and int(r["rejected"]) == 0 for r in table[1:])
    assert float(table[-1]["test_accuracy"]) > float(table[0]["test_accuracy"]) and table[1]["train_loss"]


def test_a_plain_flower_client_is_refused_by_a_sign_vote_in_one_line(tmp_path, caplog):
    cfg = load_config({"strategy": "sign-mv", "lr": 0.01, "num-nodes": 2, "num-server-rounds": 2, "results-dir": str(tmp_path / "run")})
    with pytest.raises(RunFailed):
        run_experiment(InProcessGrid(plain, 2, cfg.to_mapping()), cfg, engine="inprocess")
    lines = [r.getMessage() for r in caplog.records if "rejected the reply" in r.getMessage()]
    assert lines and "as a plain Flower ClientApp does, but strategy='sign-mv' needs fedsim's ClientApp" in lines[0]


def test_fedsim_new_writes_an_app_that_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["new", "my-app"]) == 0
    assert sorted(p.name for p in (tmp_path / "my-app").iterdir()) == ["README.md", "pyproject.toml", "task.py"]
    assert cli.main(["run", "my-app", "--set", "num-server-rounds=3", "--results-dir", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["model"] == "task:Net"
    assert cli.main(["new", "my-app"]) == 2 and "is not an empty folder" in capsys.readouterr().err


def test_fedsim_split_writes_the_partitions_as_device_folders(tmp_path):
    from fedsim.data.load import DataSpec, load_data
    from fedsim.plan import server_plan

    exp = tmp_path / "x.toml"
    exp.write_text('dataset = "digits"\nnum-nodes = 3\npartitioning = "dirichlet:0.5"\nseed = 4\n')
    assert cli.main(["split", str(exp), str(tmp_path / "devices"), "--test-fraction", "0.25"]) == 0
    plan = server_plan(load_config({"dataset": "digits", "num-nodes": 3, "partitioning": "dirichlet:0.5", "seed": 4}))
    for k in range(3):
        mine = load_data(DataSpec("disk", str(tmp_path / "devices" / f"device-{k}"), normalize="none"))
        n = len(plan.partitions[k])
        assert len(mine.y_train) + len(mine.y_test) == n and len(mine.y_test) == max(1, round(0.25 * n))
        assert set(mine.y_train.tolist()) <= set(plan.splits.y_train[plan.partitions[k]].tolist())
    assert 'input-shape = "1,8,8"' in (tmp_path / "devices" / "README.md").read_text()


def test_a_users_own_serverapp_runs_fedsims_strategy_with_flowers_start(tmp_path):
    """fedsim.strategies.strategy_for: the public entry point of a user's ServerApp; Flower's
    own Strategy.start drives it, fedsim's ClientApp answers."""
    from flwr.serverapp import ServerApp

    from fedsim.client_app import app as fedsim_client
    from fedsim.strategies import strategy_for

    run_config = {"strategy": "llr-vote", "lr": 0.01, "llr-warmup": 1, "num-nodes": 4, "dataset": "digits", "model": "digits-mlp"}
    seen = {}
    app = ServerApp()

    @app.main()
    def main(grid, context):
        from fedsim.models import build_model

        net = build_model("digits-mlp", seed=0)
        strategy = strategy_for(net, context.run_config)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(net.state_dict()), num_rounds=3)
        seen["rounds"] = sorted(result.train_metrics_clientapp)
        seen["clients"] = [int(m["clients"]) for m in result.train_metrics_clientapp.values()]

    cfg = load_config(run_config).to_mapping()
    app(InProcessGrid(fedsim_client, 4, cfg), Context(1, 1, {}, RecordDict(), cfg))
    assert seen == {"rounds": [1, 2, 3], "clients": [4, 4, 4]}
