"""Every stored result (docs/results/runs/<sweep>/<run>) is still what its sweep file
describes: the config the sweep gives today equals the stored config.json, so rerunning
the sweep reproduces the run (same config, same seed, same bits on the CPU) and never
counts a stored run as stale. Guards changes of defaults (e.g. zero-sign)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.config import config_differences
from fedsim.run_folder import RunFolder
from fedsim.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
STORED = ROOT / "docs" / "results" / "runs"
SWEEPS = sorted(p.name for p in STORED.iterdir() if p.is_dir()) if STORED.is_dir() else []
DATA = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not DATA.is_dir(), reason="the stored runs' data (../shared/data) is not beside this clone")
@pytest.mark.parametrize("sweep", SWEEPS)
def test_each_stored_run_is_what_its_sweep_file_describes(sweep, monkeypatch):
    monkeypatch.chdir(ROOT)  # the sweep files' data-dir is relative to the repository
    runs = {r.name: r for r in load_sweep(ROOT / "experiments" / "sweeps" / f"{sweep}.toml", STORED / sweep)}
    stored = sorted(p for p in (STORED / sweep).iterdir() if p.is_dir())
    assert stored
    for folder in stored:
        assert folder.name in runs, f"{folder} is no point of experiments/sweeps/{sweep}.toml"
        config = RunFolder(folder).read_config()
        assert config is not None
        assert config_differences(config, runs[folder.name].config) == {}, folder.name
