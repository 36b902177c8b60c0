"""A run's lifecycle as callbacks: a user's own from Python and from the run config, and
experiment tracking read back with TensorBoard's and MLflow's own readers."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from fedsim import cli
from fedsim.callbacks import Callback, RoundEnd, RunEnd, RunStart
from fedsim.engine.runner import run_inprocess

SMALL = {"dataset": "digits", "num-nodes": 4, "num-server-rounds": 6, "eval-every": 2, "strategy": "fedavg", "seed": 1}


def rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "rounds.csv") as f:
        return list(csv.DictReader(f))


class Recorder(Callback):
    """Records what it sees; stops the run after round ``stop_at`` (None: never)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.starts: list[RunStart] = []
        self.rounds: list[tuple[int, bool]] = []
        self.ends: list[RunEnd] = []

    def on_run_start(self, start: RunStart) -> None:
        self.starts.append(start)

    def on_round_end(self, end: RoundEnd) -> bool:
        self.rounds.append((end.row.round, end.evaluated))
        return end.row.round == self.stop_at

    def on_run_end(self, end: RunEnd) -> None:
        self.ends.append(end)


def test_a_callback_from_python_sees_every_round_once_and_the_end(tmp_path):
    rec = Recorder()
    out = run_inprocess({**SMALL, "results-dir": str(tmp_path / "run")}, callbacks=[rec])
    assert len(rec.starts) == 1 and rec.starts[0].first_round == 1 and rec.starts[0].folder == out
    assert rec.starts[0].num_params == 4810  # digits-mlp
    assert rec.rounds == [(0, True), (1, False), (2, True), (3, False), (4, True), (5, False), (6, True)]
    assert [e.status for e in rec.ends] == ["finished"]
    assert rec.ends[0].summary["final_test_accuracy"] == float(rows(out)[-1]["test_accuracy"])
    assert [r.round for r in rec.ends[0].rows] == list(range(7))


def test_a_callback_can_stop_the_run(tmp_path):
    rec = Recorder(stop_at=3)
    out = run_inprocess({**SMALL, "results-dir": str(tmp_path / "run")}, callbacks=[rec])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["stopped_early_at_round"] == 3
    assert [r for r, _ in rec.rounds] == [0, 1, 2, 3] and [int(r["round"]) for r in rows(out)] == [0, 1, 2, 3]


def test_a_raising_run_still_ends_its_callbacks(tmp_path):
    rec = Recorder()

    class Boom(Callback):
        def on_round_end(self, end: RoundEnd) -> None:
            if end.row.round == 2:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_inprocess({**SMALL, "results-dir": str(tmp_path / "run")}, callbacks=[rec, Boom()])
    assert [e.status for e in rec.ends] == ["error"] and rec.ends[0].summary is None


def _user_module(folder: Path) -> None:
    (folder / "my_callbacks.py").write_text(
        "import json\n"
        "from fedsim.callbacks import Callback\n"
        "class Log(Callback):\n"
        "    def on_round_end(self, end):\n"
        "        with open('seen.jsonl', 'a') as f:\n"
        "            f.write(json.dumps({'round': end.row.round, 'acc': end.row.test_accuracy}) + '\\n')\n"
        "        return end.row.round == 4\n"
    )


def test_a_callback_named_in_the_run_config_is_imported_from_the_current_directory(tmp_path, monkeypatch):
    _user_module(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_callbacks", raising=False)
    out = run_inprocess({**SMALL, "callbacks": "my_callbacks:Log", "results-dir": str(tmp_path / "run")})
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert [s["round"] for s in seen] == [0, 1, 2, 3, 4]  # it stopped the run at 4
    assert json.loads((out / "summary.json").read_text())["rounds"] == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--callback", "no_such_module:Cb"], "callbacks='no_such_module:Cb': importing module 'no_such_module' failed: ModuleNotFoundError"),
        (["--callback", "json:nope"], "module 'json'"),
        (["--callback", "not a path"], "expected comma-separated 'package.module:attr' names"),
        (["--callback", "json:JSONDecodeError"], "building 'json:JSONDecodeError' failed: TypeError"),
        (["--callback", "os:getcwd"], "gave a str without ['on_run_start', 'on_round_end', 'on_run_end']"),
    ],
)
def test_a_bad_callback_is_one_line_exit_2_and_no_folder(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["run", "experiments/quick.toml", "--set", "num-server-rounds=1", "--results-dir", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "config.json").exists() and not (out / "rounds.csv").exists()


def test_tensorboard_event_files_hold_every_rounds_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    rc = cli.main(["run", "experiments/quick.toml", "--set", "num-server-rounds=6", "--set", "eval-every=3",
                   "--results-dir", str(out), "--tensorboard", str(tmp_path / "tb")])
    assert rc == 0
    acc = EventAccumulator(str(tmp_path / "tb" / "run"))
    acc.Reload()
    csv_rows = rows(out)
    accuracy = [(e.step, e.value) for e in acc.Scalars("test/accuracy")]
    assert accuracy == [(int(r["round"]), pytest.approx(float(r["test_accuracy"]), rel=1e-6)) for r in csv_rows if r["test_accuracy"]]
    assert [e.step for e in acc.Scalars("comm/bytes_up")] == list(range(7))
    assert [e.value for e in acc.Scalars("comm/bytes_up")] == [float(r["bytes_up"]) for r in csv_rows]
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))  # round 0 did not train
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"strategy": "llr-vote"' in config


def test_tensorboard_holds_federated_evaluation_and_per_client_accuracies(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    rc = cli.main(["run", "experiments/quick.toml", "--set", "num-server-rounds=4", "--set", "eval-every=2", "--set", "eval-fraction=0.5",
                   "--results-dir", str(out), "--tensorboard", str(tmp_path / "tb")])
    assert rc == 0
    acc = EventAccumulator(str(tmp_path / "tb" / "run"), size_guidance={"histograms": 0})
    acc.Reload()
    csv_rows = [r for r in rows(out) if r["fed_accuracy"]]
    assert [(e.step, e.value) for e in acc.Scalars("fed/accuracy")] == [(int(r["round"]), pytest.approx(float(r["fed_accuracy"]))) for r in csv_rows]
    assert [e.step for e in acc.Scalars("fed/accuracy_p10")] == [0, 2, 4]
    hist = acc.Histograms("fed/client_accuracy")
    assert [h.step for h in hist] == [0, 2, 4] and all(h.histogram_value.num == 5 for h in hist)  # 5 of 10 clients


def test_mlflow_run_holds_params_metrics_and_the_results(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    rc = cli.main(["run", str(root / "experiments/quick.toml"), "--set", "num-server-rounds=4", "--set", "eval-every=2",
                   "--results-dir", str(out), "--mlflow"])  # MLflow's default store, here: ./mlflow.db and ./mlruns
    assert rc == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedsim").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["strategy"] == "llr-vote" and run.data.params["num-server-rounds"] == "4"
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "test_accuracy")]
    assert history == [(int(r["round"]), pytest.approx(float(r["test_accuracy"]))) for r in rows(out) if r["test_accuracy"]]
    assert len(client.get_metric_history(run.info.run_id, "bytes_up")) == 5
    names = {a.path for a in client.list_artifacts(run.info.run_id)} | {a.path for a in client.list_artifacts(run.info.run_id, "results")}
    assert {"summary.json", "results/rounds.csv", "results/config.json"} <= names
    assert (tmp_path / "mlruns").is_dir()  # artifacts beside the store, as MLflow's default puts them


def test_a_missing_tracking_package_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now fails
    rc = cli.main(["run", "experiments/quick.toml", "--results-dir", str(tmp_path / "run"), "--mlflow", "sqlite:///x.db"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'fedsim[mlflow]'" in err and len(err.strip().splitlines()) == 1, err
