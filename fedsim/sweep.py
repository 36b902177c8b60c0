"""Sweeps: a grid of runs over one base experiment, resumable.

A sweep file (TOML) names a base experiment (a run-config TOML that ``flwr run`` can read
too), fixed overrides and a grid; the grid expands into the cartesian product, one run
per point, each in its own folder named by the point (``strategy=sign-mv,seed=1``):

    base = "../fv_mnist.toml"            # relative to the sweep file
    results-dir = "runs/fv_mnist_modes"  # default folder of the sweep (relative to the cwd)
    [set]                                # overrides for every run
    num-server-rounds = 3000
    [grid]                               # one run per combination, in this order
    strategy = ["sign-mv", "llr-vote"]
    batch-mode = [1, 2, 3, 4]
    seed = [0, 1, 2]

A run whose folder holds ``summary.json`` and the same ``config.json`` is finished and
skipped on rerun; a killed run (no ``summary.json``) continues from its last checkpoint
(``checkpoint.pt``, written at every evaluated round: fedsim.checkpoint), or is run
again from round 0 if it had none.

Several processes may run one sweep at once (``fedsim sweep`` twice on one machine): the
process running a run holds its folder's lock (fedsim.run_folder: released however the
process ends), and the others skip a run whose folder is locked. To spread a sweep over
cores, GPUs or machines, ``fedsim sweep --ray`` (fedsim.sweep_ray) runs each run as a Ray
task.

Overrides (``fedsim sweep --set key=value``) apply to every run; one on a grid key narrows
the grid to that value, keeping the sweep's folder names, so that e.g.
``--set seed=1 --set batch-mode=3`` runs (or reports) just those points of the sweep.
The sweep's folder is ``--results-dir`` or the file's ``results-dir``, never a run-config
override.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.callbacks import check_named_callbacks
from fedsim.config import ConfigError, RunConfig, read_experiment, read_toml, same_experiment
from fedsim.plan import server_plan
from fedsim.run_folder import RunFolder, RunFolderBusy, RunFolderConflict, check_run_folder, lock_run_folder
from fedsim.validation import load_config


@dataclass(frozen=True)
class SweepRun:
    """One point of a sweep: its grid values, folder and full run config."""

    point: dict[str, Any]
    folder: Path
    config: RunConfig

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def run_folder(self) -> RunFolder:
        return RunFolder(self.folder)

    def status(self) -> str:
        """``done`` (finished with this config), ``stale`` (finished with another config),
        ``running`` (its folder is locked by a process on this machine), ``partial``
        (started, not finished) or ``todo``."""
        stored = self.stored_status()
        if stored in ("partial", "todo") and folder_is_locked(self.folder):
            return "running"
        return stored

    def stored_status(self) -> str:
        """``status`` from the files alone, ignoring locks."""
        run = self.run_folder
        if run.is_empty():
            return "todo"
        stored = run.read_config() if run.finished else None
        if stored is None:
            return "partial"
        return "done" if same_experiment(stored, self.config) else "stale"


def run_name(point: dict[str, Any]) -> str:
    """A folder name for a grid point: ``key=value`` pairs joined by commas, filesystem-safe."""
    text = ",".join(f"{k}={v}" for k, v in point.items()) or "run"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def load_sweep(path: str | Path, results_dir: str | Path | None = None, overrides: dict[str, Any] | None = None) -> list[SweepRun]:
    """Expand a sweep file into its runs, every point validated against its data up front:
    a bad point fails before any run starts."""
    path = Path(path)
    spec = read_toml(path, "sweep file")
    unknown = sorted(set(spec) - {"base", "results-dir", "set", "grid"})
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown top-level key(s) {unknown}; expected base, results-dir, [set], [grid]")
    if not isinstance(spec.get("base"), str):
        raise ConfigError(f"sweep file {path}: needs base = \"<experiment>.toml\" (a path relative to the sweep file)")
    for table in ("set", "grid"):
        if not isinstance(spec.get(table, {}), dict):
            raise ConfigError(f"sweep file {path}: {table} must be a table ([{table}] with key = value lines)")
    if not isinstance(spec.get("results-dir", ""), str):
        raise ConfigError(f"sweep file {path}: results-dir must be a string (a folder)")
    base = read_experiment(path.parent / spec["base"])
    overrides = dict(overrides or {})
    for where, keys in (("[set]", spec.get("set", {})), ("--set", overrides)):
        if "results-dir" in keys:
            raise ConfigError(
                f"sweep file {path}: results-dir in {where} would be replaced by each run's folder; "
                "give the sweep's folder as the top-level results-dir or with --results-dir"
            )
    grid = dict(spec.get("grid", {}))
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep file {path}: grid.{key} must be a non-empty list, got {values!r}")
    for key in set(grid) & set(overrides):  # an override on a grid key narrows the grid to it
        grid[key] = [overrides.pop(key)]
    fixed = {**base, **spec.get("set", {}), **overrides}
    root = Path(results_dir or spec.get("results-dir") or Path("runs") / path.stem).resolve()
    runs = []
    for combo in itertools.product(*grid.values()) if grid else [()]:
        point = dict(zip(grid, combo, strict=True))
        folder = root / run_name(point)
        try:
            cfg = load_config({**fixed, **point, "results-dir": str(folder)})
            server_plan(cfg)  # every point against its data, before the first run starts
            check_named_callbacks(cfg)
        except ConfigError as err:
            raise ConfigError(f"sweep point {run_name(point)}: {err}") from None
        runs.append(SweepRun(point, folder, cfg))
    return runs


def sweep_results(
    path: str | Path, run_missing: bool, results_dir: str | Path | None = None, *,
    workers: int | str | None = None, threads: int | None = None,
) -> list[SweepRun]:
    """The finished runs of a sweep, after running the missing ones on the in-process engine
    (quietly; ``workers`` and ``threads`` as ``fedsim.engine.run_engine``'s) if
    ``run_missing``; what the notebooks call."""
    from fedsim.engine import run_engine  # lazy: fedsim.engine imports this module's users (the CLI) first

    runs = load_sweep(path, results_dir)
    if run_missing:
        for _ in run_sweep(runs, lambda cfg: run_engine(cfg, "inprocess", workers=workers, threads=threads, quiet=True)):
            pass
    done = [r for r in runs if r.status() == "done"]
    print(f"{len(done)} of {len(runs)} runs of {path} finished")
    return done


def run_sweep(
    runs: list[SweepRun], execute: Callable[[RunConfig], Path], echo: Callable[[str], None] = print
) -> Iterator[tuple[SweepRun, str]]:
    """Run every run that is not done, in order, each under its folder's lock; yields (run,
    what happened): ``ran``, ``skipped`` (done) or ``busy`` (another process holds its folder)."""
    for i, run in enumerate(runs, 1):
        if run.stored_status() == "done":
            echo(f"[{i}/{len(runs)}] {run.name}: done, skipped")
            yield run, "skipped"
            continue
        try:  # the folder's lock, held while the run goes (another sweep or a `fedsim run` may hold it)
            folder_lock = lock_run_folder(run.folder)
        except RunFolderBusy as err:
            echo(f"[{i}/{len(runs)}] {run.name}: {err}; skipped")
            yield run, "busy"
            continue
        try:
            start = prepare_run(run)  # again: another process may have finished it meanwhile
            if start == "done":
                echo(f"[{i}/{len(runs)}] {run.name}: done, skipped")
                yield run, "skipped"
                continue
            if start != "fresh":
                echo(f"[{i}/{len(runs)}] {run.name}: {start}")
            echo(f"[{i}/{len(runs)}] {run.name}: running")
            execute(run.config)
        finally:
            folder_lock.release()
        yield run, "ran"


def prepare_run(run: SweepRun) -> str:
    """Make ``run``'s folder ready to run (the caller holds its lock) and say how it will
    start: ``done`` (finished with this config: nothing to run), ``fresh`` (an empty
    folder), or a sentence for the log: resuming a killed run from its checkpoint, or
    rerunning from round 0 (a killed run without one, or another config's run, whose files
    are removed)."""
    status = run.stored_status()
    if status == "done":
        return "done"
    if status == "partial":
        try:
            check_run_folder(run.folder, run.config)
        except RunFolderConflict:
            status = "stale"  # a killed run of another config: its checkpoint cannot continue this one
    if status == "partial" and run.run_folder.checkpoint.exists():
        return "partial results found, resuming from its checkpoint"
    if status in ("partial", "stale"):
        run.run_folder.remove_all_but_lock()  # never the lock: it is held
        return f"{status} results found, rerunning from round 0"
    return "fresh"


def folder_is_locked(folder: Path) -> bool:
    """Whether a process on this machine holds ``folder``'s lock (an flock on its
    ``.lock``), read from /proc/locks without taking the lock (taking it, even for a moment,
    could turn away the process about to start the run). False where /proc/locks is missing."""
    try:
        st = RunFolder(folder).lock.stat()
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    mark = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    return any(" FLOCK " in line and mark in line for line in lines)
