"""The FAB that `flwr run .` builds from this project installs cleanly and holds only the package.

Fast (no Flower runtime): Flower's own build and install functions, the ones `flwr run` and
the simulation process call (non-public; reached through fedsim.engine.flower_internals).
"""

import zipfile
from io import BytesIO

from fedsim.engine.flower_internals import build_fab, install_fab
from fedsim.engine.flower_runtime import PROJECT_ROOT


def test_fab_builds_installs_and_leaves_out_results_notebooks_and_tests(tmp_path):
    # A run folder named the way sweeps name them: a comma in the path broke Flower's
    # FAB manifest ("path,hash,size") before fab-include limited the FAB to the package.
    stray = PROJECT_ROOT / "docs" / "results" / "runs"
    assert any("," in p.name for p in stray.rglob("*")), "expected stored sweep runs with commas in their names"

    fab = build_fab(PROJECT_ROOT)
    names = zipfile.ZipFile(BytesIO(fab)).namelist()
    assert "fedsim/server_app.py" in names and "fedsim/client_app.py" in names
    assert not [n for n in names if n.startswith(("docs/", "notebooks/", "tests/", "experiments/", "runs/"))]

    installed = install_fab(fab, tmp_path / "apps")
    assert (installed / "fedsim" / "core" / "votes.py").is_file() and (installed / "fedsim" / "algorithms" / "llr_vote.py").is_file()
    assert (installed / "pyproject.toml").is_file()
