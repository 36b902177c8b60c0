"""``fedsim new`` writes an app that runs with ``flwr run .`` where fedsim is installed as a
package, not from its source tree: a fresh venv holding fedsim's wheel (and Flower's, for
its command-line tools), the other dependencies shared from this test's environment. The
app's ServerApp and ClientApps import fedsim from that wheel (its summary.json has no git
commit: it did not run from a checkout)."""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.engine.flower_runtime import free_port, stop_stragglers

pytestmark = pytest.mark.flower
ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload]
    assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
    return out


def test_a_fedsim_new_app_runs_with_flwr_run_where_fedsim_is_an_installed_package(tmp_path):
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)])
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), "flwr==1.42.0"])
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    packages = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (packages / "shared-dependencies.pth").write_text(site.getsitepackages()[0] + "\n")  # torch, Ray, ... of this venv
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--ignore-installed",
         *map(str, sorted(wheels.glob("*.whl")))])
    where = run([str(python), "-c", "import fedsim; print(fedsim.__file__)"], cwd=tmp_path).stdout.strip()
    assert where.startswith(str(packages)), where

    home, results = tmp_path / "flwr-home", tmp_path / "results"
    home.mkdir()
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(home),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "RAY_TMPDIR": str(Path("/tmp") / f"fs-ray-{os.getpid()}")}
    run([str(venv / "bin" / "fedsim"), "new", "my-app"], cwd=tmp_path, env=env)
    try:
        out = run([str(venv / "bin" / "flwr"), "run", ".", "--stream", "--run-config", f"results-dir='{results}' num-server-rounds=3",
                   "--federation-config", "num-supernodes=10 client-resources-num-cpus=1"], cwd=tmp_path / "my-app", env=env)
    finally:
        left = stop_stragglers(home)  # flwr run leaves its local SuperLink running: stopped by PID
    assert re.search(r"fedsim: final test accuracy [0-9.]+ after 3 rounds", out.stdout + out.stderr), (out.stdout + out.stderr)[-3000:]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["git_commit"] is None and summary["model"] == "task:Net" and summary["rounds"] == 3
    assert left, "expected flwr run to have started a SuperLink under this FLWR_HOME"
