"""Every notebook runs top to bottom in quick mode and shows its table and figure."""

import runpy
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


def test_notebooks_match_their_generator():
    """The committed .ipynb files are what notebooks/make_notebooks.py writes (rerun it after editing)."""
    generated = runpy.run_path(str(ROOT / "notebooks" / "make_notebooks.py"))["NOTEBOOKS"]
    assert sorted(generated) == [p.name for p in NOTEBOOKS]
    for name, cells in generated.items():
        stored = nbformat.read(ROOT / "notebooks" / name, as_version=4).cells
        assert [(c.cell_type, c.source) for c in stored] == [(c.cell_type, c.source) for c in cells], (
            f"{name} differs from notebooks/make_notebooks.py: run python notebooks/make_notebooks.py"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_quick_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_NOTEBOOK_MODE", "quick")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    monkeypatch.setenv("FEDSIM_NOTEBOOK_RESULTS", str(tmp_path / "runs"))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure"
    assert any("text/html" in o.get("data", {}) for o in outputs), "no table"
