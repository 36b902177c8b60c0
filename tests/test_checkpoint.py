"""Checkpoints: a run killed part-way and started again continues after its last
evaluated round and ends exactly where an uninterrupted run ends."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from strategy_kit import each_round

from fedsim.checkpoint import CHECKPOINT, load_checkpoint
from fedsim.engine.runner import run_inprocess
from fedsim.run_folder import RunFolderConflict, claim_run_folder, clear_run_folder
from fedsim.validation import load_config

BASE = {"num-nodes": 6, "num-server-rounds": 24, "eval-every": 5, "seed": 3, "batch-mode": 2}


class Crash(Exception):
    pass


def metric_rows(folder):
    """rounds.csv without the wall-clock column."""
    with open(folder / "rounds.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def crash_at(round_):
    def hook(row):
        if row.round == round_:
            raise Crash(round_)

    return hook


def as_written_before_namespacing(path) -> None:
    """Rewrite a checkpoint as fedsim wrote it before issue #19: the strategy's and the
    algorithm's state in one flat ``strategy`` dict, and a config without the keys added since."""
    state = torch.load(path, weights_only=True)
    state["strategy"] = {**state["strategy"], **state.pop("algorithm")}
    for key in ("tensorboard", "mlflow", "callbacks"):
        del state["config"][key]
    torch.save(state, path)


@pytest.mark.parametrize(
    "strategy, extra, legacy",
    [
        ("llr-vote", {"lr": 0.01, "llr-warmup": 8, "fraction-train": 0.5}, False),  # counts and node sampling carry over
        ("llr-vote", {"lr": 0.01, "llr-warmup": 8, "fraction-train": 0.5}, True),  # ... from a checkpoint of older fedsim
        ("sign-fd", {"lr": 0.01, "fd-warmup": 8, "fraction-train": 0.5}, True),
        ("fedavg", {"lr": 0.1}, False),
        ("fedsgd", {"lr": 0.5, "fraction-train": 0.7}, False),
    ],
)
def test_a_crashed_run_resumes_to_the_same_result(strategy, extra, legacy, tmp_path):
    cfg = {**BASE, **extra, "strategy": strategy}
    whole = run_inprocess({**cfg, "results-dir": str(tmp_path / "whole")})

    resumed = tmp_path / "resumed"
    with pytest.raises(Crash):
        run_inprocess({**cfg, "results-dir": str(resumed)}, callbacks=[each_round(crash_at(17))])
    assert (resumed / CHECKPOINT).exists() and not (resumed / "summary.json").exists()
    assert [r["round"] for r in metric_rows(resumed)][-1] == "17"  # rows 16-17 were written before the crash
    if legacy:
        as_written_before_namespacing(resumed / CHECKPOINT)
    run_inprocess({**cfg, "results-dir": str(resumed)})

    assert metric_rows(resumed) == metric_rows(whole)
    a, b = torch.load(whole / "model.pt"), torch.load(resumed / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_after_round"] == 15 and summary["rounds"] == 24
    assert not (resumed / CHECKPOINT).exists()  # removed when the run finished


def test_a_run_of_another_config_is_refused_and_its_checkpoint_ignored(tmp_path, caplog):
    folder = tmp_path / "run"
    cfg = {**BASE, "strategy": "sign-mv", "lr": 0.01, "results-dir": str(folder)}
    with pytest.raises(Crash):
        run_inprocess(cfg, callbacks=[each_round(crash_at(12))])
    other = load_config({**cfg, "lr": 0.02})
    with pytest.raises(RunFolderConflict, match=r"holds a started run of another config \(lr: 0.01 -> 0.02\)"):
        claim_run_folder(folder, other)
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(folder, other) is None
    assert "belongs to another run config; starting from round 0" in caplog.text
    clear_run_folder(folder)  # what `fedsim run --overwrite` does
    run_inprocess(other.to_mapping())
    assert json.loads((folder / "summary.json").read_text())["resumed_after_round"] is None
    assert [r["round"] for r in metric_rows(folder)] == [str(r) for r in range(25)]


def test_killed_fedsim_run_continues_from_its_checkpoint(tmp_path):
    """The real thing: SIGKILL a `fedsim run` process, run the same command again."""
    experiment = tmp_path / "x.toml"
    experiment.write_text('strategy = "llr-vote"\nlr = 0.01\nnum-nodes = 6\nnum-server-rounds = 400\neval-every = 20\nllr-warmup = 20\n')
    folder = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedsim.cli", "run", str(experiment), "--results-dir", str(folder)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (folder / CHECKPOINT).exists() or len(metric_rows(folder)) < 70:
            assert proc.poll() is None and time.monotonic() < deadline, "run ended or stalled before round 70"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (folder / "summary.json").exists()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["resumed_after_round"] >= 60 and summary["rounds"] == 400
    assert [int(r["round"]) for r in metric_rows(folder)] == list(range(401))
