"""No poison is committed (issue #21): a batch size no reply could report is refused before
a run starts, a checkpoint is checked as strictly as a reply, an implausible EF-signSGD
scale is rejected, a non-finite aggregate never becomes the global model, and a run that
cannot move its model stops and says so (exit 1, summary.json)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
from strategy_kit import each_round

from fedsim.checkpoint import CHECKPOINT
from fedsim.cli import main
from fedsim.config import MAX_BATCH_SIZE
from fedsim.core.aggregate import non_finite_keys
from fedsim.engine.runner import run_inprocess

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "experiments" / "quick.toml")
TINY = {"strategy": "fedavg", "num-nodes": 4, "num-server-rounds": 4, "eval-every": 1, "lr": 0.1, "seed": 1}


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exit_:
        rc = exit_.code
    return int(rc or 0), capsys.readouterr().err


# --- batch sizes above the reply bound ---------------------------------------------------


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ([f"batch-size={MAX_BATCH_SIZE + 1}"], f"batch-size={MAX_BATCH_SIZE + 1}: a batch size must be at most {MAX_BATCH_SIZE}"),
        (["batch-mode=0", f'batch-sizes="4,4,{MAX_BATCH_SIZE + 1},4,4,4,4,4,4,4"'], f"entry 2 (partition-id 2) is {MAX_BATCH_SIZE + 1}"),
    ],
)
def test_a_batch_size_above_the_reply_bound_is_one_line_exit_2_and_no_folder(settings, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    rc, err = _cli(["run", QUICK, *[a for s in settings for a in ("--set", s)], "--results-dir", str(results)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("fedsim: error: "), err
    assert fragment in lines[0] and "use a smaller batch size, or 0 for the whole local set" in lines[0]
    assert not results.exists() and list(tmp_path.iterdir()) == []


def test_the_largest_reportable_batch_size_is_accepted():
    from fedsim.validation import load_config

    assert load_config({"batch-size": MAX_BATCH_SIZE}).batch_size == MAX_BATCH_SIZE
    cfg = load_config({"num-nodes": 2, "batch-sizes": f"4,{MAX_BATCH_SIZE}"})
    assert cfg.batch_sizes.endswith(str(MAX_BATCH_SIZE))


# --- poisoned checkpoints ------------------------------------------------------------------


class Crash(Exception):
    pass


def _crash_after_round_3(row) -> None:
    if row.round == 3:
        raise Crash


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "rounds.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def _poison(folder: Path, change) -> None:
    state = torch.load(folder / CHECKPOINT, weights_only=True)
    state["arrays"] = change(dict(state["arrays"]))
    torch.save(state, folder / CHECKPOINT)


def _first_nan(arrays):
    key = next(iter(arrays))
    return {**arrays, key: torch.full_like(arrays[key], math.nan)}


POISONS = {
    "float64": (lambda a: {k: v.double() for k, v in a.items()}, "dtypes: "),
    "nan": (_first_nan, "hold NaN or infinite values"),
    "inf": (lambda a: {k: torch.full_like(v, -math.inf) if v.is_floating_point() else v for k, v in a.items()}, "hold NaN or infinite"),
    "missing key": (lambda a: dict(list(a.items())[1:]), "names: missing ["),
    "extra key": (lambda a: {**a, "evil.weight": torch.zeros(3)}, "unexpected ['evil.weight']"),
}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """TINY run uninterrupted: what a run restarted from round 0 must equal."""
    return run_inprocess({**TINY, "results-dir": str(tmp_path_factory.mktemp("clean") / "run")}, quiet=True)


@pytest.mark.parametrize("poison", list(POISONS))
def test_a_poisoned_checkpoint_is_set_aside_and_the_run_restarts_from_round_0(poison, clean_run, tmp_path, caplog):
    change, problem = POISONS[poison]
    folder = tmp_path / "run"
    with pytest.raises(Crash):
        run_inprocess({**TINY, "results-dir": str(folder)}, callbacks=[each_round(_crash_after_round_3)], quiet=True)
    _poison(folder, change)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_inprocess({**TINY, "results-dir": str(folder)}, quiet=True)
    assert f"damaged checkpoint {folder / CHECKPOINT}: " in caplog.text and problem in caplog.text, caplog.text
    assert "moved to checkpoint.pt.damaged, starting from round 0" in caplog.text
    assert os.path.lexists(folder / (CHECKPOINT + ".damaged")) and not (folder / CHECKPOINT).exists()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["resumed_after_round"] is None and summary["failed"] is None
    assert _rows(folder) == _rows(clean_run)  # every round evaluated a clean model, none the poisoned one
    model, clean = torch.load(folder / "model.pt"), torch.load(clean_run / "model.pt")
    assert model.keys() == clean.keys()
    assert all(model[k].dtype == clean[k].dtype and torch.equal(model[k], clean[k]) for k in model)
    assert not non_finite_keys(model)
