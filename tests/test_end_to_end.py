"""The real ServerApp and ClientApp on the in-process engine: faults, reproducibility, CLI."""

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from strategy_kit import each_round

from fedsim import protocol
from fedsim.client_app import app as fedsim_client
from fedsim.engine.inprocess import InProcessGrid
from fedsim.server_app import run_experiment
from fedsim.validation import load_config

BAD_PARTITION = 2
faulty = ClientApp()


@faulty.train()
def _faulty_train(msg: Message, context: Context) -> Message:
    """fedsim's client, except that partition 2 sends a truncated sign vector."""
    reply = fedsim_client(msg, context)
    if context.node_config["partition-id"] == BAD_PARTITION:
        packed = reply.content[protocol.SIGNS][protocol.PACKED].numpy()
        reply.content[protocol.SIGNS] = ArrayRecord({protocol.PACKED: Array(packed[:3].copy())})
    return reply


def _rows(path):
    with open(path / "rounds.csv") as f:
        return list(csv.DictReader(f))


def test_truncated_reply_is_rejected_logged_and_round_goes_on(tmp_path, caplog):
    cfg = load_config(
        {"strategy": "sign-mv", "lr": 0.01, "num-server-rounds": 3, "num-nodes": 5, "results-dir": str(tmp_path)}
    ).to_mapping()
    grid = InProcessGrid(faulty, 5, cfg)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run_experiment(grid, load_config(cfg), engine="inprocess")
    rows = _rows(tmp_path)
    assert [int(r["clients"]) for r in rows[1:]] == [4, 4, 4]
    assert [int(r["rejected"]) for r in rows[1:]] == [1, 1, 1]
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == 3
    assert f"node {1001 + BAD_PARTITION}" in rejected[0] and "packed signs have shape (3,), expected (602,)" in rejected[0]
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"])


broken = ClientApp()


@broken.train()
def _broken_train(msg: Message, context: Context) -> Message:
    """fedsim's client, except that partitions 0 and 1 reply with NaN signs' worth of garbage
    (a float payload where packed uint8 signs belong)."""
    reply = fedsim_client(msg, context)
    if context.node_config["partition-id"] in (0, 1):
        reply.content[protocol.SIGNS] = ArrayRecord({protocol.PACKED: Array(np.full(602, np.nan, dtype=np.float32))})
    return reply


def _run_broken(tmp_path, min_replies: int, name: str):
    cfg = load_config(
        {"strategy": "sign-mv", "lr": 0.01, "num-server-rounds": 3, "num-nodes": 4, "min-replies": min_replies,
         "results-dir": str(tmp_path / name)}
    ).to_mapping()
    grid = InProcessGrid(broken, 4, cfg)
    run_experiment(grid, load_config(cfg), engine="inprocess")
    return tmp_path / name


def test_min_replies_rounds_below_it_keep_the_model_and_a_run_with_none_fails(tmp_path, caplog):
    from fedsim.errors import RunFailed

    ok = _run_broken(tmp_path, 2, "ok")  # 2 valid replies a round: enough
    assert [int(r["clients"]) for r in _rows(ok)[1:]] == [2, 2, 2]
    summary = json.loads((ok / "summary.json").read_text())
    assert summary["failed"] is None and summary["rounds_below_min_replies"] == 0
    with caplog.at_level(logging.WARNING, logger="flwr"):
        try:
            _run_broken(tmp_path, 3, "short")
            raise AssertionError("expected RunFailed")
        except RunFailed as err:
            assert "no round had min-replies=3 valid replies" in str(err) and str(tmp_path / "short") in str(err)
    rows = _rows(tmp_path / "short")
    assert [int(r["clients"]) for r in rows[1:]] == [2, 2, 2] and [int(r["rejected"]) for r in rows[1:]] == [2, 2, 2]
    assert len({r["test_accuracy"] for r in rows}) == 1  # the model never changed
    summary = json.loads((tmp_path / "short" / "summary.json").read_text())
    assert summary["rounds_below_min_replies"] == 3 and "min-replies=3" in summary["failed"]
    assert sum("fewer than min-replies=3" in r.getMessage() for r in caplog.records) == 3


def test_cli_exits_1_when_no_round_met_min_replies(tmp_path, monkeypatch, capsys):
    """fedsim run on nodes whose replies are all rejected: one line, exit code 1, results kept."""
    from fedsim import cli
    from fedsim.engine import runner

    def run_with_broken_clients(run_config, **kwargs):
        monkeypatch.setattr(runner, "client_app", broken)
        return real(run_config, **kwargs)

    real = runner.run_inprocess
    monkeypatch.setattr(runner, "run_inprocess", run_with_broken_clients)
    out = tmp_path / "run"
    rc = cli.main(["run", "experiments/quick.toml", "--set", "num-nodes=2", "--set", "batch-mode=0",
                   "--set", "strategy='sign-mv'", "--set", "num-server-rounds=2", "--results-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 1, err
    lines = [line for line in err.splitlines() if line.startswith("fedsim:")]
    assert len(lines) == 1 and "no round had min-replies=1 valid replies" in lines[0], err
    assert "Traceback" not in err and (out / "summary.json").exists()


def test_a_sweep_reports_a_failed_run_goes_on_and_exits_1(tmp_path, monkeypatch, capsys):
    """Two points: the one whose clients are all broken fails, the other still runs."""
    from fedsim import cli
    from fedsim.runtime import Runtime

    real_client = Runtime.client

    def client_failing_for_lr_0_5(self, plan, *args):
        if plan.cfg.lr == 0.5:
            raise RuntimeError("this client is broken")
        return real_client(self, plan, *args)

    monkeypatch.setattr(Runtime, "client", client_failing_for_lr_0_5)
    sweep = tmp_path / "s.toml"
    sweep.write_text(
        f'base = "{Path("experiments/quick.toml").resolve()}"\nresults-dir = "{tmp_path / "out"}"\n'
        '[set]\nnum-server-rounds = 2\nstrategy = "fedavg"\n[grid]\nlr = [0.5, 0.1]\n'
    )
    rc = cli.main(["sweep", str(sweep)])
    captured = capsys.readouterr()
    assert rc == 1, captured.err
    assert "fedsim: run failed: no round had min-replies=1 valid replies" in captured.err
    assert "1 run(s) of the sweep learned nothing: lr=0.5" in captured.err
    assert json.loads((tmp_path / "out" / "lr=0.1" / "summary.json").read_text())["failed"] is None
    assert "min-replies" in json.loads((tmp_path / "out" / "lr=0.5" / "summary.json").read_text())["failed"]


def test_same_seed_same_metrics_and_cli_writes_results(tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "fedsim.cli", "run", "experiments/quick.toml", "--set", "num-server-rounds=12",
             "--results-dir", str(out)],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "final test accuracy" in proc.stdout
        outs.append(out)
    a, b = (_rows(o) for o in outs)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a) == strip(b) and len(a) == 13
    summary = json.loads((outs[0] / "summary.json").read_text())
    assert summary["engine"] == "inprocess" and summary["seed"] == 0 and len(summary["batch_sizes"]) == 10
    assert (outs[0] / "model.pt").exists() and (outs[0] / "config.json").exists()
    counts = np.loadtxt(outs[0] / "label_counts.csv", delimiter=",")
    assert counts.shape == (10, 10) and counts.sum() == 1437


def test_cli_reports_bad_config_clearly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "run", str(Path("experiments/quick.toml").resolve()),
         "--set", "strategy='fedprox'"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "strategy='fedprox': choose one of" in proc.stderr
    assert not (tmp_path / "runs").exists()  # no empty results folder left behind


def test_cli_results_dir_from_set_and_new_folders_never_shared(tmp_path, monkeypatch):
    out = tmp_path / "seed=1,batch-mode=3"  # a sweep-style name: the comma must not split it
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "run", "experiments/quick.toml", "--set", "num-server-rounds=1",
         "--set", f"results-dir={out}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "summary.json").exists()

    from fedsim import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.time, "strftime", lambda fmt: "20260101-000000")  # two starts in one second
    first, second = (cli.default_results_dir(Path("experiments/fv_mnist.toml")) for _ in range(2))
    assert first == Path("runs/fv_mnist-20260101-000000") and second == Path("runs/fv_mnist-20260101-000000-2")
    assert first.is_dir() and second.is_dir()


def _write_small_cifar(root, n_train=40, n_test=20):
    """data_batch_1..5 + test_batch in the original pickle format, random images."""
    import pickle

    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, n in [*[(f"data_batch_{k}", n_train) for k in range(1, 6)], ("test_batch", n_test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root


def test_cifar_models_run_end_to_end_with_crops_and_batchnorm_buffers(tmp_path):
    import torch

    from fedsim.engine.runner import run_inprocess

    data = _write_small_cifar(tmp_path / "cifar")
    base = {"dataset": "cifar10", "data-dir": str(data), "num-nodes": 3, "num-server-rounds": 2, "batch-size": 8}
    run_inprocess({**base, "model": "cifar-cnn", "strategy": "fedavg", "results-dir": str(tmp_path / "cnn")})
    out = run_inprocess({**base, "model": "resnet20", "strategy": "llr-vote", "lr": 0.01, "llr-warmup": 1,
                         "results-dir": str(tmp_path / "resnet")})
    rows = _rows(out)
    assert [int(r["clients"]) for r in rows[1:]] == [3, 3] and all(int(r["rejected"]) == 0 for r in rows[1:])
    state = torch.load(out / "model.pt")
    # BatchNorm running statistics were averaged from the clients, not left at their init
    assert not torch.allclose(state["bn1.running_mean"], torch.zeros_like(state["bn1.running_mean"]))
    from fedsim.core.signs import packed_size
    from fedsim.models import build_model

    model = build_model("resnet20")
    params = {n for n, _ in model.named_parameters()}
    buffers = [v for k, v in model.state_dict().items() if k not in params and v.is_floating_point()]
    bound = packed_size(269_722) + sum(4 * b.numel() + 200 for b in buffers) + 1024  # +200: npy header and key
    assert int(rows[1]["bytes_up"]) / 3 <= bound


def test_worker_threads_give_the_same_results(tmp_path):
    from fedsim.engine.runner import run_inprocess

    for strategy, lr in [("llr-vote", 0.01), ("fedavg", 0.1)]:
        cfg = {"strategy": strategy, "lr": lr, "num-nodes": 6, "num-server-rounds": 4, "batch-mode": 2, "llr-warmup": 1}
        one = run_inprocess({**cfg, "results-dir": str(tmp_path / f"{strategy}-1")}, workers=1)
        three = run_inprocess({**cfg, "results-dir": str(tmp_path / f"{strategy}-3")}, workers=3)
        strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
        assert strip(_rows(one)) == strip(_rows(three))


def test_stop_at_accuracy_ends_the_run_at_the_first_evaluation_reaching_it(tmp_path):
    from fedsim.engine.runner import run_inprocess

    out = run_inprocess({"strategy": "fedavg", "num-server-rounds": 50, "stop-at-accuracy": 0.8, "results-dir": str(tmp_path)})
    acc = [float(r["test_accuracy"]) for r in _rows(out)]
    assert acc[-1] >= 0.8 and all(a < 0.8 for a in acc[1:-1]) and len(acc) < 51
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early_at_round"] == len(acc) - 1 == summary["rounds"]
    assert summary["final_test_accuracy"] == acc[-1] and (out / "model.pt").exists()


def test_summary_records_the_commit_read_before_the_run_not_at_its_end(tmp_path, monkeypatch):
    """A sweep process runs the code it loaded; the working tree may move on meanwhile."""
    from fedsim import results
    from fedsim.engine.runner import run_inprocess

    tree = {"commit": "loaded-commit"}
    monkeypatch.setattr(results, "_git_commit", lambda: tree["commit"])

    def commit_meanwhile(row):
        tree["commit"] = "later-commit"

    results.environment_info.cache_clear()
    try:
        out = run_inprocess({"num-server-rounds": 2, "results-dir": str(tmp_path / "run")}, callbacks=[each_round(commit_meanwhile)])
        assert json.loads((out / "summary.json").read_text())["git_commit"] == "loaded-commit"
    finally:
        results.environment_info.cache_clear()
