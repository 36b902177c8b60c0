"""`fedsim sweep --ray` on a real two-node Ray cluster on this machine (a head and a worker
node, each `ray start --block` in its own process group, stopped by PID afterwards): the
same results as a sweep without Ray, bit for bit on CPU, and a killed driver's sweep
finished by the next one without rerunning finished runs."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import fedsim
from fedsim.engine.flower_runtime import free_port, processes_mentioning
from fedsim.sweep import load_sweep

pytestmark = pytest.mark.ray

REPO = Path(fedsim.__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS, no cluster switch
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p),
        RAY_USAGE_STATS_ENABLED="0",
        PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    )
    return env


def _pgid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cluster_pids(roots: list[int], temp_dir: str) -> set[int]:
    """Live processes of the cluster: in the roots' process groups, descended from them,
    or naming its temp dir (Ray workers rename themselves ray::..., but stay in the group)."""
    live = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    found = {p for p in live if _pgid(p) in roots} | set(processes_mentioning(temp_dir))
    grew = True
    while grew:
        more = {p for p in live if _ppid(p) in found | set(roots)} - found
        found |= more
        grew = bool(more)
    found.discard(os.getpid())
    return {p for p in found if _state(p) not in (None, "Z")}  # a zombie runs nothing: its parent reaps it


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


class Cluster:
    """A head and one worker node (1 CPU each) in private process groups and a private temp dir.
    The address is 127.0.0.1:PORT, but Ray on Linux replaces 127.0.0.1 by the machine's own
    address (its node IP), so the nodes talk over that; with ``--node-ip-address 127.0.0.1``
    the driver could not reach the GCS, and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes a
    second node refuse to start (both seen here with Ray 2.55)."""

    def __init__(self, logs: Path) -> None:
        self.temp_dir = f"/tmp/rt-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths must stay < 108 bytes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.logs = logs
        self.procs: list[subprocess.Popen] = []
        ports = ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
                 "--runtime-env-agent-port", str(free_port())]  # never Ray's fixed defaults: another user's Ray may hold them
        common = ["--block", "--num-cpus", "1", "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats", *ports]
        self._start("head", ["--head", "--port", str(self.port), "--temp-dir", self.temp_dir, "--include-dashboard=false",
                             "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port()), *common])

    def _start(self, name: str, args: list[str]) -> None:
        with open(self.logs / f"ray-{name}.log", "w") as log:
            self.procs.append(subprocess.Popen(
                [str(Path(sys.executable).parent / "ray"), "start", *args], env=_env(), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            ))

    def start_worker(self) -> None:
        self._start("worker", ["--address", self.address, *self._common_worker()])

    def _common_worker(self) -> list[str]:
        return ["--block", "--num-cpus", "1", "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats",
                "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port())]

    def alive_nodes(self) -> int:
        out = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", "--address", self.address],
                             env=_env(), capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            return 0
        active = out.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return len(re.findall(r"node_[0-9a-f]+", active))

    def wait_for(self, nodes: int, timeout: float = 150.0) -> None:
        deadline = time.monotonic() + timeout
        while self.alive_nodes() < nodes:
            for proc in self.procs:
                assert proc.poll() is None, f"a ray start ended early:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"the cluster did not reach {nodes} nodes:\n{self.log_tail()}"
            time.sleep(2)

    def log_tail(self) -> str:
        return "\n".join(p.read_text()[-1500:] for p in sorted(self.logs.glob("ray-*.log")))

    def stop(self) -> set[int]:
        """SIGTERM the groups (ray start --block stops its node), then SIGKILL every process
        left by PID; the PIDs that were still there after the grace period."""
        roots = [p.pid for p in self.procs]
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _cluster_pids(roots, self.temp_dir):
            for proc in self.procs:
                proc.poll()  # reap the ray start processes once they end
            time.sleep(0.3)
        stubborn = _cluster_pids(roots, self.temp_dir)
        for pid in stubborn:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.5)
        subprocess.run(["rm", "-rf", self.temp_dir], check=False)
        return stubborn


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()
        left = _cluster_pids([p.pid for p in c.procs], c.temp_dir)
        assert not left, f"processes of the test's Ray cluster left behind: {sorted(left)}"


def _sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "s.toml"
    sweep.write_text(
        f'base = "{REPO / "experiments" / "quick.toml"}"\n[set]\nnum-server-rounds = 30\neval-every = 5\n'
        'batch-mode = 0\nbatch-size = 16\n[grid]\nstrategy = ["fedavg", "sign-mv"]\nseed = [0, 1]\n'
    )
    return sweep


def _results(folder: Path) -> tuple[list[dict], float, dict[str, bytes]]:
    """rounds.csv without its seconds column, the summary's final accuracy, and the final
    model's tensors as bytes."""
    import torch

    with open(folder / "rounds.csv", newline="") as f:
        rows = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]
    model = torch.load(folder / "model.pt", map_location="cpu")
    tensors = {k: v.numpy().tobytes() for k, v in model.items()}
    return rows, json.loads((folder / "summary.json").read_text())["final_test_accuracy"], tensors


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedsim.cli", "sweep", *args]


def test_sweep_on_a_two_node_ray_cluster_equals_the_sequential_sweep_and_survives_a_killed_driver(tmp_path, cluster):
    sweep = _sweep(tmp_path)
    seq = subprocess.run(_cli(str(sweep), "--results-dir", str(tmp_path / "seq")), env=_env(),
                         capture_output=True, text=True, timeout=300)  # while the head starts
    assert seq.returncode == 0, seq.stderr[-2000:]
    cluster.wait_for(1)
    cluster.start_worker()
    cluster.wait_for(2)

    out_dir = tmp_path / "ray"
    runs = load_sweep(sweep, out_dir)
    cmd = _cli(str(sweep), "--results-dir", str(out_dir), "--ray", cluster.address)
    driver = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not any(r.run_folder.finished for r in runs):
            assert driver.poll() is None, driver.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no run finished on the cluster"
            time.sleep(0.1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-sweep
        first = driver.communicate(timeout=30)[0]
    done_before = {r.name: r.run_folder.summary.stat().st_mtime_ns for r in runs if r.run_folder.finished}
    assert 1 <= len(done_before) < len(runs), first

    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert f"{len(done_before)} already done" in again.stdout, again.stdout
    for r in runs:
        assert r.status() == "done"
        if r.name in done_before:  # not run again
            assert r.run_folder.summary.stat().st_mtime_ns == done_before[r.name]
            assert f"{r.folder}: running" not in again.stdout
        else:
            assert f"{r.folder}: done" in again.stdout
    nodes = set(re.findall(r"running on \S+ \(node ([0-9a-f]{8})\)", first + again.stdout))
    assert len(nodes) == 2, first + again.stdout  # the runs went to both nodes
    for r in runs:  # bit for bit the sequential sweep's results (the seconds column aside)
        assert _results(r.folder) == _results(tmp_path / "seq" / r.name), r.name
        settings = r.run_folder.read_summary()["engine_settings"]
        assert (settings["engine"], settings["workers"], settings["threads"]) == ("inprocess", 1, 1)


def _node_of(pid: int, roots: dict[int, str]) -> str | None:
    """Which ``ray start`` process (its name in ``roots``) ``pid`` descends from."""
    seen = set()
    while pid and pid not in seen:
        if pid in roots:
            return roots[pid]
        seen.add(pid)
        pid = _ppid(pid) or 0
    return None


@pytest.mark.flower
def test_one_flower_run_spreads_its_clients_over_the_cluster_and_equals_the_inprocess_run(tmp_path, cluster):
    """`fedsim run --engine flower --ray ADDRESS`: Flower's simulation runtime joins the
    two-node cluster, its ClientApp actors run on both nodes, and with every client in every
    round (Flower's node ids are random, so only then do the engines sample the same
    partitions) the results are the in-process engine's, bit for bit."""
    run = [sys.executable, "-m", "fedsim.cli", "run", str(REPO / "experiments" / "quick.toml"), "--set", "num-nodes=4",
           "--set", "num-server-rounds=4", "--set", "eval-every=2", "--set", "batch-mode=0", "--set", "batch-size=16"]
    local = subprocess.run([*run, "--results-dir", str(tmp_path / "inprocess")], env=_env(), capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
    cluster.wait_for(1)
    cluster.start_worker()
    cluster.wait_for(2)
    roots = {cluster.procs[0].pid: "head", cluster.procs[1].pid: "worker"}
    flower = subprocess.Popen([*run, "--engine", "flower", "--ray", cluster.address, "--results-dir", str(tmp_path / "flower")],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    actors_on: set[str] = set()
    deadline = time.monotonic() + 300
    while flower.poll() is None and time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _cmdline(int(entry.name)).startswith("ray::ClientAppActor"):
                actors_on.add(_node_of(int(entry.name), roots) or "elsewhere")
        time.sleep(0.3)
    if flower.poll() is None:
        flower.kill()
    out = flower.communicate(timeout=60)[0]
    assert flower.returncode == 0, out[-3000:]
    assert {"head", "worker"} <= actors_on, (actors_on, out[-2000:])  # "elsewhere": another run's, on this machine
    assert _results(tmp_path / "flower") == _results(tmp_path / "inprocess")


def test_a_single_run_takes_ray_only_with_the_flower_engine(tmp_path, capsys):
    from fedsim.cli import main

    code = main(["run", str(REPO / "experiments" / "quick.toml"), "--ray", "auto", "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "add --engine flower" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_ray_options_are_checked_before_anything_runs(tmp_path, capsys):
    from fedsim.cli import main

    sweep = _sweep(tmp_path)
    for args, message in [
        (["--ray-cpus-per-run", "2"], "add --ray"),
        (["--ray-memory-per-run", "2"], "add --ray"),
        (["--ray", "--ray-memory-per-run", "0"], "must be > 0"),
        (["--ray", "--engine", "flower"], "--engine flower starts its own Ray"),
        (["--ray", "127.0.0.1:1"], "cannot reach a Ray head"),
        (["--ray", "nonsense"], "give host:port"),
        (["--ray", "--ray-cpus-per-run", "0"], "must be > 0"),
        (["--ray", "--ray-gpus-per-run", "-1"], "must be >= 0"),
    ]:
        try:
            code = main(["sweep", str(sweep), "--results-dir", str(tmp_path / "out"), *args])
        except SystemExit as exit:  # argparse's errors (fedsim's parser: one line, exit 2)
            code = exit.code
        assert code == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "out").exists()


def test_a_failed_run_is_reported_with_its_folder_and_the_others_go_on_on_a_local_ray(tmp_path):
    """`--ray` without an address: a private local Ray, stopped with the driver. One run's
    folder is a file (its task cannot lock it): that run fails with its folder and error,
    the other finishes, exit code 1, and nothing of the local Ray is left."""
    sweep = tmp_path / "s.toml"
    sweep.write_text(
        f'base = "{REPO / "experiments" / "quick.toml"}"\n[set]\nnum-server-rounds = 2\nbatch-mode = 0\n'
        '[grid]\nseed = [0, 1]\n'
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "seed=0").write_text("not a folder")
    driver = subprocess.Popen(_cli(str(sweep), "--results-dir", str(out_dir), "--ray"), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        deadline = time.monotonic() + 15  # Ray's own processes stop a moment after the driver
        while (left := _cluster_pids([driver.pid], "/tmp/fedsim-sweep-ray-")) and time.monotonic() < deadline:
            time.sleep(0.3)
        names = {pid: _cmdline(pid) for pid in left}
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the local Ray left behind: {names}"
    assert driver.returncode == 1, stdout + stderr
    assert f"{out_dir / 'seed=0'}: FAILED: cannot use {out_dir / 'seed=0'} as a results folder" in stdout, stdout
    assert f"fedsim: run failed: {out_dir / 'seed=0'}" in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "fedsim: error: 1 run(s) of the sweep failed: seed=0 (see above)", stderr
    assert "Traceback" not in stderr
    assert json.loads((out_dir / "seed=1" / "summary.json").read_text())["failed"] is None
    assert not list(out_dir.glob(".fedsim-ray-check-*"))  # the storage check cleans up


MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.mark.skipif(not MNIST.is_dir(), reason="the real MNIST files (../shared/data/mnist) are not beside this clone")
def test_a_100k_client_run_is_one_ray_task_that_declares_its_memory(tmp_path):
    """experiments/sweeps/cross_device_100k.toml on a private local Ray with
    --ray-memory-per-run 2 (GB): the run finishes with its 100,000 clients; asking more
    memory than the node has is one line naming it, exit 2, before anything runs."""
    sweep = REPO / "experiments" / "sweeps" / "cross_device_100k.toml"
    common = [str(sweep), "--results-dir", str(tmp_path / "out"), "--set", f"data-dir='{MNIST}'", "--set", "num-server-rounds=5",
              "--set", "eval-every=5", "--ray"]
    too_big = subprocess.run(_cli(*common, "--ray-memory-per-run", "100000"), env=_env(), capture_output=True, text=True, timeout=240)
    assert too_big.returncode == 2, too_big.stdout[-2000:] + too_big.stderr[-2000:]
    assert "and 100000 GB of memory for a run" in too_big.stderr and "Traceback" not in too_big.stderr, too_big.stderr
    assert not list((tmp_path / "out").glob("*/summary.json"))
    ok = subprocess.run(_cli(*common, "--ray-memory-per-run", "2"), env=_env(), capture_output=True, text=True, timeout=400)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "seed=0" / "summary.json").read_text())
    assert summary["num_nodes"] == 100_000 and summary["rounds"] == 5 and summary["failed"] is None, summary


def test_the_storage_check_names_what_a_node_cannot_do_with_the_sweep_folder(tmp_path):
    """The check each node runs (no Ray needed): a missing folder, another folder of the
    same path (the driver's token differs), and a folder it can use."""
    from fedsim.sweep_ray import folder_problem

    assert folder_problem(tmp_path / "nowhere", ".t", "abc", "n1") == "the folder does not exist there"
    (tmp_path / ".t").write_text("other")
    assert "another one" in folder_problem(tmp_path, ".t", "abc", "n1")
    (tmp_path / ".t").write_text("abc")
    assert folder_problem(tmp_path, ".t", "abc", "n1") == "" and (tmp_path / ".t.n1").read_text() == "abc"
    assert folder_problem(tmp_path, ".missing", "abc", "n1").startswith("FileNotFoundError")


def test_the_default_gpu_share_fills_a_gpu_nodes_cpu_slots_and_is_0_without_gpus(tmp_path):
    """No Ray needed: the share from ray.nodes()-shaped dicts."""
    from fedsim.sweep_ray import default_gpus_per_run

    runs = load_sweep(_sweep(tmp_path), tmp_path / "out")
    cpu_only = [{"Resources": {"CPU": 16.0}}, {"Resources": {"CPU": 8.0}}]
    assert default_gpus_per_run(cpu_only, 1.0, runs) == 0.0
    one_gpu = [{"Resources": {"CPU": 16.0, "GPU": 1.0}}, {"Resources": {"CPU": 8.0}}]
    assert default_gpus_per_run(one_gpu, 1.0, runs) == 0.0625  # 16 runs share the GPU
    assert default_gpus_per_run(one_gpu, 4.0, runs) == 0.25
    assert default_gpus_per_run([{"Resources": {"CPU": 3.0, "GPU": 8.0}}], 1.0, runs) == 1.0  # at most one GPU per run
    assert default_gpus_per_run([{"Resources": {"CPU": 3.0, "GPU": 1.0}}], 1.0, runs) == 0.3333  # Ray's 1e-4 steps
    pinned = load_sweep(_sweep(tmp_path), tmp_path / "out", overrides={"device": "cpu"})
    assert default_gpus_per_run(one_gpu, 1.0, pinned) == 0.0  # runs on the CPU declare no GPU
