"""``fedsim run --engine flower`` ends, and leaves nothing running (issue #21, item 2).

Real ``fedsim run`` processes on Flower's simulation runtime. Every process in the tree
under ``fedsim run`` is recorded while the run goes (PID and start time, so a reused PID
is not mistaken for it), with every process naming the run's own temp dir (Ray's
daemons); after the run returns, or after SIGINT, SIGTERM or SIGKILL, none of them may
be alive 15 s later, and after a SIGKILL nothing writes the results folder any more.
Whatever a failing test leaves is killed by PID.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsim.engine.processes import kill_pids, processes_mentioning

pytestmark = pytest.mark.flower

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "experiments" / "quick.toml")

# digits-logreg whose 4th training forward pass over all processes (with one step per
# client-round and 3 clients: round 2's first client) blocks for good; the count is kept
# in a file beside this module, because Flower runs clients in several Ray processes.
BLOCKER = '''
import fcntl
import time
from pathlib import Path

import torch

COUNT = Path(__file__).with_name("calls")


def _count() -> int:
    with open(COUNT, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read() or 0) + 1
        f.seek(0)
        f.truncate()
        f.write(str(n))
        return n


class Net(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = torch.nn.Linear(64, num_classes)

    def forward(self, x):
        if torch.is_grad_enabled() and _count() == 4:
            while True:
                time.sleep(1)
        return self.fc(x.flatten(1))
'''


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of ``pid``, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[19]), fields[0]


class Tree:
    """The processes of one ``fedsim run`` (and those naming ``mark``), as seen over time."""

    def __init__(self, root: int, mark: str) -> None:
        self.root, self.mark = root, mark
        self.seen: dict[int, int] = {}  # pid -> start time
        self.commands: dict[int, str] = {}

    def look(self) -> None:
        stats = {int(p.name): s for p in Path("/proc").iterdir() if p.name.isdigit() and (s := _stat(int(p.name)))}
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        todo, found = [self.root], set(processes_mentioning(self.mark))
        while todo:
            pid = todo.pop()
            found.add(pid)
            todo.extend(children.get(pid, []))
        for pid in found:
            if pid in stats and pid not in self.seen:
                self.seen[pid] = stats[pid][1]
                try:
                    self.commands[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
                except OSError:
                    self.commands[pid] = "?"

    def alive(self) -> list[int]:
        """Recorded processes still running (the same process: same start time; zombies are gone)."""
        out = []
        for pid, start in self.seen.items():
            s = _stat(pid)
            if s is not None and s[1] == start and s[2] != "Z":
                out.append(pid)
        return sorted(out)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short TMPDIR for the run (Ray's socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fo", dir="/tmp"))
    yield path
    kill_pids(processes_mentioning(str(path)), grace=2)
    shutil.rmtree(path, ignore_errors=True)


def start(tmp: Path, results: Path, *settings: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "fedsim.cli", "run", QUICK, "--engine", "flower", "--results-dir", str(results)]
    for setting in settings:
        args += ["--set", setting]
    return subprocess.Popen(args, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def rounds_done(results: Path) -> int:
    try:
        with open(results / "rounds.csv") as f:
            return max((int(r["round"]) for r in csv.DictReader(f) if r.get("round", "").isdigit()), default=-1)
    except OSError:
        return -1


def watch_until(tree: Tree, proc: subprocess.Popen[str], done: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tree.look()
        if callable(done) and done():
            return
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"not done within {timeout:.0f} s; fedsim run: {proc.poll()}")


def no_survivors(tree: Tree, within: float) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and tree.alive():
        time.sleep(0.5)
    left = tree.alive()
    kill_pids(left, grace=2)  # keep the machine clean whatever the assertion says
    return left


def folder_state(results: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in results.iterdir() if p.is_file()}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_signal_to_fedsim_run_stops_every_process_it_started(sig, short_tmp):
    results = short_tmp / "run"
    proc = start(short_tmp, results, "num-server-rounds=500", "num-nodes=2")
    tree = Tree(proc.pid, str(short_tmp))
    watch_until(tree, proc, lambda: rounds_done(results) >= 1, timeout=240)
    assert len(tree.seen) >= 5, tree.seen  # fedsim, the watchdog, flwr run, the SuperLink, its SuperExec, ...
    os.kill(proc.pid, sig)
    t0 = time.monotonic()
    out, _ = proc.communicate(timeout=30)
    if sig != signal.SIGKILL:
        assert time.monotonic() - t0 < 15, out[-2000:]
        assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], out[-2000:]
        assert ("terminated (SIGTERM)" if sig == signal.SIGTERM else "fedsim: interrupted") in out
    left = no_survivors(tree, within=15 - (time.monotonic() - t0))
    assert not left, f"still running 15 s after {sig.name}: {[tree.commands[p] for p in left]}"
    before = folder_state(results)
    time.sleep(3)
    assert folder_state(results) == before, "the results folder is still being written"
    assert rounds_done(results) < 500


def test_a_client_blocked_forever_does_not_keep_fedsim_run_from_returning(short_tmp):
    """Round 2's first client never returns: the round ends at round-timeout with the other
    two, the run writes its results, and fedsim run returns (exit 0) soon after, stopping
    Flower's processes, which wait for that client for good. round-timeout 40 s: round 1
    starts Ray's workers, which took over 15 s on a loaded 2-core machine (2026-12-04)."""
    (short_tmp / "blocker.py").write_text(BLOCKER)
    results = short_tmp / "run"
    proc = start(short_tmp, results, "model='blocker:Net'", "strategy='fedsgd'", "batch-mode=0", "num-nodes=3",
                 "num-server-rounds=3", "round-timeout=40.0", "eval-every=1")
    tree = Tree(proc.pid, str(short_tmp))
    watch_until(tree, proc, lambda: proc.poll() is not None, timeout=300)
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out[-3000:]
    assert "Flower's processes are still running (a client still busy past round-timeout?); stopping them" in out, out[-3000:]
    with open(results / "rounds.csv") as f:
        clients = {int(r["round"]): int(r["clients"]) for r in csv.DictReader(f)}
    assert clients[1] == 3 and clients[2] == 2, clients
    assert (results / "summary.json").exists()
    left = no_survivors(tree, within=15)
    assert not left, [tree.commands[p] for p in left]
