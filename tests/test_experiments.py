"""Every committed experiment and sweep file is a valid run config (they must not rot)."""

from pathlib import Path

import pytest

from fedsim.cli import read_experiment
from fedsim.sweep import load_sweep
from fedsim.validation import load_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.toml"))
SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.toml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_is_a_valid_run_config(path):
    load_config(read_experiment(path))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_expands_to_valid_runs(path, tmp_path):
    runs = load_sweep(path, results_dir=tmp_path)
    assert runs and len({r.folder for r in runs}) == len(runs)


def test_there_are_experiments_and_sweeps():
    assert len(EXPERIMENTS) >= 5 and len(SWEEPS) >= 4
