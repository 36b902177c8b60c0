"""On a GPU (benchmarks/gpu_check.sh runs these when a session is lent one; elsewhere
they are skipped: tests/test_device.py checks the same wiring on the CPU by faking the
GPU conditions)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedsim.core.signs import pack_on_device, pack_signs
from fedsim.core.votes import CrossProbabilityEstimator
from fedsim.engine.runner import run_inprocess

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_packing_on_the_gpu_equals_the_host_code():
    for n in (1, 9, 4810, 1_199_882):
        x = torch.randn(n)
        x[:: 7] = 0.0
        assert np.array_equal(pack_signs(x.cuda()), pack_signs(x))
        assert pack_on_device(x.cuda()).cpu().numpy()[-1] == 0
    with pytest.raises(ValueError, match="NaN"):
        pack_signs(torch.tensor([1.0, float("nan")], device="cuda"))


def test_the_llr_vote_on_the_gpu_equals_the_cpu():
    g = torch.Generator().manual_seed(0)
    cpu, gpu = (CrossProbabilityEstimator(5000, warmup_rounds=2, device=d) for d in ("cpu", "cuda"))
    for _ in range(6):
        signs = (torch.randint(0, 2, (7, 5000), generator=g) * 2 - 1).to(torch.int8)
        assert torch.equal(cpu.vote(list(range(7)), signs), gpu.vote(list(range(7)), signs).cpu())
    assert torch.equal(cpu.state_dict()["agree"], gpu.state_dict()["agree"].cpu())


def test_weights_go_to_the_gpu_through_a_pinned_buffer_asynchronously():
    from flwr.app import ArrayRecord

    from fedsim.arrays import _STAGES, load_into
    from fedsim.models import build_model

    model = build_model("resnet20", seed=2).cuda()
    for seed in (1, 3):  # the second load waits for the first one's copies, then reuses the buffer
        src = build_model("resnet20", seed=seed)
        load_into(model, ArrayRecord(src.state_dict()))
        for (ka, va), (kb, vb) in zip(model.state_dict().items(), src.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va.cpu(), vb), ka
    stage = _STAGES[model]
    assert stage.buffer.is_pinned() and stage.done is not None


def test_clients_train_on_the_gpu_and_say_so(tmp_path):
    out = run_inprocess(
        {"strategy": "llr-vote", "lr": 0.01, "num-nodes": 4, "num-server-rounds": 3, "llr-warmup": 1, "results-dir": str(tmp_path)}
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["client_devices"] == ["cuda:0"], summary
