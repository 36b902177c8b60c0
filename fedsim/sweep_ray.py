"""Run a sweep's runs as Ray tasks: ``fedsim sweep X.toml --ray [ADDRESS]``.

Each pending run (not finished with its config) becomes one Ray task that declares
``cpus_per_run`` CPUs and ``gpus_per_run`` of a GPU and runs the in-process engine on the
run's folder (``fedsim.engine.run_engine(cfg, "inprocess", ...)``), so a run gives the same
bits as ``fedsim run`` / a sweep without Ray. Ray decides where and when each task runs.

- ``ADDRESS``: "" (or None) starts a private local Ray instance for the sweep and stops it
  at the end; "auto" joins the cluster started on this machine with ``ray start``;
  ``host:port`` joins that cluster's head (its GCS port).
- The sweep folder must be on storage that every node sees at the same path (a shared
  file system): a run writes its folder from whichever node runs it, and a rerun reads it
  from there. ``check_nodes`` checks this before any run starts: one tiny task per alive
  node reads a token file the driver wrote and writes one back; a node that cannot, or
  cannot import fedsim, is a ConfigError naming the node and the folder.
- A run's task takes the run folder's lock (fedsim.run_folder) itself: finished runs are
  skipped, a killed run resumes from its checkpoint (``fedsim.sweep.prepare_run``), a
  run whose folder another process holds is left to it. When the driver dies, Ray kills
  its tasks, the locks go with their processes, and the next ``fedsim sweep`` continues;
  a task waits up to ``LOCK_WAIT_S`` for a lock whose holder is still being killed.
- A run that raises is reported with its folder and error; the other runs go on.

Imports ray only inside functions: the CLI imports this module for ``--ray`` only.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import tempfile
import time
import traceback
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.config import ConfigError
from fedsim.data.errors import DataError
from fedsim.engine import run_engine
from fedsim.errors import RunFailed
from fedsim.run_folder import RunFolderBusy, lock_run_folder
from fedsim.sweep import SweepRun, prepare_run

LOCK_WAIT_S = 60.0
"""How long a run's task waits for its folder's lock (held by a task of a driver that was
just killed, until Ray has killed it) before it leaves the run to the holder."""

CHECK_TIMEOUT_S = 300.0
"""How long the storage check waits for a task on every node (workers start slowly on a
loaded machine)."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how a sweep's runs go on Ray."""

    address: str = ""  # "" a private local instance, "auto", or host:port of a head
    cpus_per_run: float = 1.0
    gpus_per_run: float | None = None  # None: the default share (``default_gpus_per_run``)
    workers: int | str | None = None  # in-process engine workers per run; None: the run's CPUs
    threads: int | None = None  # torch threads per worker; None: 1
    memory_per_run: float | None = None  # GB of memory each run's task declares (Ray's ``memory``); None: none

    def __post_init__(self) -> None:
        if not (isinstance(self.cpus_per_run, int | float) and math.isfinite(self.cpus_per_run) and self.cpus_per_run > 0):
            raise ConfigError(f"--ray-cpus-per-run must be a number > 0, got {self.cpus_per_run!r}")
        g = self.gpus_per_run
        if g is not None and not (isinstance(g, int | float) and math.isfinite(g) and 0 <= g and (g <= 1 or g == int(g))):
            raise ConfigError(f"--ray-gpus-per-run must be 0, a share in (0, 1] or a whole number of GPUs, got {g!r}")
        m = self.memory_per_run
        if m is not None and not (isinstance(m, int | float) and math.isfinite(m) and m > 0):
            raise ConfigError(f"--ray-memory-per-run must be a number of GB > 0, got {m!r}")

    @property
    def memory_bytes(self) -> int:
        """The memory each run's task declares, in bytes (0: none)."""
        return 0 if self.memory_per_run is None else int(self.memory_per_run * 1e9)


@dataclass
class RunOutcome:
    """What became of one run: ``skipped`` (finished before), ``ran``, ``failed`` (with
    ``error``) or ``busy`` (another process held its folder)."""

    run: SweepRun
    what: str
    error: str = ""
    node: str = ""
    note: str = ""  # e.g. "resuming from its checkpoint"
    summary: dict[str, Any] = field(default_factory=dict)


def default_gpus_per_run(nodes: list[dict[str, Any]], cpus_per_run: float, runs: list[SweepRun]) -> float:
    """0 when no alive node has a GPU or every run is pinned to the CPU (``device = "cpu"``);
    else the share that lets every run a GPU node's CPUs can hold at once share its GPUs:
    min over GPU nodes of GPUs / (CPUs // cpus_per_run), at most 1, rounded down to 1e-4
    (Ray's resolution). Without a share, Ray hides the GPUs from a task and the run would
    silently fall back to the CPU."""
    if all(r.config.device == "cpu" for r in runs):
        return 0.0
    shares = []
    for node in nodes:
        res = node.get("Resources", {})
        gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
        if gpus > 0:
            slots = max(1, int(cpus // cpus_per_run))
            shares.append(min(1.0, gpus / slots))
    return int(min(shares) * 10_000) / 10_000 if shares else 0.0


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def node_name(node: dict[str, Any]) -> str:
    return f"{node.get('NodeManagerAddress', '?')} (node {str(node.get('NodeID', '?'))[:8]})"


def folder_problem(root: Path, token_name: str, token: str, mark: str) -> str:
    """On a node: why it cannot use the sweep folder ``root`` ("" if it can): ``root`` must
    be there, hold the driver's token file ``token_name`` with ``token``, and take a file
    ``<token_name>.<mark>`` written from here."""
    try:
        if not root.is_dir():
            return "the folder does not exist there"
        if (root / token_name).read_text() != token:
            return "the folder there is another one (the driver's token file differs)"
        (root / f"{token_name}.{mark}").write_text(token)
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return ""


def _check_folder_here(root: str, token_name: str, token: str) -> dict[str, Any]:
    """The storage check's task on one node: ``folder_problem`` there, and which fedsim it imports."""
    import ray

    import fedsim  # in the Ray worker: which fedsim that node imports

    node_id = ray.get_runtime_context().get_node_id()
    return {"node_id": node_id, "fedsim": fedsim.__file__, "error": folder_problem(Path(root), token_name, token, node_id[:16])}


def check_nodes(root: Path, nodes: list[dict[str, Any]], timeout: float = CHECK_TIMEOUT_S) -> None:
    """Raise ConfigError unless every node in ``nodes`` sees ``root`` (same path, same
    folder, writable) and imports fedsim; runs one task per node, pinned to it, using no CPU."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the sweep folder {root}: {err}") from None
    token_name = f".fedsim-ray-check-{uuid.uuid4().hex[:12]}"
    token = uuid.uuid4().hex
    (root / token_name).write_text(token)
    check = ray.remote(num_cpus=0, max_retries=0)(_check_folder_here)
    try:
        refs = {
            node["NodeID"]: check.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(root), token_name, token)
            for node in nodes
        }
        by_id = {n["NodeID"]: n for n in nodes}
        deadline = time.monotonic() + timeout
        for node_id, ref in refs.items():
            where = node_name(by_id[node_id])
            try:
                result = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                raise ConfigError(f"Ray node {where} did not run the sweep folder check within {timeout:.0f} s") from None
            except ray.exceptions.RayError as err:
                reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                raise ConfigError(
                    f"Ray node {where} cannot run fedsim's tasks ({reason}); install fedsim there "
                    "(the same version) or make it importable (PYTHONPATH)"
                ) from None
            if result["error"] or not (root / f"{token_name}.{node_id[:16]}").is_file():
                reason = result["error"] or "what it wrote there does not show up here"
                raise ConfigError(
                    f"Ray node {where} cannot use the sweep folder {root}: {reason}; a sweep on Ray needs its "
                    "folder (--results-dir) on storage every node sees at the same path"
                )
    finally:
        for item in root.glob(token_name + "*"):
            item.unlink(missing_ok=True)


def _run_here(
    run: SweepRun, workers: int | str, threads: int | None, progress: Any, lock_wait: float,
) -> dict[str, Any]:
    """One run, as a Ray task: lock its folder, skip it if done, resume or clear it
    (fedsim.sweep.prepare_run), run the in-process engine. Never raises for the run's own
    failure: returns what happened, with the error text."""
    import ray


    node = f"{ray.util.get_node_ip_address()} (node {ray.get_runtime_context().get_node_id()[:8]})"
    deadline = time.monotonic() + lock_wait
    while True:
        try:
            hold = lock_run_folder(run.folder)
            break
        except RunFolderBusy as err:
            if time.monotonic() >= deadline:
                return {"what": "busy", "error": str(err), "node": node}
            time.sleep(1.0)
        except ConfigError as err:
            return {"what": "failed", "error": str(err), "node": node}
    try:
        start = prepare_run(run)
        if start == "done":
            return {"what": "skipped", "node": node}
        progress.started.remote(run.name, node, "" if start == "fresh" else start)
        try:
            run_engine(run.config, "inprocess", workers=workers, threads=threads, quiet=True)
        except Exception as err:
            text = str(err) if isinstance(err, RunFailed | ConfigError | DataError) else f"{type(err).__name__}: {err}"
            if os.environ.get("FEDSIM_DEBUG", "") not in ("", "0"):
                text += "\n" + traceback.format_exc()
            return {"what": "failed", "error": text, "node": node}
        summary = run.run_folder.read_summary() or {}
        return {"what": "ran", "node": node, "note": "" if start == "fresh" else start, "summary": summary}
    finally:
        hold.release()


class _Progress:
    """A Ray actor that the runs' tasks tell when they start (Ray says when a task ends,
    not when it starts)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def started(self, name: str, node: str, note: str) -> None:
        self.events.append((name, node, note))

    def take(self) -> list[tuple[str, str, str]]:
        events, self.events = self.events, []
        return events


def _env_for_workers() -> dict[str, str]:
    """Environment for the runs' Ray workers: this driver's PYTHONPATH (so that they
    import the same fedsim where the path exists on every node) and FEDSIM_DEBUG."""
    env = {k: os.environ[k] for k in ("PYTHONPATH", "FEDSIM_DEBUG") if os.environ.get(k)}
    return env


def _check_reachable(address: str) -> None:
    """A ConfigError at once for host:port where nothing listens (ray.init would retry for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray {address!r}: give host:port of the Ray head (its GCS port), 'auto', or nothing for a local Ray")
    try:
        with socket.create_connection((host, int(port)), timeout=10):
            pass
    except OSError as err:
        raise ConfigError(f"--ray {address}: cannot reach a Ray head there ({err}); start one with `ray start --head` or check the address") from None


def _init_ray(address: str) -> str | None:
    """Connect to (or start) Ray; the private temp dir of a local instance, to remove after."""
    import ray

    runtime_env = {"env_vars": _env_for_workers()}
    common: dict[str, Any] = dict(runtime_env=runtime_env, log_to_driver=False, configure_logging=False)
    if not address:  # a private instance: its own short temp dir (Ray's socket paths < 108 bytes), no dashboard
        temp_dir = tempfile.mkdtemp(prefix="fedsim-sweep-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
        with warnings.catch_warnings():  # a hint about Ray's future default for tasks without GPUs
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
            ray.init(address="local", include_dashboard=False, _temp_dir=temp_dir, **common)
        return temp_dir
    if address != "auto":
        _check_reachable(address)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
            ray.init(address=address, **common)
    except ConnectionError as err:
        raise ConfigError(f"--ray {address}: {err} (start a cluster with `ray start --head`, or give the head's HOST:PORT)") from None
    return None


class _Tally:
    """What each run of a ``--ray`` sweep did, and one progress line per change of state
    (counts done / running / pending, and the run's folder)."""

    def __init__(self, runs: list[SweepRun], echo: Callable[[str], None]) -> None:
        self.runs, self.echo = runs, echo
        self.outcomes: dict[str, RunOutcome] = {r.name: RunOutcome(r, "skipped") for r in runs if r.status() == "done"}
        self.running: dict[str, str] = {}

    @property
    def pending(self) -> list[SweepRun]:
        return [r for r in self.runs if r.name not in self.outcomes]

    def announce(self) -> None:
        """The sweep's first lines: how many runs are done, and each run's folder and state."""
        root = self.runs[0].folder.parent
        self.echo(f"fedsim: sweep of {len(self.runs)} runs in {root}: {len(self.outcomes)} already done, {len(self.pending)} to run on Ray")
        for run in self.runs:
            self.echo(f"  {'done' if run.name in self.outcomes else 'pending':8s} {run.folder}")

    def line(self, run: SweepRun, what: str) -> None:
        total = len(self.runs)
        done = sum(o.what in ("ran", "skipped") for o in self.outcomes.values())
        failed = sum(o.what == "failed" for o in self.outcomes.values())
        waiting = total - len(self.outcomes) - len(self.running)
        counts = f"{done}/{total} done, {len(self.running)} running, {waiting} pending" + (f", {failed} failed" if failed else "")
        self.echo(f"[{counts}] {run.folder}: {what}")

    def started(self, run: SweepRun, node: str, note: str) -> None:
        if run.name not in self.outcomes and run.name not in self.running:
            self.running[run.name] = node
            self.line(run, f"running on {node}" + (f"; {note}" if note else ""))

    def ended(self, run: SweepRun, result: dict[str, Any]) -> None:
        self.running.pop(run.name, None)
        outcome = RunOutcome(run, result["what"], result.get("error", ""), result.get("node", ""), result.get("note", ""), result.get("summary", {}))
        self.outcomes[run.name] = outcome
        if outcome.what == "ran":
            acc = outcome.summary.get("final_test_accuracy")
            self.line(run, "done" + (f", final test accuracy {acc:.4f}" if isinstance(acc, float) else ""))
        elif outcome.what == "skipped":
            self.line(run, "done by another process meanwhile, skipped")
        elif outcome.what == "busy":
            self.line(run, f"left to another process: {outcome.error}")
        else:
            self.line(run, f"FAILED: {outcome.error.splitlines()[0] if outcome.error else '?'}")

    def in_order(self) -> list[RunOutcome]:
        return [self.outcomes[r.name] for r in self.runs]


def run_sweep_on_ray(runs: list[SweepRun], options: RayOptions, echo: Callable[[str], None] = print) -> list[RunOutcome]:
    """Run the sweep's runs that are not finished as Ray tasks (see the module's notes);
    one line per change of state; returns one outcome per run, in the sweep's order.
    Raises ConfigError (before any run starts) for an unreachable cluster, a node that
    cannot see the sweep folder, or resources that no node has."""
    import ray  # lazy: Ray is big, and only --ray needs it

    tally = _Tally(runs, echo)
    tally.announce()
    if not tally.pending:
        return tally.in_order()
    temp_dir = _init_ray(options.address)
    try:
        nodes = alive_nodes()
        gpus = _gpus_per_run(nodes, options, tally.pending)
        check_nodes(runs[0].folder.parent, nodes)
        workers = options.workers if options.workers is not None else max(1, int(options.cpus_per_run))
        echo(
            f"fedsim: Ray cluster of {len(nodes)} node(s), {sum(float(n['Resources'].get('CPU', 0)) for n in nodes):g} CPUs, "
            f"{sum(float(n['Resources'].get('GPU', 0)) for n in nodes):g} GPUs; each run takes {options.cpus_per_run:g} CPU(s), "
            f"{gpus:g} GPU(s), {workers} worker(s); the sweep folder is visible on every node"
        )
        _run_tasks(tally, options, gpus, workers)
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return tally.in_order()


def _gpus_per_run(nodes: list[dict[str, Any]], options: RayOptions, pending: list[SweepRun]) -> float:
    """The GPU share each run's task declares; ConfigError if no node has the resources of one run."""
    gpus = options.gpus_per_run if options.gpus_per_run is not None else default_gpus_per_run(nodes, options.cpus_per_run, pending)
    fits = [
        n for n in nodes
        if float(n["Resources"].get("CPU", 0)) >= options.cpus_per_run and float(n["Resources"].get("GPU", 0)) >= gpus
        and float(n["Resources"].get("memory", 0)) >= options.memory_bytes
    ]
    if not fits:
        have = ", ".join(
            f"{node_name(n)}: {n['Resources'].get('CPU', 0):g} CPU, {n['Resources'].get('GPU', 0):g} GPU, "
            f"{float(n['Resources'].get('memory', 0)) / 1e9:.1f} GB" for n in nodes
        )
        memory = f" and {options.memory_per_run:g} GB of memory" if options.memory_per_run is not None else ""
        raise ConfigError(
            f"no Ray node has {options.cpus_per_run:g} CPU(s), {gpus:g} GPU(s){memory} for a run "
            f"(--ray-cpus-per-run, --ray-gpus-per-run, --ray-memory-per-run); the cluster has {have}"
        )
    return gpus


def _run_tasks(tally: _Tally, options: RayOptions, gpus: float, workers: int | str) -> None:
    """Submit every pending run as a task and report each as it starts and ends."""
    import ray  # lazy: as run_sweep_on_ray

    progress: Any = ray.remote(num_cpus=0)(_Progress).remote()  # an actor handle
    task = ray.remote(max_retries=0)(_run_here)
    pending = tally.pending
    refs = {
        task.options(num_cpus=options.cpus_per_run, num_gpus=gpus, memory=options.memory_bytes, name=f"fedsim-run:{run.name}").remote(
            run, workers, options.threads, progress, LOCK_WAIT_S
        ): run
        for run in pending
    }
    by_name = {r.name: r for r in pending}
    left = list(refs)
    while left:
        ready, left = ray.wait(left, num_returns=1, timeout=1.0)
        for name, node, note in ray.get(progress.take.remote()):
            tally.started(by_name[name], node, note)
        for ref in ready:
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as err:  # the task's worker died (OOM, node lost, ...)
                text = str(err).strip()
                result = {"what": "failed", "error": text.splitlines()[-1] if text else type(err).__name__, "node": ""}
            tally.ended(refs[ref], result)
