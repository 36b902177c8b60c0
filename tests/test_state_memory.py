"""fedsim.algorithms.memory: the server's per-client state is sized before round 1."""

import subprocess
import sys

import pytest
import torch

from fedsim.algorithms.memory import check_state_fits, clients_heard
from fedsim.config import ConfigError
from fedsim.validation import load_config


def test_clients_heard_is_all_or_rounds_times_per_round():
    assert clients_heard(load_config({"num-nodes": 100_000, "fraction-train": 0.001, "num-server-rounds": 30}), 100_000) == 3_000
    assert clients_heard(load_config({"num-nodes": 1_000, "fraction-train": 0.1, "num-server-rounds": 500}), 1_000) == 1_000
    assert clients_heard(load_config({"num-nodes": 15, "num-server-rounds": 1}), 15) == 15


@pytest.mark.parametrize(("strategy", "zero_sign", "per_entry"), [("llr-vote", "random", 4), ("llr-vote", "abstain", 8), ("sign-fd", "random", 4)])
def test_estimators_state_law_and_refusal(strategy, zero_sign, per_entry):
    cfg = load_config({"strategy": strategy, "zero-sign": zero_sign, "num-nodes": 10_000, "fraction-train": 0.01, "num-server-rounds": 200})
    need = check_state_fits(cfg, 7_850, 10_000, torch.device("cpu"), free=10**12)
    assert need == 10_000 * (7_850 * per_entry + 8)  # 100 a round x 200 rounds: every client
    with pytest.raises(ConfigError, match=rf"{need / 1e9:.1f} GB for the 10,000 clients.*more than the 0.5 GB free on cpu"):
        check_state_fits(cfg, 7_850, 10_000, torch.device("cpu"), free=500_000_000)
    assert check_state_fits(cfg, 7_850, 10_000, torch.device("cpu"), free=int(need * 5 / 3) + 1) == need


@pytest.mark.parametrize("strategy", ["fedavg", "sign-mv", "fedsgd", "ef-sign"])
def test_algorithms_without_server_state_per_client_always_fit(strategy):
    cfg = load_config({"strategy": strategy, "num-nodes": 10**6})
    assert check_state_fits(cfg, 10**6, 10**6, torch.device("cpu"), free=0) == 0


def test_fedsim_run_refuses_an_estimator_that_cannot_fit_before_any_folder(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedsim.cli", "run", "experiments/quick.toml", "--results-dir", str(out),
           "--set", "num-nodes=2000000", "--set", "partitioning='sample:5'", "--set", "fraction-train=0.01",
           "--set", "num-server-rounds=1000", "--set", "batch-mode=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "fedsim: error: strategy='llr-vote' keeps" in lines[0] and "GB free on cpu" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
