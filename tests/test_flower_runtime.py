"""Flower's real simulation runtime (SuperLink + Ray), started and stopped by these tests.

Slow (~40 s a run): marked ``flower``. Every process a test starts is stopped by PID and
the test checks that none is left.
"""

import csv
import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from fedsim.core.signs import packed_size
from fedsim.engine.flower_runtime import PROJECT_ROOT, flower_env, free_port, run_flower, stop_stragglers
from fedsim.engine.runner import run_inprocess

pytestmark = pytest.mark.flower

DIGITS_MLP_PARAMS = 4810


def rows(path: Path) -> list[dict]:
    with open(path / "rounds.csv") as f:
        return list(csv.DictReader(f))


def test_readme_quickstart_flwr_run_on_embedded_default(flwr_home):
    """`flwr run . --stream` as the README gives it, on Flower's own managed local SuperLink."""
    env = flower_env(flwr_home)
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    cmd = ["flwr", "run", ".", "--stream", "--federation-config", "num-supernodes=10 client-resources-num-cpus=1"]
    try:
        out = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        # flwr run leaves its managed SuperLink running (detached): stop it by PID.
        superlinks = stop_stragglers(flwr_home)
    text = out.stdout + out.stderr
    (flwr_home / "flwr-run.log").write_text(text)
    assert out.returncode == 0, text[-3000:]
    assert len(re.findall(r"fedsim round \d+/20: test accuracy", text)) == 21  # rounds 0..20
    final = float(re.search(r"fedsim: final test accuracy ([0-9.]+) after 20 rounds", text).group(1))
    assert final > 0.8, text[-3000:]  # 10 classes: chance is 0.1
    assert superlinks, "expected flwr run to have started a SuperLink under our FLWR_HOME"


def test_flwr_run_with_a_bad_run_config_logs_one_error_line_and_no_traceback(flwr_home):
    """The ServerApp checks the run config (against the data too) before anything else."""
    env = flower_env(flwr_home)
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    cmd = [
        "flwr", "run", ".", "--stream", "--run-config", "partitioning='labels:11' num-server-rounds=2",
        "--federation-config", "num-supernodes=4 client-resources-num-cpus=1",
    ]
    try:
        out = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop_stragglers(flwr_home)
    text = out.stdout + out.stderr
    (flwr_home / "flwr-run.log").write_text(text)
    errors = [line for line in text.splitlines() if "fedsim: error:" in line]
    assert len(errors) == 1 and "labels:11 asks for 11 labels per client but the data has only 10" in errors[0], text[-3000:]
    assert "Traceback" not in text and "fedsim round" not in text, text[-3000:]


@pytest.mark.parametrize(
    "strategy, lr",
    [("fedavg", 0.1), ("fedsgd", 0.5), ("sign-mv", 0.01), ("llr-vote", 0.01)],
)
def test_strategy_learns_on_flower_runtime_and_inprocess_engine_agrees(strategy, lr, tmp_path, flwr_home):
    config = {
        "strategy": strategy, "lr": lr, "num-nodes": 10, "num-server-rounds": 8,
        "batch-mode": 2, "llr-warmup": 3, "seed": 1,
    }
    flower = run_flower({**config, "results-dir": str(tmp_path / "flower")}, flwr_home=flwr_home, echo=False)
    inproc = run_inprocess({**config, "results-dir": str(tmp_path / "inprocess")})
    a, b = rows(flower), rows(inproc)
    assert len(a) == len(b) == 9
    for ra, rb in zip(a, b, strict=True):
        assert math.isclose(float(ra["test_accuracy"]), float(rb["test_accuracy"]), abs_tol=1e-6), (ra, rb)
        if ra["train_loss"]:
            assert math.isclose(float(ra["train_loss"]), float(rb["train_loss"]), rel_tol=1e-6)
    acc = [float(r["test_accuracy"]) for r in a]
    assert acc[-1] > acc[0] + 0.2, acc
    assert all(int(r["clients"]) == 10 and int(r["rejected"]) == 0 for r in a[1:])
    for folder in (flower, inproc):  # every client said where it trained (here: no GPU)
        summary = json.loads((folder / "summary.json").read_text())
        assert [d.split(":")[0] for d in summary["client_devices"]] == [summary["device"].split(":")[0]], summary
    if strategy in ("sign-mv", "llr-vote"):
        per_client = max(int(r["bytes_up"]) for r in a[1:]) / 10
        assert per_client <= packed_size(DIGITS_MLP_PARAMS) + 1024, per_client
