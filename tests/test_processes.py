"""fedsim.engine.processes with plain processes: the tree walk finds a detached grandchild,
the watchdog ends a dead parent's tree (and only after it died), SIGTERM is an interrupt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fedsim.engine.processes import Terminated, alive, end_tree, kill_pids, stop_signals_interrupt, tree_of

# A parent that starts, each in a session of its own, a child which itself starts a
# grandchild in yet another session (as the SuperLink starts its SuperExec), guards the
# child's group with a watchdog, prints the PIDs and waits.
PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from fedsim.engine.processes import Watchdog

    dog = Watchdog()
    child = subprocess.Popen([sys.executable, "-c",
        "import subprocess, sys, time; g = subprocess.Popen(['sleep', '300'], start_new_session=True); "
        "print(g.pid, flush=True); time.sleep(300)"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    dog.guard_group(child.pid)
    grandchild = child.stdout.readline().strip()
    print(dog.proc.pid, child.pid, grandchild, flush=True)
    if sys.argv[1] == "release":
        child.kill(); child.wait()
        dog.release()
        print("released", flush=True)
    time.sleep(300)
""")


def _start_parent(mode: str) -> tuple[subprocess.Popen[str], list[int]]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pids = [int(x) for x in parent.stdout.readline().split()]
    assert len(pids) == 3, pids
    return parent, pids


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return not any(alive(p) for p in pids)


def test_the_tree_holds_a_grandchild_in_another_session_and_end_tree_ends_it():
    parent, (dog, child, grandchild) = _start_parent("wait")
    try:
        tree = tree_of([child])
        assert set(tree) == {child, grandchild} and tree[grandchild] == grandchild  # its own group
        end_tree(tree, grace=2)
        assert _gone_within([child, grandchild], 5)
        assert alive(parent.pid) and alive(dog)  # nothing outside the tree
    finally:
        parent.kill()
        parent.wait()
        assert _gone_within([dog], 15)  # the parent died: the watchdog ends (its tree is gone already)


def test_the_watchdog_ends_the_tree_when_its_parent_is_sigkilled():
    parent, (dog, child, grandchild) = _start_parent("wait")
    try:
        time.sleep(0.5)
        assert all(alive(p) for p in (dog, child, grandchild))  # the watchdog waits while its parent lives
        parent.kill()
        parent.wait()
        assert _gone_within([child, grandchild, dog], 15)
    finally:
        kill_pids([p for p in (child, grandchild, dog) if alive(p)], grace=1)


def test_a_released_watchdog_exits_and_kills_nothing():
    parent, (dog, child, grandchild) = _start_parent("release")
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "released"
        assert _gone_within([dog], 5)
        parent.kill()
        parent.wait()
        time.sleep(1)
        assert alive(grandchild)  # not guarded any more: the watchdog left it alone
    finally:
        kill_pids([p for p in (child, grandchild, dog) if alive(p)], grace=1)


def test_sigterm_and_sigint_interrupt_the_main_thread_within_and_not_after():
    with pytest.raises(Terminated), stop_signals_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    with pytest.raises(KeyboardInterrupt), stop_signals_interrupt():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
