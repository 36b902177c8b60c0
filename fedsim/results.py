"""Results on disk, the same from every engine, and loading them back for notebooks.

One folder per run:
- ``config.json``: the resolved run config;
- ``rounds.csv``: one row per round (round, train_loss, test_accuracy, test_loss,
  bytes_up, bytes_down, clients, rejected, seconds), appended as the run goes;
- ``model.pt``: the final global state_dict (torch.save);
- ``summary.json``: seed, engine, device, package versions, git commit, final metrics,
  client batch sizes, wall time; written last (atomically), it marks the run as
  finished; with ``engine_settings`` (engine, threads, workers, CPUs and GPU share per
  client: ``fedsim.engine.engine_settings``; for Flower's runtime ``run_engine`` adds them);
- ``checkpoint.pt`` while the run goes (fedsim.checkpoint), removed when it finishes;
- ``.lock``: held by the process writing the folder.

``fedsim.run_folder.RunFolder`` names these files; the code reaches them through it.
"""

from __future__ import annotations

import collections
import csv
import functools
import json
import logging
import math
import platform
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

from fedsim.run_folder import CLIENTS, CONFIG, LABEL_COUNTS, ROUNDS, SUMMARY, RunFolder, RunFolderLock

log = logging.getLogger("flwr").log  # Flower's logger, as the rest of the run logs

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
    extra: dict[str, float] = field(default_factory=dict)  # a task's other metrics, federated evaluation's

    def value(self, column: str) -> Any:
        """The row's value in ``column`` (a COLUMNS name or an extra column; NaN if absent)."""
        return getattr(self, column) if column in COLUMNS else self.extra.get(column, math.nan)


@dataclass
class RunWriter:
    """Writes one run's folder as the run goes (rows are flushed per round). ``lock``:
    the folder's lock (fedsim.run_folder.claim_run_folder), released by ``finish``;
    ``extra``: rounds.csv's columns after COLUMNS (the run's other metrics)."""

    path: Path
    rows: list[RoundRow] = field(default_factory=list)
    lock: RunFolderLock | None = None
    extra: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        return (*COLUMNS, *self.extra)

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.path)

    def start(self, config: dict[str, Any]) -> None:
        """Start the folder afresh: a previous run's files go first (so that a run killed
        early never leaves an old summary beside its new config)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.folder.remove_run_files()
        self.folder.write_config(config)
        with open(self.folder.rounds, "w", newline="") as f:
            csv.writer(f).writerow(self.columns)

    def add(self, row: RoundRow) -> None:
        self.rows.append(row)
        with open(self.folder.rounds, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.value(c)) for c in self.columns])

    def resume(self, last_round: int) -> list[RoundRow] | None:
        """Continue a run's folder after a checkpoint: keep the rows of rounds up to
        ``last_round`` (later ones are run again) and return them. A torn last line (the
        process died while writing it) is dropped with a warning; if the rows of rounds
        0..``last_round`` are not all there once each, warns and returns None (the run
        must start over)."""
        path = self.folder.rounds
        rows = _read_rows(path, self.columns)
        kept = [r for r in rows or [] if r.round <= last_round]
        if rows is None or [r.round for r in kept] != list(range(last_round + 1)):
            log(WARNING, "fedsim: %s does not hold rounds 0-%d once each; starting from round 0", path, last_round)
            return None
        self.rows = kept
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(self.columns)
            out.writerows([_fmt(row.value(c)) for c in self.columns] for row in self.rows)
        return list(self.rows)

    def finish(self, state_dict: dict[str, Any] | None, summary: dict[str, Any]) -> None:
        """Write the model and the summary (which marks the run finished), remove the
        checkpoint, release the folder's lock."""
        try:
            if state_dict is not None:
                import torch  # lazy: this module is read by notebooks and the CLI, which need no torch

                torch.save(state_dict, self.folder.model)
            self.folder.write_summary(summary)
            self.folder.remove_checkpoint()
        finally:
            if self.lock is not None:
                self.lock.release()


def _read_rows(path: Path, columns: tuple[str, ...] = COLUMNS) -> list[RoundRow] | None:
    """rounds.csv's rows, None if it is missing or its header is not ``columns``. A torn
    last line (no line end) and rows that do not parse are dropped with a warning."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        log(WARNING, "fedsim: cannot read %s (%s)", path, err)
        return None
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        log(WARNING, "fedsim: %s: dropping its torn last line %r (the run was killed while writing it)", path, lines[-1])
        lines = lines[:-1]
    records = list(csv.reader(lines))
    if not records or tuple(records[0]) != columns:
        log(WARNING, "fedsim: %s has no header %s", path, ",".join(columns))
        return None
    rows = []
    for number, record in enumerate(records[1:], 2):
        if not record:
            continue
        try:
            if len(record) != len(columns):
                raise ValueError(f"{len(record)} fields")
            values = dict(zip(columns, record, strict=True))
            row = RoundRow(**{c: _parse(c, values[c]) for c in COLUMNS})
            row.extra = {c: float(values[c]) if values[c] else math.nan for c in columns[len(COLUMNS):]}
            rows.append(row)
        except ValueError as err:
            log(WARNING, "fedsim: %s line %d: dropping a bad row (%s)", path, number, err)
    return rows


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

    versions: dict[str, str | None] = {}
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


STORED_FILES = (CONFIG, ROUNDS, SUMMARY, LABEL_COUNTS, CLIENTS)


def store_runs(source: str | Path, dest: str | Path) -> list[Path]:
    """Copy the finished runs under ``source`` (folders holding ``summary.json``, the
    folder itself or its subfolders) to ``dest``, keeping their small files only
    (``STORED_FILES``: no model, no checkpoint), e.g. to commit them under
    ``docs/results/runs/`` for the notebooks' full mode. Returns the copied folders."""
    import shutil

    source, dest = Path(source), Path(dest)
    if RunFolder(source).finished:
        runs = [source]
    else:
        runs = sorted(p for p in source.iterdir() if RunFolder(p).finished) if source.is_dir() else []
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
    run = RunFolder(path)
    df = pd.read_csv(run.rounds)
    config = json.loads(run.config.read_text())
    for key, value in config.items():
        df[key] = value
    df["run"] = path.name
    return df


def load_runs(paths: Iterable[str | Path]):
    """Many run folders (e.g. ``Path("runs").glob("*")``) as one DataFrame. A run is named
    by its folder; where two folders share a name (the same grid point of two sweeps, e.g.
    Table 1's B = 10 and B = inf), both are named ``<sweep folder>/<run folder>`` (their
    whole paths if that collides too), so that tables never merge two runs."""
    import pandas as pd

    found = [Path(p) for p in paths if RunFolder(Path(p)).rounds.exists()]
    names = collections.Counter(p.name for p in found)
    longer = collections.Counter(f"{p.parent.name}/{p.name}" for p in found if names[p.name] > 1)
    frames = []
    for p in found:
        frame = load_run(p)
        if names[p.name] > 1:
            name = f"{p.parent.name}/{p.name}"
            frame["run"] = name if longer[name] == 1 else str(p.resolve())
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))


def load_llr_weights(paths: Iterable[str | Path], keys: Iterable[str] = ("zero-sign", "attack", "attackers", "seed")):
    """One row per finished run that reports LLR weights (``summary.json`` ``algorithm.mean_llr_weight``:
    each client's weight averaged over the coordinates): its config values ``keys``, the
    attackers' (``summary.json`` ``attackers``) mean and largest weight and the honest
    clients' mean and smallest weight (NaN where a group is empty)."""
    import pandas as pd

    rows = []
    for path in paths:
        run = RunFolder(Path(path))
        summary = run.read_summary() or {}
        weights = {int(c): float(w) for c, w in summary.get("algorithm", {}).get("mean_llr_weight", {}).items()}
        if not weights:
            continue
        config = run.read_config() or {}
        bad = {int(c) for c in summary.get("attackers", [])}
        attackers = [w for c, w in weights.items() if c in bad]
        honest = [w for c, w in weights.items() if c not in bad]
        rows.append({**{k: config.get(k) for k in keys}, "run": Path(path).name,
                     "attackers_weight_mean": sum(attackers) / len(attackers) if attackers else math.nan,
                     "attackers_weight_max": max(attackers, default=math.nan),
                     "honest_weight_mean": sum(honest) / len(honest) if honest else math.nan,
                     "honest_weight_min": min(honest, default=math.nan)})
    return pd.DataFrame(rows)
