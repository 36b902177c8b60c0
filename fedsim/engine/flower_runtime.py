"""Run an experiment through Flower's own simulation runtime (Ray backend), as
``flwr run`` does, starting and stopping everything it needs.

A private SuperLink (simulation mode, free loopback ports, its own ``FLWR_HOME``) is
started as a child process in a new session; ``flwr run <app> <connection> --stream``
submits the run and streams its logs until it ends; then the SuperLink's whole process
group (the ServerApp/simulation process and Ray's workers with it) is stopped by PID.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.callbacks.mlflow import default_tracking_uri
from fedsim.config import ConfigError, RunConfig
from fedsim.device import cuda_count, default_gpu_share
from fedsim.engine.processes import (
    Watchdog,
    alive,
    deferred_interrupts,
    end_tree,
    kill_group,
    kill_pids,
    processes_mentioning,
    stop_group,
    tree_of,
)
from fedsim.run_folder import RunFolder
from fedsim.validation import load_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# How long processes that name a stopped SuperLink (Flower's detached SuperExec) get to exit
# by themselves before LocalSuperLink.stop() kills them and counts them as stragglers.
EXIT_GRACE_S = 10.0
# Seconds each process group gets after SIGTERM when a run is interrupted (SIGINT, SIGTERM).
INTERRUPT_GRACE_S = 2.0
# Seconds `flwr run` may go on after the run's summary.json is written before fedsim stops
# it: Flower's simulation process waits for every in-flight client, so one client blocked
# past round-timeout would keep it (and fedsim) running forever.
FINISH_GRACE_S = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_tmpdir(flwr_home: Path) -> Path:
    """A short RAY_TMPDIR for ``flwr_home``: Ray's AF_UNIX socket paths must stay < 108 bytes."""
    digest = hashlib.sha1(str(flwr_home.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"fedsim-ray-{digest}"


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment Flower needs here (see README: Flower settings)."""
    env = os.environ.copy()
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        RAY_TMPDIR=str(ray_tmpdir(flwr_home)),
        MPLCONFIGDIR=str(flwr_home / "mpl"),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
    )
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # The ServerApp evaluates on one thread, as the in-process engine does by default: a
    # CNN's loss on 2 threads differs in the 7th digit (oneDNN sums in another order).
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _num(x: float) -> str:
    """Flower's federation config wants ints where a value is whole (``1``, not ``1.0``)."""
    return str(int(x)) if float(x).is_integer() else str(x)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS SuperLink: the CA that signed the server certificate (SuperNodes
    and ``flwr`` verify the SuperLink with it), the server certificate and its key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


class LocalSuperLink:
    """A private SuperLink on loopback, and the SuperNodes started through it; use as a
    context manager: everything it started is stopped by PID (process groups) on exit.

    ``simulation=True``: Flower's simulation runtime (Ray) runs the SuperNodes itself.
    ``simulation=False``: a deployment SuperLink; SuperNodes connect to ``address``
    (``start_supernode``). ``tls``: serve TLS with these files (else ``--insecure``);
    ``supernode_auth``: only SuperNodes whose public key was registered (``register``)
    may connect; ``extra_env``: set for every process it starts (e.g. ``RAY_ADDRESS``).
    Flower 1.42 (as 1.41) serves its Control, Fleet and Runtime APIs on one HTTP port.
    """

    def __init__(
        self, flwr_home: Path, simulation: bool = True, tls: TLSFiles | None = None, supernode_auth: bool = False,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.flwr_home = flwr_home
        self.simulation = simulation
        self.tls = tls
        self.supernode_auth = supernode_auth
        self.http_port = free_port()
        self.address = f"127.0.0.1:{self.http_port}"
        self.env = {**flower_env(flwr_home), **(extra_env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.connection = "fedsim-local"
        self.supernodes: dict[str, subprocess.Popen[bytes]] = {}
        self._supernode_addresses: list[str] = []
        self.stragglers: list[int] = []
        self.watchdog: Watchdog | None = None

    def __enter__(self) -> LocalSuperLink:
        ray_tmpdir(self.flwr_home).mkdir(parents=True, exist_ok=True)
        self.watchdog = Watchdog()  # ends all of it should this process die without stop()
        self.watchdog.guard_marks(*self._marks())
        security = f'root-certificates = "{self.tls.ca_cert}"' if self.tls else "insecure = true"
        (self.flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "fedsim-local"\n\n'
            f'[superlink.fedsim-local]\naddress = "{self.address}"\n{security}\n'
        )
        if self.tls:
            security_args = [
                "--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                "--ssl-keyfile", str(self.tls.server_key),
            ]
        else:
            security_args = ["--insecure"]
        self.proc = self._spawn(
            "superlink",
            [
                "flower-superlink", *security_args, *(["--enable-supernode-auth"] if self.supernode_auth else []),
                *(["--simulation"] if self.simulation else []), "--isolation", "subprocess",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(self.http_port),
                "--database", str(self.flwr_home / "state.db"),
            ],
        )
        self._wait_ready()
        return self

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in a new session (its own process group, which the watchdog
        guards), output to ``<name>.out``."""
        with open(self.flwr_home / f"{name}.out", "wb") as log:
            proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if self.watchdog is not None:
            self.watchdog.guard_group(proc.pid)
        return proc

    def log_text(self, name: str) -> str:
        """What process ``name`` ("superlink", a SuperNode's name) has written so far."""
        return (self.flwr_home / f"{name}.out").read_text(errors="replace")

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {self.proc.returncode}:\n{self.log_text('superlink')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.http_port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"flower-superlink did not open port {self.http_port} within {timeout:.0f} s")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this SuperLink (its ``FLWR_HOME`` and connection)."""
        return subprocess.run(["flwr", *args], env=self.env, cwd=self.flwr_home, capture_output=True, text=True, timeout=timeout)

    def register(self, public_key: Path) -> int:
        """``flwr supernode register``: allow the SuperNode holding this key's private half;
        returns the node id the SuperLink gives it (that node's id for every run)."""
        out = self.flwr("supernode", "register", str(public_key), self.connection)
        found = re.search(r"SuperNode (\d+) registered", out.stdout + out.stderr)
        if out.returncode != 0 or found is None:
            raise RuntimeError(f"flwr supernode register {public_key} failed:\n{out.stdout}{out.stderr}")
        return int(found.group(1))

    def start_supernode(
        self, name: str, node_config: str = "", private_key: Path | None = None, insecure: bool | None = None,
        extra: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """Start a ``flower-supernode`` for this SuperLink, named ``name`` (its log is
        ``<flwr_home>/<name>.out``). ``insecure`` None: as the SuperLink (TLS ones verify it
        with the CA); ``private_key``: its authentication key."""
        insecure = self.tls is None if insecure is None else insecure
        if insecure:
            security = ["--insecure"]
        else:
            assert self.tls is not None, "a TLS SuperNode needs a TLS SuperLink"
            security = ["--root-certificates", str(self.tls.ca_cert)]
        port = free_port()
        self._supernode_addresses.append(f"127.0.0.1:{port}")
        if self.watchdog is not None:
            self.watchdog.guard_marks(f"127.0.0.1:{port} ")
        cmd = [
            "flower-supernode", *security, "--superlink", self.address, "--port", str(port),
            *(["--auth-supernode-private-key", str(private_key)] if private_key else []),
            *(["--node-config", node_config] if node_config else []), *extra,
        ]
        self.supernodes[name] = self._spawn(name, cmd)
        return self.supernodes[name]

    def kill_supernode(self, name: str) -> None:
        """SIGKILL a SuperNode and the ClientApps it started (a device that crashes)."""
        kill_group(self.supernodes[name])

    def _marks(self) -> list[str]:
        """What the command line of every process this SuperLink started holds one of."""
        return [str(self.flwr_home), str(ray_tmpdir(self.flwr_home)), *(f"{a} " for a in [self.address, *self._supernode_addresses])]

    def leftovers(self) -> list[int]:
        """PIDs of live processes that name this SuperLink's home or any of its addresses."""
        return sorted({pid for mark in self._marks() for pid in processes_mentioning(mark)})

    def stop(self, grace: float = 10.0) -> None:
        """Stop the SuperNodes' and then the SuperLink's process groups (SIGTERM, then
        SIGKILL after 10 s), then any straggler that names this SuperLink (their PIDs are
        kept in ``stragglers``: a deployment leaves none when its groups hold everything).

        Flower starts the SuperLink's SuperExec detached (its own session, outside the
        group); it polls its parent's PID and exits by itself once the SuperLink is gone,
        which under load took longer than the group stop (seen with flwr 1.42.0; Flower's
        code for it is the same in 1.41.0). So processes naming this SuperLink get up to
        ``EXIT_GRACE_S`` to exit before they count as stragglers. ``grace``: seconds each
        group and the stragglers get (``__exit__`` on an interrupt gives 2: the user is waiting)."""
        started = [p for p in [*self.supernodes.values(), self.proc] if p is not None]
        tree = tree_of([p.pid for p in started])  # before the stop: what the groups and marks miss
        for proc in started:
            stop_group(proc, grace)
        deadline = time.monotonic() + min(grace, EXIT_GRACE_S)
        while time.monotonic() < deadline and (self.leftovers() or processes_mentioning(str(self.flwr_home))):
            time.sleep(0.2)
        stragglers = stop_stragglers(self.flwr_home, grace=min(grace, 5.0)) + self.leftovers()
        kill_pids(stragglers, grace=min(grace, 5.0))
        survivors = {pid: pgid for pid, pgid in tree.items() if alive(pid)}
        end_tree(survivors, grace=min(grace, 5.0))
        stragglers += list(survivors)
        self.stragglers = sorted(set(stragglers))
        if self.watchdog is not None:
            self.watchdog.release()
            self.watchdog = None

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        with deferred_interrupts():  # a second Ctrl-C must not cut the stop short (the watchdog would finish it)
            self.stop(grace=INTERRUPT_GRACE_S if exc_type is not None and issubclass(exc_type, KeyboardInterrupt) else 10.0)


def stop_stragglers(flwr_home: Path, grace: float = 5.0) -> list[int]:
    """Kill, by PID, every process whose command line names ``flwr_home`` or its Ray
    temp dir (anything that left the SuperLink's process group, e.g. Ray daemons), and
    remove the Ray temp dir. Returns the PIDs it found."""
    ray_dir = ray_tmpdir(flwr_home)
    pids = sorted(set(processes_mentioning(str(flwr_home))) | set(processes_mentioning(str(ray_dir))))
    kill_pids(pids, grace)
    shutil.rmtree(ray_dir, ignore_errors=True)
    return pids


def gpu_share(cfg: RunConfig, cpus_per_client: float, gpus_per_client: float | None) -> float:
    """``gpus_per_client``, or if None a share that fits every concurrent client on this
    machine's GPUs when the run may use CUDA (``device`` not "cpu"), else 0 (fedsim.device)."""
    if gpus_per_client is not None:
        return gpus_per_client
    gpus = cuda_count() if cfg.device != "cpu" else 0
    return default_gpu_share(cfg.num_nodes, cpus_per_client, os.cpu_count() or 1, gpus)


# What staged_app copies of a user's app: the files a FAB carries that are code or text
# (Flower's own include patterns, less data formats: the app's data stays where it is).
_APP_FILES = ("*.py", "*.md", "*.yaml", "*.yml")
_SKIP_DIRS = {".venv", "venv", "env", ".git", "__pycache__", ".flwr", "build", "dist"}


def staged_app(app: Path, config: Mapping[str, Any], home: Path) -> Path:
    """A copy of a user's Flower app (its code, under ``home``) whose pyproject.toml
    declares every run-config key fedsim has, with ``config``'s values: Flower accepts a
    run-config override only for keys the app declares, and a user's app declares the few
    it sets. ConfigError when the app has no pyproject.toml with [tool.flwr.app]."""
    import tomli_w  # lazy: only a user's app needs it (Flower depends on it)

    try:
        project = tomllib.loads((app / "pyproject.toml").read_text())
        project["tool"]["flwr"]["app"]["config"] = dict(config)
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{app} is not a Flower app with a readable pyproject.toml and [tool.flwr.app] ({type(err).__name__}: {err})") from None
    dest = home / "app"
    shutil.rmtree(dest, ignore_errors=True)
    for pattern in _APP_FILES:
        for path in app.rglob(pattern):
            rel = path.relative_to(app)
            if not any(part in _SKIP_DIRS for part in rel.parts[:-1]) and path.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest / rel)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(tomli_w.dumps(project))
    return dest


def _flwr_run(cmd: list[str], link: LocalSuperLink, results: RunFolder, echo: bool) -> int:
    """Run ``flwr run`` (its own session, guarded by the link's watchdog) until it exits, or
    until ``FINISH_GRACE_S`` after the run wrote a new summary.json (then it is stopped,
    logged, and counts as exit 0: the results are complete). Returns its exit code."""
    started = time.time()
    with open(link.flwr_home / "flwr-run.out", "wb") as out:
        proc = subprocess.Popen(
            cmd, env=link.env, cwd=link.flwr_home, start_new_session=True,
            stdout=None if echo else out, stderr=None if echo else subprocess.STDOUT,
        )
    assert link.watchdog is not None
    link.watchdog.guard_group(proc.pid)
    finished_at: float | None = None
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            if finished_at is None and _written_since(results, started):
                finished_at = time.monotonic()
            if finished_at is not None and time.monotonic() - finished_at > FINISH_GRACE_S:
                print(
                    f"fedsim: the run wrote its results {FINISH_GRACE_S:.0f} s ago, but Flower's processes are still "
                    "running (a client still busy past round-timeout?); stopping them", file=sys.stderr,
                )
                return 0  # the finally below stops it
        return int(proc.returncode)
    finally:
        stop_group(proc, INTERRUPT_GRACE_S)


def _written_since(results: RunFolder, t: float) -> bool:
    try:
        return results.summary.stat().st_mtime >= t
    except OSError:
        return False


def run_flower(
    run_config: RunConfig | Mapping[str, Any],
    cpus_per_client: float = 1.0,
    gpus_per_client: float | None = None,
    flwr_home: Path | None = None,
    echo: bool = True,
    app: Path | None = None,
    ray_address: str | None = None,
) -> Path:
    """Run ``run_config`` (a RunConfig, or a run-config mapping that ``load_config``
    checks) through ``flwr run`` on Flower's simulation runtime with ``num-nodes``
    SuperNodes; return the results folder (``results-dir``, made absolute).
    ``gpus_per_client``: see ``gpu_share``; ``app``: the Flower app's folder (default:
    fedsim's own project); ``ray_address``: the Ray cluster Flower's simulation joins
    (``RAY_ADDRESS`` for its processes: Flower's ``ray.init()`` reads it; None: whatever
    the environment says, normally a private local Ray)."""
    cfg = run_config if isinstance(run_config, RunConfig) else load_config(run_config)
    if not cfg.results_dir:
        raise ValueError("run_flower needs results-dir: the folder the run's results go to")
    gpus_per_client = gpu_share(cfg, cpus_per_client, gpus_per_client)
    mapping = cfg.to_mapping()  # Flower's boundary: the run config goes to `flwr run` as TOML
    mapping["results-dir"] = str(Path(cfg.results_dir).resolve())
    for key in ("data-dir", "tensorboard"):  # Flower's processes run elsewhere: a relative path means "from here"
        if mapping[key]:
            mapping[key] = str(Path(mapping[key]).resolve())
    if mapping["mlflow"] == "auto":
        mapping["mlflow"] = default_tracking_uri()
    home = flwr_home or Path(tempfile.mkdtemp(prefix="fedsim-flwr-"))
    home.mkdir(parents=True, exist_ok=True)
    config_file = home / "run-config.toml"
    config_file.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in mapping.items()))
    federation = (
        f"num-supernodes={cfg.num_nodes} client-resources-num-cpus={_num(cpus_per_client)} "
        f"client-resources-num-gpus={_num(gpus_per_client)}"
    )
    project = PROJECT_ROOT if app is None else staged_app(app, mapping, home)
    results = RunFolder(Path(mapping["results-dir"]))
    with LocalSuperLink(home, extra_env={} if ray_address is None else {"RAY_ADDRESS": ray_address}) as link:
        cmd = [
            "flwr", "run", str(project), link.connection, "--run-config", str(config_file),
            "--federation-config", federation, "--stream",
        ]
        code = _flwr_run(cmd, link, results, echo)
        if code != 0:
            detail = "" if echo else (home / "flwr-run.out").read_text(errors="replace")[-6000:]
            raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {code}\n{detail}")
    if not results.finished:
        raise RuntimeError(f"the Flower run ended without writing {results.summary}; see {home}/superlink.out")
    return results.path
