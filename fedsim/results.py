"""Results on disk, the same from every engine, and loading them back for notebooks.

One folder per run:
- ``config.json``: the resolved run config;
- ``rounds.csv``: one row per round (round, train_loss, test_accuracy, test_loss,
  bytes_up, bytes_down, clients, rejected, seconds), appended as the run goes;
- ``model.pt``: the final global state_dict (torch.save);
- ``summary.json``: seed, engine, device, package versions, git commit, final metrics,
  client batch sizes, wall time; written last, it marks the run as finished;
- ``checkpoint.pt`` while the run goes (fedsim.checkpoint), removed when it finishes.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import platform
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = ("round", "train_loss", "test_accuracy", "test_loss", "bytes_up", "bytes_down", "clients", "rejected", "seconds")


@dataclass
class RoundRow:
    """One round's metrics; NaN where a round was not evaluated (or round 0 did not train)."""

    round: int
    train_loss: float = math.nan
    test_accuracy: float = math.nan
    test_loss: float = math.nan
    bytes_up: int = 0
    bytes_down: int = 0
    clients: int = 0
    rejected: int = 0
    seconds: float = 0.0


@dataclass
class RunWriter:
    """Writes one run's folder as the run goes (rows are flushed per round)."""

    path: Path
    rows: list[RoundRow] = field(default_factory=list)

    def start(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        with open(self.path / "rounds.csv", "w", newline="") as f:
            csv.writer(f).writerow(COLUMNS)

    def add(self, row: RoundRow) -> None:
        self.rows.append(row)
        with open(self.path / "rounds.csv", "a", newline="") as f:
            csv.writer(f).writerow([_fmt(getattr(row, c)) for c in COLUMNS])

    def resume(self, last_round: int) -> list[RoundRow]:
        """Continue a run's folder after a checkpoint: keep the rows of rounds up to
        ``last_round`` (later ones are run again) and return them."""
        with open(self.path / "rounds.csv", newline="") as f:
            kept = [r for r in csv.DictReader(f) if int(r["round"]) <= last_round]
        self.rows = [RoundRow(**{c: _parse(c, r[c]) for c in COLUMNS}) for r in kept]
        with open(self.path / "rounds.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(COLUMNS)
            out.writerows([_fmt(getattr(row, c)) for c in COLUMNS] for row in self.rows)
        return list(self.rows)

    def finish(self, state_dict: dict[str, Any] | None, summary: dict[str, Any]) -> None:
        from fedsim.checkpoint import remove_checkpoint

        if state_dict is not None:
            import torch

            torch.save(state_dict, self.path / "model.pt")
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
        remove_checkpoint(self.path)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


def _parse(column: str, text: str) -> Any:
    """A rounds.csv cell back to its RoundRow type (empty float cells are NaN)."""
    kind = type(getattr(RoundRow(round=0), column))
    if kind is float:
        return float(text) if text else math.nan
    return int(text)


@functools.cache
def environment_info() -> dict[str, Any]:
    """Package versions, Python, platform and the git commit of the working tree (if any),
    read once per process: a long sweep keeps running the code it loaded even when the
    working tree moves on, so the first reading (at the start of its first run) is the
    one that describes it."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("fedsim", "flwr", "torch", "torchvision", "flwr-datasets", "datasets", "numpy", "ray"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"packages": versions, "python": platform.python_version(), "platform": platform.platform(), "git_commit": _git_commit()}


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


STORED_FILES = ("config.json", "rounds.csv", "summary.json", "label_counts.csv")


def store_runs(source: str | Path, dest: str | Path) -> list[Path]:
    """Copy the finished runs under ``source`` (folders holding ``summary.json``, the
    folder itself or its subfolders) to ``dest``, keeping their small files only
    (``STORED_FILES``: no model, no checkpoint), e.g. to commit them under
    ``docs/results/runs/`` for the notebooks' full mode. Returns the copied folders."""
    import shutil

    source, dest = Path(source), Path(dest)
    runs = [source] if (source / "summary.json").exists() else sorted(p.parent for p in source.glob("*/summary.json"))
    out = []
    for run in runs:
        target = dest / run.name if run != source else dest
        target.mkdir(parents=True, exist_ok=True)
        for name in STORED_FILES:
            if (run / name).exists():
                shutil.copy2(run / name, target / name)
        out.append(target)
    return out


def load_run(path: str | Path):
    """A run folder's rounds.csv as a pandas DataFrame, with its config values as columns."""
    import pandas as pd

    path = Path(path)
    df = pd.read_csv(path / "rounds.csv")
    config = json.loads((path / "config.json").read_text())
    for key, value in config.items():
        df[key] = value
    df["run"] = path.name
    return df


def load_runs(paths: Iterable[str | Path]):
    """Many run folders (e.g. ``Path("runs").glob("*")``) as one DataFrame."""
    import pandas as pd

    frames = [load_run(p) for p in paths if (Path(p) / "rounds.csv").exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))


def row_dict(row: RoundRow) -> dict[str, Any]:
    return asdict(row)
