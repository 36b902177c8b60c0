"""Processes fedsim starts for Flower's runtime, and the watchdog that ends them if fedsim dies.

``fedsim run --engine flower`` starts a SuperLink (which starts a detached SuperExec, the
simulation process and Ray's daemons) and ``flwr run``. Each is started in a session of
its own, so a process-group kill reaches it and its children, but not what Flower or Ray
detach from it. A normal end, an exception and SIGINT/SIGTERM (the CLI turns SIGTERM into
KeyboardInterrupt) all reach ``LocalSuperLink.stop``. A SIGKILL of fedsim reaches nothing,
so each LocalSuperLink has a ``Watchdog``: a small process in its own session that reads
the groups and command-line marks (the Flower home, the Ray temp dir, the addresses) from
a pipe and, when the pipe closes without ``done`` (fedsim died), kills those groups and
every process whose command line holds a mark.

Why a watchdog, not a parent-death signal: ``PR_SET_PDEATHSIG`` reaches only a direct
child, and Flower starts its SuperExec in a new session and Ray its daemons from the
simulation process, so the tree would outlive the SuperLink by seconds to minutes (the
SuperExec polls its parent). The watchdog kills by the same rules as ``stop``. Stdlib only:
it starts in about 50 ms.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

# After fedsim died: SIGTERM, then this many seconds before SIGKILL.
WATCHDOG_GRACE_S = 2.0


def processes_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def tree_of(roots: list[int]) -> dict[int, int]:
    """``roots`` and all their descendants now: pid -> process group. Flower's SuperExec
    runs in a session of its own and Ray renames its daemons (``ray::DashboardAgent``), so
    neither a group kill of the SuperLink nor a command-line match finds them; the tree does."""
    parent, group = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None and fields[0] != "Z":
            parent[int(entry.name)], group[int(entry.name)] = int(fields[1]), int(fields[2])
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [r for r in roots if r in group]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = group[pid]
            todo.extend(children.get(pid, []))
    return found


def end_tree(tree: dict[int, int], grace: float) -> None:
    """SIGTERM every process group and process of ``tree`` (from ``tree_of``), SIGKILL
    what is left after up to ``grace`` seconds, then the groups again (a group also holds
    what its members started meanwhile). Never this process's own group."""
    own = os.getpgrp()
    groups = sorted(set(tree.values()) - {own})
    for pgid in groups:
        signal_group(pgid, signal.SIGTERM)
    kill_pids([pid for pid, pgid in tree.items() if pgid != own and alive(pid)], grace)
    for pgid in groups:
        signal_group(pgid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """``pid`` is a live process (a zombie counts as gone)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def kill_pids(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM each PID, wait up to ``grace`` seconds, then SIGKILL the survivors."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
        pids = [p for p in pids if alive(p)]
        if not pids:
            return


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    """SIGTERM ``proc``'s process group, wait up to ``grace`` seconds, then SIGKILL it."""
    if proc is None:
        return
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc)


def kill_group(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL ``proc``'s process group and reap ``proc``."""
    if proc is None:
        return
    signal_group(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT raises KeyboardInterrupt, so that it stops a run the same way."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within: SIGINT raises KeyboardInterrupt and SIGTERM ``Terminated`` (one) in the main
    thread, so ``finally`` blocks and context managers stop what was started. Python's
    default for SIGTERM is to die at once, and a process started in the background by a
    shell inherits SIGINT ignored (``kill -INT`` would do nothing). Off the main thread,
    where handlers cannot be set: nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.signal(sig, handler) for sig, handler in
              ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, _raise_terminated))}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Within: SIGINT and SIGTERM are ignored (main thread only), so a stop in progress is not cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


class Watchdog:
    """The parent's side: ``guard_group``/``guard_marks`` tell the watchdog what to end if
    this process dies; ``release`` (after a normal stop) lets it exit without killing."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedsim.engine.processes"], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )

    def _send(self, *item: object) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.write((json.dumps(item) + "\n").encode())
            self.proc.stdin.flush()

    def guard_group(self, pgid: int) -> None:
        self._send("group", pgid)

    def guard_marks(self, *marks: str) -> None:
        for mark in marks:
            self._send("mark", mark)

    def release(self) -> None:
        """fedsim stopped everything itself: the watchdog exits without killing."""
        try:
            self._send("done")
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def end_everything(groups: list[int], marks: list[str]) -> None:
    """Kill the tree under each guarded group leader (``groups``: the SuperLink's, the
    SuperNodes', ``flwr run``'s), then, in three passes over a few seconds (what a dying
    process starts meanwhile), every process whose command line holds a mark."""
    tree = tree_of(groups)
    tree.update({pgid: pgid for pgid in groups})
    end_tree(tree, WATCHDOG_GRACE_S)
    for _ in range(3):
        pids = sorted({pid for mark in marks for pid in processes_mentioning(mark)})
        kill_pids(pids, grace=WATCHDOG_GRACE_S)
        time.sleep(0.5)


def watch() -> int:
    """The watchdog's loop: read items from stdin until ``done`` (exit) or EOF (end everything)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for fedsim, which stops the run itself
    groups: list[int] = []
    marks: list[str] = []
    for line in sys.stdin.buffer:
        item = json.loads(line)
        if item[0] == "done":
            return 0
        (groups if item[0] == "group" else marks).append(item[1])
    end_everything(groups, marks)
    return 0


if __name__ == "__main__":
    sys.exit(watch())
