"""The in-process engine's ``round-timeout``: a client call that runs longer than it is
abandoned, and the round goes on with the others.

On the in-process engine the timeout bounds each client's call, not the round's wall time:
clients that Flower's runtime runs side by side run here one after another (or a few at a
time), so a round's wall time says nothing about whether a client would have met a real
round's deadline, and results must not depend on how many clients share the CPU.

A Python thread cannot be stopped from outside, so an overrunning call is *abandoned*: its
thread runs on (daemon, never joined) and takes no more work; when the call returns, its
reply is discarded and its node state is not committed (``RoundReplies.commit`` and
``overrun`` share one lock, so a reply is either in the round or discarded, never both).
The clients not started yet go to a fresh thread; the late call keeps its own model object
(``fedsim.runtime`` keys models by thread), so nothing it does reaches a later call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from flwr.app import Message


class RoundReplies:
    """The replies of one ``send_and_receive`` (message index -> reply) and which calls are
    running since when, so that a call that overruns can be abandoned alone.

    Each index is claimed once by whichever thread starts it (``start``); ``commit`` keeps
    its reply unless ``overrun`` abandoned it or the round closed; ``wait`` returns when
    every index is committed or abandoned."""

    def __init__(self, count: int) -> None:
        self._lock = threading.Lock()
        self._all_in = threading.Event()
        self._replies: dict[int, Message] = {}
        self._running: dict[int, float] = {}  # index -> time.monotonic() at its start
        self._abandoned: set[int] = set()
        self._unclaimed = set(range(count))
        self.closed = False
        if count == 0:
            self._all_in.set()

    def start(self, index: int) -> bool:
        """Claim ``index`` for the calling thread: False if it is taken or the round closed."""
        with self._lock:
            if self.closed or index not in self._unclaimed:
                return False
            self._unclaimed.discard(index)
            self._running[index] = time.monotonic()
            return True

    def commit(self, index: int, reply: Message, settle: Callable[[], None]) -> bool:
        """Keep ``reply`` and run ``settle`` (the node's state commit) unless the call was
        abandoned or the round has closed; False then (nothing kept, nothing run)."""
        with self._lock:
            self._running.pop(index, None)
            if self.closed or index in self._abandoned:
                return False
            settle()
            self._replies[index] = reply
            self._check_all_in()
            return True

    def overrun(self, timeout: float) -> list[int]:
        """Abandon and return the calls running for longer than ``timeout`` seconds."""
        now = time.monotonic()
        with self._lock:
            late = sorted(i for i, t in self._running.items() if now - t > timeout and i not in self._abandoned)
            self._abandoned.update(late)
            self._check_all_in()
            return late

    def next_check(self, timeout: float) -> float:
        """Seconds until the oldest running call overruns (at most 1: new calls start meanwhile)."""
        with self._lock:
            running = [t for i, t in self._running.items() if i not in self._abandoned]
        return max(0.01, min(1.0, (min(running) + timeout - time.monotonic()) if running else 0.05))

    def unclaimed(self) -> list[int]:
        with self._lock:
            return sorted(self._unclaimed)

    def wait(self, seconds: float | None) -> bool:
        """True once every call is committed or abandoned (waiting at most ``seconds``)."""
        return self._all_in.wait(seconds)

    def close(self) -> dict[int, Message]:
        """End the round: every later ``start`` and ``commit`` is refused. The replies kept."""
        with self._lock:
            self.closed = True
            return dict(self._replies)

    def _check_all_in(self) -> None:
        if not self._unclaimed and self._abandoned.issuperset(self._running):
            self._all_in.set()


class Runner:
    """One long-lived thread that runs one job at a time: the sequential engine's clients run
    here, not on the caller's thread, so that the caller can watch the clock. Retired when a
    call on it overran; it exits when that call returns."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._job: tuple[Future, Callable[[], Any]] | None = None
        self.retired = False
        self._thread = threading.Thread(target=self._loop, name="fedsim-clients", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on this thread (after the call before it); its Future."""
        future: Future = Future()
        with self._cond:
            self._job = (future, fn)
            self._cond.notify_all()
        return future

    def retire(self) -> None:
        """The thread exits after its current call (if any); it takes no more."""
        with self._cond:
            self.retired = True
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self.retired:
                    self._cond.wait()
                if self._job is None:
                    return
                (future, fn), self._job = self._job, None
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as ex:
                    future.set_exception(ex)
