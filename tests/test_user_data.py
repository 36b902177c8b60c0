"""A researcher's own model, data and task: a project outside the repository with its own
``Net`` and data on disk trains through ``fedsim run`` (every algorithm) and Flower's
runtime; each on-disk format loads; regression with a loss and metrics of the user's;
federated evaluation; every mistake is one line, exit 2, no folder."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsim import cli
from fedsim.algorithms import REGISTRY
from fedsim.plan import release_plans, server_plan
from fedsim.validation import load_config

NET = """
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.layers(x)


class Wide(nn.Module):  # 12 outputs: one class too many for digits
    def __init__(self, num_classes=12):
        super().__init__()
        self.fc = nn.Linear(64, 12)

    def forward(self, x):
        return self.fc(x.flatten(1))


def mse(outputs, targets):
    return ((outputs.squeeze(1) - targets) ** 2).mean()


def mae(outputs, targets):
    return {"mae": float((outputs.squeeze(1) - targets).abs().mean())}


class Line(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, x):
        return self.fc(x)
"""

PYPROJECT = """
[project]
name = "my-project"
version = "1.0.0"
dependencies = ["fedsim"]

[tool.flwr.app]
publisher = "me"

[tool.flwr.app.components]
serverapp = "fedsim.server_app:app"
clientapp = "fedsim.client_app:app"

[tool.flwr.app.config]
dataset = "npz"
data-dir = "data/digits.npz"
model = "task:Net"
num-nodes = 4
num-server-rounds = 3
eval-every = 1
seed = 2
"""


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A Flower app of the user's, outside the repository, with its own data; the test
    runs from another folder."""
    root = tmp_path / "my-project"
    (root / "data").mkdir(parents=True)
    (root / "task.py").write_text(NET)
    (root / "pyproject.toml").write_text(PYPROJECT)
    x_train, y_train, x_test, y_test = digits_arrays()
    np.savez(root / "data" / "digits.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "task", raising=False)
    yield root
    sys.path[:] = [p for p in sys.path if p != str(root)]
    sys.modules.pop("task", None)
    release_plans()


def rows(folder: Path, name: str = "rounds.csv") -> list[dict[str, str]]:
    with open(folder / name) as f:
        return list(csv.DictReader(f))


LR = {"fedsgd": 0.5, "fedavg": 0.1, "sign-mv": 0.01, "llr-vote": 0.01, "ef-sign": 1.0, "sign-fd": 0.01}


@pytest.mark.parametrize("strategy", sorted(REGISTRY))
def test_a_users_project_trains_with_every_algorithm(strategy, project, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["run", str(project), "--set", f"strategy='{strategy}'", "--set", f"lr={LR[strategy]}", "--results-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "task:Net" and summary["num_parameters"] == 64 * 32 + 32 + 32 * 10 + 10
    assert summary["data"]["input_shape"] == [64] and summary["data"]["num_classes"] == 10
    assert [int(r["round"]) for r in rows(out)] == [0, 1, 2, 3]
    assert summary["final_test_accuracy"] > 0.1  # better than chance after 3 rounds


@pytest.mark.flower
@pytest.mark.parametrize("strategy", sorted(REGISTRY))
def test_a_users_project_on_flowers_runtime_ships_its_module_and_matches_in_process(strategy, project, tmp_path):
    """``fedsim run <app> --engine flower`` runs ``flwr run`` on the user's app (its task.py
    in the FAB), and gives the in-process engine's metrics."""
    from fedsim.engine.flower_runtime import stop_stragglers

    args = ["run", str(project), "--set", f"strategy='{strategy}'", "--set", f"lr={LR[strategy]}"]
    assert cli.main([*args, "--results-dir", str(tmp_path / "inprocess")]) == 0
    try:
        assert cli.main([*args, "--engine", "flower", "--results-dir", str(tmp_path / "flower")]) == 0
    finally:
        assert not stop_stragglers(tmp_path), "processes left running"
    drop = {"seconds"}
    a = [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "inprocess")]
    b = [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "flower")]
    assert a == b


def _disk(folder: Path, with_test: bool = True) -> Path:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

    x_train, y_train, x_test, y_test = digits_arrays()
    feats = Features({"image": Image(), "label": ClassLabel(num_classes=10), "writer": Value("int64")})

    def split(x: np.ndarray, y: np.ndarray) -> Dataset:
        pixels = list((x.reshape(-1, 8, 8) * 15).astype(np.uint8))
        return Dataset.from_dict({"image": pixels, "label": y, "writer": np.arange(len(y)) % 6}, features=feats)

    splits = {"train": split(x_train, y_train), **({"test": split(x_test, y_test)} if with_test else {})}
    DatasetDict(splits).save_to_disk(str(folder))
    return folder


def test_a_save_to_disk_folder_with_an_image_column_and_natural_partitions(tmp_path):
    folder = _disk(tmp_path / "disk")
    cfg = load_config({"dataset": "disk", "data-dir": str(folder), "model": "digits-mlp", "partitioning": "natural:writer", "num-nodes": 6})
    plan = server_plan(cfg)
    assert plan.input_shape == (1, 8, 8) and plan.num_classes == 10 and len(plan.partitions) == 6
    writers = np.arange(1400) % 6
    assert sorted(len(set(writers[p])) for p in plan.partitions) == [1] * 6  # one writer per client
    assert plan.splits.info["normalization"]["mean"] and plan.splits.info["test"] == "given"


def test_a_save_to_disk_folder_with_numeric_feature_columns_and_no_test_split(tmp_path):
    from datasets import Dataset

    x, y, _, _ = digits_arrays()
    Dataset.from_dict({**{f"f{i}": x[:, i] for i in range(64)}, "target": y}).save_to_disk(str(tmp_path / "tab"))
    cfg = load_config({"dataset": "disk", "data-dir": str(tmp_path / "tab"), "image-column": ",".join(f"f{i}" for i in range(64)),
                       "label-column": "target", "model": "digits-logreg", "num-nodes": 3})
    with pytest.raises(Exception, match="takes 1x8x8 inputs but dataset 'disk' has 64"):
        server_plan(cfg)
    from fedsim.data.load import DataSpec, load_data

    splits = load_data(DataSpec("disk", str(tmp_path / "tab"), ",".join(f"f{i}" for i in range(64)), "target"))
    assert splits.input_shape == (64,) and len(splits.y_test) == 280 and "held out 280" in splits.info["test"]
    assert abs(float(splits.x_train.mean())) < 1e-3  # standardised per feature


def test_an_imagefolder_tree_loads_with_its_class_folders(tmp_path):
    from PIL import Image

    x_train, y_train, x_test, y_test = digits_arrays()
    for split, xs, ys in (("train", x_train[:60], y_train[:60]), ("test", x_test[:20], y_test[:20])):
        for i, (img, label) in enumerate(zip(xs, ys, strict=True)):
            folder = tmp_path / "imgs" / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((img.reshape(8, 8) * 15).astype(np.uint8)).save(folder / f"{i}.png")
    plan = server_plan(load_config({"dataset": "imagefolder", "data-dir": str(tmp_path / "imgs"), "model": "digits-mlp", "num-nodes": 3}))
    assert plan.input_shape == (1, 8, 8) and len(plan.splits.y_train) == 60 and len(plan.splits.y_test) == 20


def test_a_loader_of_yours_returning_torch_datasets(tmp_path, monkeypatch):
    (tmp_path / "myloader.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def load_data(data_dir=''):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(200, 5, generator=g); y = (x[:, 0] > 0).long()\n"
        "    return TensorDataset(x[:150], y[:150]), TensorDataset(x[150:], y[150:])\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, num_classes):\n"
        "        super().__init__(); self.fc = torch.nn.Linear(5, num_classes)\n"
        "    def forward(self, x): return self.fc(x)\n"
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    rc = cli.main(["run", str(Path(__file__).resolve().parents[1] / "experiments/quick.toml"), "--set", "dataset='myloader:load_data'",
                   "--set", "model='myloader:Net'", "--set", "batch-mode=0", "--set", "num-server-rounds=20", "--set", "lr=0.05",
                   "--set", "strategy='fedavg'", "--results-dir", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["num_classes"] == 2 and summary["num_parameters"] == 12 and summary["final_test_accuracy"] > 0.8


def test_regression_with_a_loss_and_metrics_of_yours(tmp_path, monkeypatch):
    (tmp_path / "reg.py").write_text(NET + (
        "\nimport numpy as np\n"
        "def load_data():\n"
        "    rng = np.random.default_rng(0)\n"
        "    x = rng.normal(size=(300, 3)).astype(np.float32)\n"
        "    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=300)).astype(np.float32)\n"
        "    return x[:240], y[:240], x[240:], y[240:]\n"
    ))
    monkeypatch.chdir(tmp_path)
    base = {"dataset": "reg:load_data", "model": "reg:Line", "loss": "reg:mse", "metrics": "reg:mae", "strategy": "fedsgd",
            "lr": 0.3, "num-nodes": 4, "batch-size": 0, "num-server-rounds": 60, "eval-every": 20}
    out = tmp_path / "run"
    from fedsim.engine.runner import run_inprocess

    run_inprocess({**base, "results-dir": str(out)}, workers=1)
    table = rows(out)
    assert list(table[0])[-1] == "test_mae" and table[0]["test_accuracy"] == ""
    assert float(table[-1]["test_mae"]) < 0.3 < float(table[0]["test_mae"])
    assert json.loads((out / "summary.json").read_text())["data"]["task"] == "regression"
    with pytest.raises(Exception, match="splits by class label, but the targets are numbers"):
        server_plan(load_config({**base, "partitioning": "dirichlet:0.5"}))


def test_federated_evaluation_writes_per_client_figures_and_resumes_them(tmp_path):
    from strategy_kit import each_round

    from fedsim.engine.runner import run_inprocess

    cfg = {"dataset": "digits", "num-nodes": 6, "num-server-rounds": 6, "eval-every": 2, "strategy": "fedavg", "eval-fraction": 0.5,
           "local-test-fraction": 0.25, "seed": 4}
    whole = run_inprocess({**cfg, "results-dir": str(tmp_path / "whole")}, workers=1)
    clients = rows(whole, "clients.csv")
    assert [int(r["round"]) for r in clients] == [r for r in (0, 2, 4, 6) for _ in range(3)]  # 3 of 6 clients per evaluation
    table = {int(r["round"]): r for r in rows(whole)}
    for rnd in (0, 2, 4, 6):
        mine = [r for r in clients if int(r["round"]) == rnd]
        n = np.array([int(r["num_examples"]) for r in mine])
        acc = np.array([float(r["accuracy"]) for r in mine])
        assert float(table[rnd]["fed_accuracy"]) == pytest.approx(float((n * acc).sum() / n.sum()))
        assert float(table[rnd]["fed_accuracy_min"]) == pytest.approx(acc.min())
    assert table[1]["fed_accuracy"] == ""  # not an evaluation round

    class Crash(Exception):
        pass

    def crash(row):
        if row.round == 5:
            raise Crash

    with pytest.raises(Crash):
        run_inprocess({**cfg, "results-dir": str(tmp_path / "resumed")}, workers=1, callbacks=[each_round(crash)])
    run_inprocess({**cfg, "results-dir": str(tmp_path / "resumed")}, workers=1)
    assert rows(tmp_path / "resumed", "clients.csv") == clients
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows(tmp_path / "resumed")] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in rows(whole)]


BAD = [
    ({"model": "nosuch:Net"}, "model='nosuch:Net': importing module 'nosuch' failed: ModuleNotFoundError"),
    ({"model": "task:Missing"}, "has no attribute 'Missing'"),
    ({"model": "task:Wide"}, "gives outputs of shape (2, 12) for inputs of shape (2, 64), but the data has 10 classes: expected (2, 10)"),
    ({"model": "task:Line"}, "cannot take inputs of shape (2, 64)"),
    ({"model": "mnist-cnn"}, "model 'mnist-cnn' takes 1x28x28 inputs but dataset 'npz' has 64"),
    ({"model": "auto"}, "dataset='npz' has no default model"),
    ({"data-dir": "data/none.npz"}, "does not exist"),
    ({"dataset": "disk", "data-dir": "{app}/data"}, "is not a dataset saved with save_to_disk"),
    ({"dataset": "imagefolder", "data-dir": "{app}/data"}, "has no train/ folder"),
    ({"dataset": "disk", "data-dir": ""}, "with no data-dir is a run on the nodes' own data"),
    ({"dataset": "task:nothing"}, "has no attribute 'nothing'"),
    ({"dataset": "task:mse"}, "the loader raised TypeError"),
    ({"partitioning": "natural:writer"}, "the data has no column 'writer'"),
    ({"loss": "not a path"}, "loss='not a path': expected 'package.module:fn'"),
]


@pytest.mark.parametrize("override, message", BAD, ids=[m[:40] for _, m in BAD])
def test_a_mistake_in_the_users_code_or_data_is_one_line_exit_2_and_no_folder(override, message, project, tmp_path, capsys):
    out = tmp_path / "run"
    sets = [a for k, v in override.items() for a in ("--set", f"{k}={json.dumps(v.replace('{app}', str(project)) if isinstance(v, str) else v)}")]
    rc = cli.main(["run", str(project), *sets, "--results-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_labels_outside_0_to_k_minus_1_are_one_line(project, tmp_path, capsys):
    x_train, y_train, x_test, y_test = digits_arrays()
    np.savez(project / "data" / "digits.npz", x_train=x_train, y_train=y_train - 1, x_test=x_test, y_test=y_test)
    rc = cli.main(["run", str(project), "--results-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "labels run -1..9, but class ids must be 0..9" in err, err
    assert not (tmp_path / "run").exists()


def test_a_malformed_evaluate_reply_is_rejected_and_changes_no_figure():
    """Shuffled good and bad evaluate replies give the figures of the good ones alone."""
    import random

    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from fedsim.engine.flower_internals import assign_message_id, set_server_identity
    from fedsim.strategies import FederatedEvaluator

    set_server_identity(run_id=5)
    ev = FederatedEvaluator(0.5, ["accuracy"], seed=0, num_partitions=6, max_examples=100)
    sent = ev.messages(1, ArrayRecord(), ConfigRecord(), list(range(100, 106)))
    for i, m in enumerate(sent):
        assign_message_id(m, f"e{i}")
        m.metadata.__dict__["_src_node_id"] = 1

    def reply(to: Message, node: int, **metrics: object) -> Message:
        out = Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=to)  # type: ignore[arg-type]
        out.metadata.__dict__["_src_node_id"] = node
        return out

    good = [reply(sent[0], 100, **{"num-examples": 10, "loss": 0.5, "partition-id": 0, "accuracy": 0.9}),
            reply(sent[1], 101, **{"num-examples": 30, "loss": 1.5, "partition-id": 1, "accuracy": 0.5})]
    bad = [reply(sent[2], 102, **{"num-examples": 0, "loss": 0.1, "partition-id": 2, "accuracy": 1.0}),
           reply(sent[2], 102, **{"num-examples": 5, "loss": float("nan"), "partition-id": 2, "accuracy": 1.0}),
           reply(sent[2], 102, **{"num-examples": 5, "loss": 0.1, "partition-id": 2, "accuracy": 1.5}),
           reply(sent[2], 102, **{"num-examples": 5, "loss": 0.1, "partition-id": 9, "accuracy": 1.0}),
           reply(sent[2], 102, **{"num-examples": 5, "loss": 0.1, "partition-id": 2}),
           reply(sent[2], 102, **{"num-examples": 5, "loss": 0.1, "partition-id": 2, "accuracy": 1.0, "extra": 1.0}),
           reply(sent[2], 103, **{"num-examples": 5, "loss": 0.1, "partition-id": 0, "accuracy": 1.0})]  # 0 reported already
    mixed = good + bad
    random.Random(3).shuffle(mixed)
    mixed.sort(key=lambda m: m.metadata.src_node_id != 100)  # the honest owner of partition 0 first: the duplicate is the bad one
    alone = ev.collect(1, good, lambda node, pid: None)
    fuzzed = ev.collect(1, mixed, lambda node, pid: None)
    assert fuzzed.figures == alone.figures and len(fuzzed.clients) == 2
    assert alone.figures["accuracy"] == pytest.approx((10 * 0.9 + 30 * 0.5) / 40) and alone.figures["accuracy_min"] == 0.5
