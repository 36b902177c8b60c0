"""The projects in examples/ run as their READMEs say, on both engines, at a few rounds:
they live outside the fedsim package and import nothing private."""

from __future__ import annotations

import ast
import csv
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim import cli
from fedsim.plan import release_plans

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FASHION = ROOT.parent / "shared" / "data" / "fashion_mnist"


def rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "rounds.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.fixture(autouse=True)
def _forget_task_module():
    yield
    sys.modules.pop("task", None)
    sys.path[:] = [p for p in sys.path if not p.startswith(str(EXAMPLES))]
    release_plans()


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()))
def test_an_example_imports_only_public_fedsim_and_its_own_files(example):
    for path in (EXAMPLES / example).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.startswith("fedsim") for n in names), f"{path} imports fedsim itself: {names}"
    assert (EXAMPLES / example / "README.md").exists()


def _engines(app: Path, tmp_path: Path, *sets: str) -> tuple[Path, Path]:
    from fedsim.engine.flower_runtime import stop_stragglers

    args = ["run", str(app), *[a for s in sets for a in ("--set", s)]]
    assert cli.main([*args, "--results-dir", str(tmp_path / "inprocess")]) == 0
    try:
        assert cli.main([*args, "--engine", "flower", "--results-dir", str(tmp_path / "flower")]) == 0
    finally:
        assert not stop_stragglers(tmp_path), "processes left running"
    return tmp_path / "inprocess", tmp_path / "flower"


@pytest.mark.flower
def test_the_tabular_example_on_both_engines(tmp_path):
    a, b = _engines(EXAMPLES / "tabular-llr", tmp_path, "num-server-rounds=3")
    assert rows(a) == rows(b) and len(rows(a)) == 4


@pytest.mark.flower
@pytest.mark.skipif(not FASHION.is_dir(), reason="the real Fashion-MNIST files (../shared/data/fashion_mnist) are not beside this clone")
def test_the_fashion_example_on_both_engines_with_federated_evaluation(tmp_path):
    data = tmp_path / "fashion-mnist"
    subprocess.run([sys.executable, str(EXAMPLES / "fashion-cnn" / "prepare_data.py"), str(FASHION), str(data), "--train", "2000", "--test", "400"],
                   check=True, capture_output=True)
    # every client in every round: Flower's runtime gives nodes random ids, so a sample of
    # the nodes is another set of partitions than the in-process engine's (README)
    a, b = _engines(EXAMPLES / "fashion-cnn", tmp_path, f"data-dir='{data}'", "num-server-rounds=2", "eval-every=1",
                    "fraction-train=1.0", "eval-fraction=1.0")
    assert rows(a) == rows(b)
    assert all(r["fed_accuracy"] for r in rows(a)) and (a / "clients.csv").exists() and (b / "clients.csv").exists()
