"""Which device trains (fedsim.device): never silently the CPU where the server has CUDA.

This machine has no GPU: the GPU conditions are faked (the server's directive in the train
message, the CUDA count), and benchmarks/gpu_check.sh runs the real thing on a GPU.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fedsim import device as dev
from fedsim.client_app import app as client_app
from fedsim.config import ConfigError
from fedsim.device import ClientDeviceError, client_device, default_gpu_share, device_code, device_label, resolve_device
from fedsim.engine.inprocess import InProcessGrid
from fedsim.errors import RunFailed
from fedsim.server_app import run_experiment
from fedsim.validation import load_config

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of a machine without CUDA")


@needs_cpu_only
def test_auto_is_the_cpu_without_cuda_and_cuda_is_refused():
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=f"device='{name}', but this process sees no CUDA device"):
            resolve_device(name)
    with pytest.raises(ConfigError, match="choose 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device("gpu")


def test_auto_and_cuda_indices_with_faked_gpus(monkeypatch):
    monkeypatch.setattr(dev, "cuda_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="sees 2 CUDA device"):
        resolve_device("cuda:2")


def test_a_client_of_a_cuda_server_without_a_gpu_fails_with_the_fix(monkeypatch):
    monkeypatch.setattr(dev, "cuda_count", lambda: 0)
    with pytest.raises(ClientDeviceError, match=r"client-resources-num-gpus=0\.25") as err:
        client_device("auto", "cuda")
    assert "--gpus-per-client 0.25" in str(err.value) and "device='cpu'" in str(err.value)
    assert client_device("auto", "cpu") == torch.device("cpu")
    assert client_device("cpu", "cuda") == torch.device("cpu")  # asked for: the CPU everywhere
    assert client_device("auto", "cuda", node_device="cpu") == torch.device("cpu")  # the node's own setting wins
    with pytest.raises(ClientDeviceError, match="the run config's device: device='cuda', but this process sees no CUDA"):
        client_device("cuda", "cuda")
    monkeypatch.setattr(dev, "cuda_count", lambda: 1)
    assert client_device("auto", "cuda") == torch.device("cuda")


def test_device_codes_round_trip():
    assert device_code(torch.device("cpu")) == -1 and device_label(-1) == "cpu"
    assert device_code(torch.device("cuda:3")) == 3 and device_label(3) == "cuda:3"
    assert device_code(torch.device("cuda")) == 0


@pytest.mark.parametrize(
    "nodes, cpus_per_client, cpus, gpus, share",
    [(15, 1, 16, 1, 0.0666), (10, 1, 2, 1, 0.5), (10, 2, 2, 1, 1.0), (4, 1, 16, 8, 1.0), (15, 1, 16, 0, 0.0), (3, 0.5, 16, 1, 0.3333)],
)
def test_default_gpu_share_fits_every_concurrent_client(nodes, cpus_per_client, cpus, gpus, share):
    got = default_gpu_share(nodes, cpus_per_client, cpus, gpus)
    assert got == share
    concurrent = min(nodes, int(cpus // cpus_per_client))
    assert gpus == 0 or got * concurrent <= gpus + 1e-9


def _run(tmp_path, name: str, **extra):
    cfg = load_config(
        {"strategy": "sign-mv", "lr": 0.01, "num-server-rounds": 2, "num-nodes": 3, "results-dir": str(tmp_path / name), **extra}
    ).to_mapping()
    run_experiment(InProcessGrid(client_app, 3, cfg), load_config(cfg), engine="inprocess")
    return json.loads((tmp_path / name / "summary.json").read_text())


@needs_cpu_only
def test_each_client_reports_its_device_and_the_summary_records_the_set(tmp_path):
    summary = _run(tmp_path, "cpu")
    assert summary["device"] == "cpu" and summary["client_devices"] == ["cpu"]


@needs_cpu_only
def test_clients_without_a_gpu_under_a_cuda_server_fail_the_run_loudly(tmp_path, monkeypatch, caplog):
    """The server says CUDA (faked), the clients have none: every reply is an error naming
    the fix, and the run ends with RunFailed instead of training on the CPU."""
    from flwr.app import ConfigRecord

    import fedsim.server_app

    monkeypatch.setattr(fedsim.server_app, "train_config", lambda device: ConfigRecord({"device": "cuda"}))
    with caplog.at_level(logging.WARNING, logger="flwr"), pytest.raises(RunFailed, match="no round had min-replies=1"):
        _run(tmp_path, "faked")
    rejected = [r.getMessage() for r in caplog.records if "rejected the reply" in r.getMessage()]
    assert len(rejected) == 6 and all("sees no GPU" in m and "client-resources-num-gpus" in m for m in rejected)
    summary = json.loads((tmp_path / "faked" / "summary.json").read_text())
    assert summary["client_devices"] == [] and summary["failed"]
