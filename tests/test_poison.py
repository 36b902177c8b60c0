"""No poison is committed (issue #21): a batch size no reply could report is refused before
a run starts, a checkpoint is checked as strictly as a reply, an implausible EF-signSGD
scale is rejected, a non-finite aggregate never becomes the global model, and a run that
cannot move its model stops and says so (exit 1, summary.json)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_kit import cli
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from strategy_kit import each_round, make, sent

from fedsim import protocol
from fedsim.algorithms.ef_sign import MAX_SCALE_RATIO, RECORD, SCALE
from fedsim.checkpoint import CHECKPOINT
from fedsim.client_app import app as fedsim_client
from fedsim.config import MAX_BATCH_SIZE, ConfigError
from fedsim.core.aggregate import non_finite_keys
from fedsim.core.signs import pack_signs
from fedsim.engine.flower_internals import set_server_identity
from fedsim.engine.inprocess import InProcessGrid
from fedsim.engine.runner import run_inprocess
from fedsim.errors import RunFailed
from fedsim.server_app import run_experiment
from fedsim.validation import load_config

set_server_identity(run_id=5)

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "experiments" / "quick.toml")
TINY = {"strategy": "fedavg", "num-nodes": 4, "num-server-rounds": 4, "eval-every": 1, "lr": 0.1, "seed": 1}


# --- batch sizes above the reply bound ---------------------------------------------------


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ([f"batch-size={MAX_BATCH_SIZE + 1}"], f"batch-size={MAX_BATCH_SIZE + 1}: a batch size must be at most {MAX_BATCH_SIZE}"),
        (["batch-mode=0", f'batch-sizes="4,4,{MAX_BATCH_SIZE + 1},4,4,4,4,4,4,4"'], f"entry 2 (partition-id 2) is {MAX_BATCH_SIZE + 1}"),
    ],
)
def test_a_batch_size_above_the_reply_bound_is_one_line_exit_2_and_no_folder(settings, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    rc, err = cli(["run", QUICK, *[a for s in settings for a in ("--set", s)], "--results-dir", str(results)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("fedsim: error: "), err
    assert fragment in lines[0] and "use a smaller batch size, or 0 for the whole local set" in lines[0]
    assert not results.exists() and list(tmp_path.iterdir()) == []


def test_the_largest_reportable_batch_size_is_accepted():
    assert load_config({"batch-size": MAX_BATCH_SIZE}).batch_size == MAX_BATCH_SIZE
    cfg = load_config({"num-nodes": 2, "batch-sizes": f"4,{MAX_BATCH_SIZE}"})
    assert cfg.batch_sizes.endswith(str(MAX_BATCH_SIZE))


# --- poisoned checkpoints ------------------------------------------------------------------


class Crash(Exception):
    pass


def _crash_after_round_3(row) -> None:
    if row.round == 3:
        raise Crash


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "rounds.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def _poison(folder: Path, change) -> None:
    state = torch.load(folder / CHECKPOINT, weights_only=True)
    state["arrays"] = change(dict(state["arrays"]))
    torch.save(state, folder / CHECKPOINT)


def _first_nan(arrays):
    key = next(iter(arrays))
    return {**arrays, key: torch.full_like(arrays[key], math.nan)}


POISONS = {
    "float64": (lambda a: {k: v.double() for k, v in a.items()}, "dtypes: "),
    "nan": (_first_nan, "hold NaN or infinite values"),
    "inf": (lambda a: {k: torch.full_like(v, -math.inf) if v.is_floating_point() else v for k, v in a.items()}, "hold NaN or infinite"),
    "missing key": (lambda a: dict(list(a.items())[1:]), "names: missing ["),
    "extra key": (lambda a: {**a, "evil.weight": torch.zeros(3)}, "unexpected ['evil.weight']"),
}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """TINY run uninterrupted: what a run restarted from round 0 must equal."""
    return run_inprocess({**TINY, "results-dir": str(tmp_path_factory.mktemp("clean") / "run")}, quiet=True)


@pytest.mark.parametrize("poison", list(POISONS))
def test_a_poisoned_checkpoint_is_set_aside_and_the_run_restarts_from_round_0(poison, clean_run, tmp_path, caplog):
    change, problem = POISONS[poison]
    folder = tmp_path / "run"
    with pytest.raises(Crash):
        run_inprocess({**TINY, "results-dir": str(folder)}, callbacks=[each_round(_crash_after_round_3)], quiet=True)
    _poison(folder, change)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_inprocess({**TINY, "results-dir": str(folder)}, quiet=True)
    assert f"damaged checkpoint {folder / CHECKPOINT}: " in caplog.text and problem in caplog.text, caplog.text
    assert "moved to checkpoint.pt.damaged, starting from round 0" in caplog.text
    assert os.path.lexists(folder / (CHECKPOINT + ".damaged")) and not (folder / CHECKPOINT).exists()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["resumed_after_round"] is None and summary["complete"] is True
    assert _rows(folder) == _rows(clean_run)  # every round evaluated a clean model, none the poisoned one
    model, clean = torch.load(folder / "model.pt"), torch.load(clean_run / "model.pt")
    assert model.keys() == clean.keys()
    assert all(model[k].dtype == clean[k].dtype and torch.equal(model[k], clean[k]) for k in model)
    assert not non_finite_keys(model)


# --- implausible and non-finite replies --------------------------------------------------------

HUGE = 3e38  # a finite float32 (max 3.4e38)
W0 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
B0 = np.array([0.5, -0.5], np.float32)
GLOBAL = ArrayRecord({"w": Array(W0), "b": Array(B0)})
SPEC = protocol.array_spec(GLOBAL)


def _metrics(pid: int) -> MetricRecord:
    return MetricRecord({"num-examples": 10, "train-loss": 1.0, "partition-id": pid, "batch-size": 4})


def _ef_reply(to: Message, scale: float, pid: int) -> Message:
    record = ArrayRecord({protocol.PACKED: Array(pack_signs(torch.ones(6))), SCALE: Array(np.array([scale], np.float32))})
    return Message(RecordDict({RECORD: record, protocol.METRICS: _metrics(pid)}), reply_to=to)


def _grads_reply(to: Message, value: float, pid: int) -> Message:
    record = ArrayRecord({"w": Array(np.full((2, 2), value, np.float32)), "b": Array(np.full(2, value, np.float32))})
    return Message(RecordDict({protocol.GRADS: record, protocol.METRICS: _metrics(pid)}), reply_to=to)


def test_an_ef_sign_scale_above_the_plausibility_bound_is_rejected_and_the_model_stays_finite(caplog):
    s = make("ef-sign", SPEC, ["w", "b"], lr=0.1)
    msgs = sent(s, GLOBAL, 2)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = s.aggregate_train(1, [_ef_reply(msgs[0], 0.5, 0), _ef_reply(msgs[1], HUGE, 1)])
    assert metrics["clients"] == 1 and metrics["rejected"] == 1 and arrays is not None
    assert not non_finite_keys({k: arrays[k].numpy() for k in arrays.keys()})
    np.testing.assert_allclose(arrays["w"].numpy(), W0 - 0.5)  # only the honest reply moved it
    bound = MAX_SCALE_RATIO * float(np.abs(np.concatenate([W0.ravel(), B0])).mean())  # mean |x| = 1.75 > 1
    lines = [r.getMessage() for r in caplog.records if "rejected the reply of node 101" in r.getMessage()]
    assert len(lines) == 1 and f"above the plausibility bound {bound:.3g}" in lines[0], caplog.text
    # just inside the bound is accepted
    inside = s.aggregate_train(2, [_ef_reply(m, bound * 0.999, pid) for pid, m in enumerate(sent(s, GLOBAL, 2, 2))])
    assert inside[1]["clients"] == 2


def test_a_non_finite_aggregate_keeps_the_model_and_names_the_largest_replies(caplog):
    """FedSGD has no plausibility bound: lr * 3e38 overflows float32, the one check every
    algorithm's new model passes catches it."""
    s = make("fedsgd", SPEC, ["w", "b"], lr=10.0)
    msgs = sent(s, GLOBAL, 3)
    # norms over 6 entries: sqrt(6) x 3e38, 0.2, 0.1
    replies = [_grads_reply(msgs[0], 0.1, 0), _grads_reply(msgs[1], HUGE, 1), _grads_reply(msgs[2], -0.2, 2)]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is None and metrics["updated"] == 0 and metrics["clients"] == 3
    assert s.failed_rounds == {1: "non-finite"}
    lines = [r.getMessage() for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("round 1: the aggregate of 3 replies"), caplog.text
    assert "largest replies by norm: node 101 (7.35e+38), node 102 (0.49), node 100 (0.245)" in lines[0]
    assert s.state_dict()["strategy"]["failed_rounds"] == {1: "non-finite"}
    again = make("fedsgd", SPEC, ["w", "b"], lr=10.0)
    again.load_state_dict(s.state_dict())
    assert again.failed_rounds == {1: "non-finite"}


# --- runs that cannot move their model ------------------------------------------------------------


def _poisoned(kind: str, pid: int, from_round: int) -> ClientApp:
    """fedsim's client, except that partition ``pid`` sends an EF scale or FedSGD gradients
    of 3e38 from round ``from_round`` on."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        reply = fedsim_client(msg, context)
        if context.node_config["partition-id"] == pid and int(msg.content["config"]["server-round"]) >= from_round:
            record = reply.content[kind]
            poisoned = {k: np.full_like(v.numpy(), HUGE) if k != protocol.PACKED else v.numpy() for k, v in record.items()}
            reply.content[kind] = ArrayRecord({k: Array(v) for k, v in poisoned.items()})
        return reply

    return app


def _run(app: ClientApp, cfg: dict, folder: Path) -> dict:
    mapping = load_config({**cfg, "results-dir": str(folder)}).to_mapping()
    run_experiment(InProcessGrid(app, cfg["num-nodes"], mapping), load_config(mapping), engine="inprocess")
    return json.loads((folder / "summary.json").read_text())


def _evaluated_finite(folder: Path) -> bool:
    model = torch.load(folder / "model.pt")
    losses = [float(r["test_loss"]) for r in _rows(folder) if r["test_loss"]]  # rows of evaluated rounds
    return bool(losses) and not non_finite_keys(model) and all(math.isfinite(v) for v in losses)


def test_an_ef_sign_run_with_a_3e38_client_stays_finite_and_complete(tmp_path, caplog):
    cfg = {"strategy": "ef-sign", "lr": 2.0, "num-server-rounds": 4, "num-nodes": 4, "seed": 2}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        summary = _run(_poisoned(RECORD, 1, 1), cfg, tmp_path / "run")
    assert summary["complete"] is True and summary["rounds_failed"] == 0 and summary["failed"] is None
    assert [int(r["clients"]) for r in _rows(tmp_path / "run")[1:]] == [3, 3, 3, 3]
    assert sum("above the plausibility bound" in r.getMessage() for r in caplog.records) == 4
    assert _evaluated_finite(tmp_path / "run")


def test_max_bad_rounds_stops_a_run_whose_model_cannot_move(tmp_path, caplog):
    """FedSGD, lr 10, one client's gradients 3e38 from round 3: every aggregate from there is
    -inf, kept out; max-bad-rounds=2 stops the run after round 4, RunFailed, summary says so."""
    cfg = {"strategy": "fedsgd", "lr": 10.0, "num-server-rounds": 10, "num-nodes": 3, "seed": 2, "max-bad-rounds": 2}
    folder = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="flwr"), pytest.raises(RunFailed) as err:
        _run(_poisoned(protocol.GRADS, 0, 3), cfg, folder)
    assert "could not move for max-bad-rounds=2 rounds in a row (rounds 3-4), so the run stopped after round 4 of 10" in str(err.value)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["complete"] is False and summary["rounds_failed"] == 2 and summary["stalled_after_round"] == 4
    assert summary["rounds"] == 4 and "max-bad-rounds=2" in summary["failed"]
    assert sum("holds NaN or infinite values" in r.getMessage() and "largest replies by norm: node 1001 (" in r.getMessage() for r in caplog.records) == 2
    assert _evaluated_finite(folder)


def test_a_run_with_some_failed_rounds_is_incomplete_and_exits_1(tmp_path, monkeypatch, capsys):
    """Through the CLI: 2 of 5 rounds non-finite (max-bad-rounds not reached) -> exit 1, one line."""
    from fedsim.engine import runner

    monkeypatch.setattr(runner, "client_app", _poisoned(protocol.GRADS, 0, 4))
    out = tmp_path / "run"
    rc, err = cli(["run", QUICK, "--set", "strategy='fedsgd'", "--set", "lr=10.0", "--set", "batch-mode=0", "--set", "num-nodes=3",
                    "--set", "num-server-rounds=5", "--results-dir", str(out)], capsys)
    lines = [line for line in err.splitlines() if line.startswith("fedsim:")]
    assert rc == 1 and len(lines) == 1, err
    assert "2 of 5 rounds kept the previous model, so the run is incomplete (0 with fewer than min-replies=1" in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and summary["rounds_failed"] == 2 and summary["stalled_after_round"] is None
    assert _evaluated_finite(out)


@pytest.mark.parametrize("value, fragment", [(0, "max-bad-rounds=0: must be an integer >= 1"), ("x", "expected int")])
def test_max_bad_rounds_is_validated(value, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config({"max-bad-rounds": value})
