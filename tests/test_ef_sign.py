"""EF-signSGD (fedsim.algorithms.ef_sign): the error-feedback math, the server rule, its
reply checks, and a run on the in-process engine."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from strategy_kit import make, sent

from fedsim import protocol
from fedsim.algorithms.ef_sign import RECORD, SCALE, error_feedback_step, scaled_sign
from fedsim.core.signs import pack_signs
from fedsim.engine.flower_internals import set_server_identity
from fedsim.engine.runner import run_inprocess

set_server_identity(run_id=5)

W0 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
B0 = np.array([0.5, -0.5], np.float32)
GLOBAL = ArrayRecord({"w": Array(W0), "b": Array(B0)})
SPEC = protocol.array_spec(GLOBAL)
PARAMS = ["w", "b"]


def test_scaled_sign_sends_zero_as_plus_one_and_the_mean_magnitude():
    signs, scale = scaled_sign(torch.tensor([2.0, -1.0, 0.0, -3.0]))
    assert signs.tolist() == [1.0, -1.0, 1.0, -1.0] and scale == pytest.approx(1.5)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 8), st.floats(1e-3, 2.0), st.integers(0, 2**16))
def test_error_feedback_loses_nothing_over_rounds(n, rounds, lr, seed):
    """Telescoping: sum_t Delta_t + e_T = lr * sum_t g_t, whatever the gradients."""
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(rounds)]
    e = torch.zeros(n, dtype=torch.float64)
    applied = torch.zeros(n, dtype=torch.float64)
    for grad in grads:
        p = lr * grad + e
        signs, scale, e = error_feedback_step(grad, e, lr)
        assert set(signs.tolist()) <= {-1.0, 1.0} and scale == pytest.approx(float(p.abs().mean()))
        applied += scale * signs
    torch.testing.assert_close(applied + e, lr * torch.stack(grads).sum(0), rtol=0, atol=1e-9)


def _reply(to, vec, scale, pid, scale_dtype=np.float32):
    record = ArrayRecord({protocol.PACKED: Array(pack_signs(torch.tensor(vec))), SCALE: Array(np.array([scale], scale_dtype))})
    metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0, "partition-id": pid, "batch-size": 4})
    return Message(RecordDict({RECORD: record, protocol.METRICS: metrics}), reply_to=to)


def test_the_server_subtracts_the_plain_mean_of_the_scaled_signs():
    s = make("ef-sign", SPEC, PARAMS, lr=0.1)
    msgs = sent(s, GLOBAL, 2)
    r0 = _reply(msgs[0], [1.0, 1.0, -1.0, -1.0, 1.0, -1.0], 0.5, 0)
    r1 = _reply(msgs[1], [1.0, -1.0, -1.0, 1.0, 0.0, -1.0], 0.25, 1)
    arrays, metrics = s.aggregate_train(1, [r1, r0])
    delta = (0.5 * np.array([1, 1, -1, -1, 1, -1]) + 0.25 * np.array([1, -1, -1, 1, 1, -1])) / 2  # zero is sent as +1
    x = np.concatenate([W0.reshape(-1), B0]) - delta
    np.testing.assert_allclose(np.concatenate([arrays["w"].numpy().reshape(-1), arrays["b"].numpy()]), x, rtol=0, atol=1e-7)
    assert metrics["clients"] == 2 and metrics["updated"] == 1


@pytest.mark.parametrize(
    "scale, dtype, reason",
    [(-0.1, np.float32, "a scale ||p||_1 / N is >= 0"), (np.nan, np.float32, "NaN or infinite"), (1.0, np.int32, "expected a float dtype")],
)
def test_a_bad_scale_is_rejected_and_the_round_goes_on(scale, dtype, reason, caplog):
    s = make("ef-sign", SPEC, PARAMS, lr=0.1)
    msgs = sent(s, GLOBAL, 2)
    good = _reply(msgs[0], [1.0] * 6, 0.5, 0)
    bad = _reply(msgs[1], [1.0] * 6, scale, 1, dtype)
    with caplog.at_level("WARNING", logger="flwr"):
        arrays, metrics = s.aggregate_train(1, [good, bad])
    assert metrics["clients"] == 1 and metrics["rejected"] == 1 and arrays is not None
    assert any(reason in r.getMessage() and "node 101" in r.getMessage() for r in caplog.records)


def test_an_ef_sign_run_learns_keeps_residuals_and_is_reproducible(tmp_path):
    """On digits: accuracy rises, each client sends N/8 bytes of signs and one float, two
    runs with the same seed give the same rows, and the residuals matter (without them the
    same run gives another model)."""
    cfg = {"strategy": "ef-sign", "lr": 2.0, "num-server-rounds": 12, "eval-every": 4, "num-nodes": 5}
    a = run_inprocess({**cfg, "results-dir": str(tmp_path / "a")}, quiet=True)
    b = run_inprocess({**cfg, "results-dir": str(tmp_path / "b")}, quiet=True, workers=2)
    rows = [list(csv.DictReader(open(p / "rounds.csv"))) for p in (a, b)]
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in rs] for rs in rows]
    assert strip[0] == strip[1]
    acc = [float(r["test_accuracy"]) for r in rows[0] if r["test_accuracy"]]
    assert acc[-1] > acc[0] + 0.3, acc
    summary = json.loads((a / "summary.json").read_text())
    assert summary["final_test_accuracy"] == acc[-1]

    import fedsim.algorithms.ef_sign as ef

    real = ef.error_feedback_step
    ef.error_feedback_step = lambda g, e, lr: real(g, torch.zeros_like(e), lr)  # forget every residual
    try:
        c = run_inprocess({**cfg, "results-dir": str(tmp_path / "c")}, quiet=True)
    finally:
        ef.error_feedback_step = real
    assert json.loads((c / "summary.json").read_text())["final_test_accuracy"] != acc[-1]
