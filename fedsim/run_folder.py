"""A run folder's safety: one writer at a time, and no run mixed with another config's.

The folder layout is defined here once: the file names below, and ``RunFolder``, a run's
folder with a typed path for each file (everything else reaches the files through it).
A process that writes a run
folder holds its lock (``fcntl.flock`` on ``<folder>/.lock``, which holds the holder's
PID): taken without waiting, re-entrant within a process (the CLI, a sweep and
``run_experiment`` may each hold it in one process), released when the last holder lets
go or the process dies. A process whose ancestor holds the lock (the Flower engine's
ServerApp, started by the ``fedsim`` process that took it) runs under its ancestor's hold.

Before a run starts, ``check_run_folder`` refuses a folder holding a started or finished
run of another experiment (``fedsim.config.same_experiment``); ``clear_run_folder``
removes a folder's run files (``fedsim run --overwrite``). ``claim_run_folder`` does all
three in order: lock, clear if asked, check.

Imports nothing heavy (no torch): the CLI calls it before it loads an engine.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.config import ConfigError, RunConfig, config_differences

CONFIG = "config.json"
ROUNDS = "rounds.csv"
LABEL_COUNTS = "label_counts.csv"
CLIENTS = "clients.csv"
MODEL = "model.pt"
SUMMARY = "summary.json"
SUMMARY_TMP = SUMMARY + ".tmp"
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_TMP = CHECKPOINT + ".tmp"
LOCK = ".lock"
_OLD_CLAIM = ".claim"  # written by sweep workers of fedsim before issue #14; nothing writes it now
DAMAGED_SUFFIX = ".damaged"

RUN_FILES = (CONFIG, ROUNDS, LABEL_COUNTS, CLIENTS, MODEL, SUMMARY, SUMMARY_TMP, CHECKPOINT, CHECKPOINT_TMP)
"""What a run writes in its folder; ``clear_run_folder`` removes these and nothing else."""


@dataclass(frozen=True)
class RunFolder:
    """A run's folder: where each of its files lives, and reading and writing the small
    ones. A run is finished when ``summary.json`` exists (written last, atomically)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        """The run config (written when the run starts)."""
        return self.path / CONFIG

    @property
    def rounds(self) -> Path:
        """One row per round, appended as the run goes."""
        return self.path / ROUNDS

    @property
    def label_counts(self) -> Path:
        return self.path / LABEL_COUNTS

    @property
    def clients(self) -> Path:
        """Federated evaluation's per-client figures (runs with eval-fraction > 0)."""
        return self.path / CLIENTS

    @property
    def model(self) -> Path:
        """The final global state_dict."""
        return self.path / MODEL

    @property
    def summary(self) -> Path:
        """The summary; its existence marks the run finished."""
        return self.path / SUMMARY

    @property
    def checkpoint(self) -> Path:
        """The state after the last evaluated round, while the run goes."""
        return self.path / CHECKPOINT

    @property
    def checkpoint_tmp(self) -> Path:
        return self.path / CHECKPOINT_TMP

    @property
    def lock(self) -> Path:
        """The writer's lock file (``lock_run_folder``)."""
        return self.path / LOCK

    @property
    def finished(self) -> bool:
        """Whether ``summary.json`` exists."""
        return self.summary.exists()

    def read_summary(self) -> dict[str, Any] | None:
        """``summary.json`` as a dict; None if it is missing, unreadable or not a JSON object."""
        return _read_json_object(self.summary)

    def read_config(self) -> dict[str, Any] | None:
        """The stored ``config.json`` as a dict; None if it is missing, unreadable or not a JSON object."""
        return _read_json_object(self.config)

    def write_config(self, config: dict[str, Any]) -> None:
        self.config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` atomically (a temporary file, then a rename): a reader
        never sees half a summary, and a run killed while writing it is not finished."""
        tmp = self.path / SUMMARY_TMP
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, self.summary)

    def add_to_summary(self, **values: Any) -> dict[str, Any]:
        """Add (or replace) top-level keys of a finished run's summary, atomically and under
        the folder's lock (re-entrant: a caller may hold it); returns the new summary.
        ValueError if the folder holds no readable summary."""
        with lock_run_folder(self.path):
            summary = self.read_summary()
            if summary is None:
                raise ValueError(f"{self.summary} is missing or not a JSON object; the run did not finish")
            summary.update(values)
            self.write_summary(summary)
        return summary

    def state(self) -> str | None:
        """``finished`` (summary.json), ``started`` (a checkpoint, or rounds.csv with a row)
        or None (nothing that a new run would lose)."""
        if self.finished:
            return "finished"
        if os.path.lexists(self.checkpoint):
            return "started"
        try:
            with open(self.rounds, newline="") as f:
                return "started" if sum(1 for line in csv.reader(f) if line) > 1 else None
        except (OSError, csv.Error, UnicodeDecodeError):
            return "started" if self.rounds.exists() else None

    def is_empty(self) -> bool:
        """Whether the folder is missing or holds nothing but its lock (and the ``.claim``
        file of a sweep worker of fedsim before issue #14, ignored)."""
        return not self.path.is_dir() or all(p == self.lock or p.name == _OLD_CLAIM for p in self.path.iterdir())

    def remove_run_files(self) -> None:
        """Remove the run's files (``RUN_FILES``); other files stay. The caller holds the lock."""
        for name in RUN_FILES:
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def remove_checkpoint(self) -> None:
        """Remove the checkpoint and a half-written one (a finished run needs neither)."""
        self.checkpoint.unlink(missing_ok=True)
        self.checkpoint_tmp.unlink(missing_ok=True)

    def remove_all_but_lock(self) -> None:
        """Remove everything in the folder (damaged files and strays too) except the lock:
        a run starting over from round 0. The caller holds the lock."""
        for item in self.path.iterdir():
            if item != self.lock:
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()


def _read_json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class RunFolderBusy(ConfigError):
    """Another process holds the run folder's lock."""


class RunFolderConflict(ConfigError):
    """The run folder holds a run of another experiment."""


@dataclass
class _Held:
    fd: int | None  # None: an ancestor process holds the lock for us
    count: int = 0


_held: dict[Path, _Held] = {}
_guard = threading.RLock()  # RLock: a handle's __del__ may run while this thread holds it


class RunFolderLock:
    """One hold on a run folder's lock; ``release()`` (at most once, idempotent) or use
    as a context manager. A hold dropped without release is released when collected."""

    def __init__(self, folder: Path, entry: _Held) -> None:
        self.folder = folder
        self._entry: _Held | None = entry

    def release(self) -> None:
        with _guard:
            entry, self._entry = self._entry, None
            if entry is None:
                return
            entry.count -= 1
            if entry.count <= 0 and _held.get(self.folder) is entry:
                del _held[self.folder]
                if entry.fd is not None:
                    os.close(entry.fd)  # closing the descriptor drops the flock

    def __enter__(self) -> RunFolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


def lock_run_folder(folder: str | Path) -> RunFolderLock:
    """Take the lock of ``folder`` (created if missing) for this process, without waiting.
    Raises RunFolderBusy, naming the holder's PID, if another process holds it."""
    folder = Path(folder).resolve()
    with _guard:
        entry = _held.get(folder)
        if entry is None:
            entry = _held[folder] = _Held(_take_lock(folder))
        entry.count += 1
        return RunFolderLock(folder, entry)


def _take_lock(folder: Path) -> int | None:
    """The open, flocked lock file's descriptor; None if an ancestor process holds it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(RunFolder(folder).lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise ConfigError(f"cannot use {folder} as a results folder: {err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"cannot lock results folder {folder}: {err}") from None
        pid = lock_holder(folder)
        if pid is not None and pid in _ancestors():
            return None
        who = f" (pid {pid})" if pid is not None else ""
        raise RunFolderBusy(
            f"results folder {folder} is in use by another fedsim process{who}; wait for it or choose another --results-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_holder(folder: str | Path) -> int | None:
    """The PID written in ``folder``'s lock file (its last holder's), if any."""
    try:
        return int(RunFolder(Path(folder)).lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _ancestors() -> set[int]:
    """This process's parent, grandparent, ... (Linux /proc; elsewhere the parent only)."""
    pids: set[int] = set()
    pid = os.getppid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
    return pids


def check_run_folder(folder: str | Path, cfg: RunConfig) -> None:
    """Raise RunFolderConflict if ``folder`` holds a started or finished run of another
    experiment than ``cfg`` (or one whose config.json cannot be read)."""
    run = RunFolder(Path(folder))
    state = run.state()
    if state is None:
        return
    remedy = "rerun with --overwrite to replace it, or choose another --results-dir"
    stored = run.read_config()
    if stored is None:
        raise RunFolderConflict(f"results folder {folder} holds a {state} run without a readable {CONFIG}; {remedy}")
    diff = config_differences(stored, cfg)
    if diff:
        changes = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())
        raise RunFolderConflict(f"results folder {folder} holds a {state} run of another config ({changes}); {remedy}")


def clear_run_folder(folder: str | Path) -> None:
    """Remove ``folder``'s run files (``RUN_FILES``), under its lock; other files (the
    lock, anything else) stay."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    with lock_run_folder(folder):
        RunFolder(folder).remove_run_files()


def claim_run_folder(folder: str | Path, cfg: RunConfig, overwrite: bool = False) -> RunFolderLock:
    """Lock ``folder``, clear it if ``overwrite``, check it can take ``cfg``; returns the
    hold (release it, or use it as a context manager, once the run's summary is written).
    Raises RunFolderBusy or RunFolderConflict (both ConfigError), holding nothing."""
    hold = lock_run_folder(folder)
    try:
        if overwrite:
            RunFolder(Path(folder)).remove_run_files()
        check_run_folder(folder, cfg)
    except BaseException:
        hold.release()
        raise
    return hold


def set_aside(path: Path) -> Path:
    """Rename a damaged file (or folder) to ``<name>.damaged`` (``.damaged.1``, ... if
    taken) so that a run can start over without losing it; returns the new path."""
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    k = 0
    while os.path.lexists(target):
        k += 1
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}.{k}")
    os.replace(path, target)
    return target
