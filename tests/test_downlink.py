"""The sign votes' 1-bit downlink (``downlink = "signs"``, fedsim.algorithms.downlink): the
same results as sending the model, bit for bit, at a fraction of the bytes down; a node
whose model does not fit the votes refuses and gets the full model next time."""

from __future__ import annotations

import csv
import logging
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from strategy_kit import each_round

from fedsim.algorithms.base import descend
from fedsim.algorithms.downlink import (
    HELD,
    HELD_ROUND,
    MODEL_DIGEST,
    VOTES,
    DownlinkMismatch,
    DownlinkServer,
    checked_votes,
    model_for_round,
    state_digest,
    vote_between,
)
from fedsim.arrays import to_array_record, to_flwr_array
from fedsim.client_app import app as client_app
from fedsim.core.signs import pack_trits, packed_size, trits_size, unpack_trits
from fedsim.engine.flower_internals import assign_message_id, client_app_error, set_server_identity
from fedsim.engine.flower_runtime import PROJECT_ROOT, LocalSuperLink, run_flower
from fedsim.engine.inprocess import FIRST_NODE_ID, InProcessGrid
from fedsim.engine.runner import run_inprocess
from fedsim.protocol import ARRAYS, BUFFERS, CONFIG, ModelSpec, array_spec
from fedsim.runtime import release_runtimes
from fedsim.server_app import run_experiment
from fedsim.validation import load_config

DIGITS_MLP_PARAMS = 4810
set_server_identity(run_id=6)  # Message(content, dst, type) reads it (the unit tests below build replies)

# 9 voters: a majority of +-1 votes never ties, so the votes travel at 1 bit per coordinate
BASE = {"num-nodes": 9, "num-server-rounds": 24, "eval-every": 5, "seed": 3, "batch-mode": 2, "lr": 0.01,
        "llr-warmup": 6, "fd-warmup": 6, "model": "digits-mlp"}
STRATEGIES = ("sign-mv", "llr-vote", "sign-fd")


def rows(folder: Path) -> list[dict[str, str]]:
    """rounds.csv without the wall-clock column."""
    with open(folder / "rounds.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def without_bytes_down(table: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "bytes_down"} for r in table]


def same_model(a: Path, b: Path) -> bool:
    x, y = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def run(tmp_path: Path, name: str, **cfg: object) -> Path:
    return run_inprocess({**BASE, **cfg, "results-dir": str(tmp_path / name)}, quiet=True, workers=1)


@pytest.mark.parametrize("fraction", [1.0, 0.3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_signs_downlink_gives_the_model_downlinks_results(strategy, fraction, tmp_path):
    model = run(tmp_path, "model", strategy=strategy, **{"fraction-train": fraction})
    signs = run(tmp_path, "signs", strategy=strategy, downlink="signs", **{"fraction-train": fraction})
    a, b = rows(model), rows(signs)
    assert without_bytes_down(a) == without_bytes_down(b)
    assert same_model(model, signs)
    down_model, down_signs = (np.array([int(r["bytes_down"]) for r in t]) for t in (a, b))
    assert down_signs[1] >= down_model[1]  # round 1: every node gets the model (and the downlink's one config key)
    assert down_signs[1:].sum() < down_model[1:].sum() / (10 if fraction == 1.0 else 2)
    if fraction == 1.0:  # from round 2 on, every node holds the last model: one vote each
        ratio = down_model[2:] / down_signs[2:]
        # 4 bytes -> 1 bit per coordinate, less the messages' headers: 23.5x on digits-mlp in a
        # round without ties; a weighted vote's rare ties add the indices of its zeros
        assert down_model[2:].sum() / down_signs[2:].sum() > 20 and ratio.min() > 15, ratio


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_resumed_signs_run_ends_where_the_model_run_ends(strategy, tmp_path):
    """A resumed server knows nothing of the nodes: the first round after the checkpoint sends
    every node the model, and the run ends bit for bit where an uninterrupted one does."""
    cfg = {"strategy": strategy, "fraction-train": 0.5}
    whole = run(tmp_path, "whole", **cfg)

    class Crash(Exception):
        pass

    def crash(row):
        if row.round == 17:
            raise Crash

    resumed = tmp_path / "resumed"
    with pytest.raises(Crash):
        run_inprocess({**BASE, **cfg, "downlink": "signs", "results-dir": str(resumed)}, callbacks=[each_round(crash)], quiet=True, workers=1)
    run_inprocess({**BASE, **cfg, "downlink": "signs", "results-dir": str(resumed)}, quiet=True, workers=1)
    a, b = rows(whole), rows(resumed)
    assert without_bytes_down(a) == without_bytes_down(b)
    assert same_model(whole, resumed)
    per_node = {r["round"]: int(r["bytes_down"]) / 5 for r in b}  # 5 of 9 nodes per round
    model_message = int(a[16]["bytes_down"]) / 5
    assert per_node["16"] >= model_message  # the checkpoint was after round 15: round 16 sends the model
    assert per_node["17"] < model_message  # ... and round 17 catches up the nodes of round 16


BN_NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x.flatten(1)))))
"""


def test_a_model_with_batchnorm_gets_its_buffers_beside_the_votes(tmp_path, monkeypatch):
    """BatchNorm's running statistics (which the server averages) and its integer counter
    cannot come from signs: they travel in full, and the results stay bit for bit the same."""
    (tmp_path / "bnnet.py").write_text(BN_NET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "bnnet", raising=False)
    cfg = {"strategy": "llr-vote", "model": "bnnet:Net", "num-server-rounds": 8, "fraction-train": 0.6}
    model = run(tmp_path, "model", **cfg)
    signs = run(tmp_path, "signs", downlink="signs", **cfg)
    assert without_bytes_down(rows(model)) == without_bytes_down(rows(signs))
    assert same_model(model, signs)
    state = torch.load(signs / "model.pt")
    assert not torch.equal(state["bn.running_mean"], torch.zeros(32))  # averaged from the clients' replies
    down = [int(r["bytes_down"]) for r in rows(signs)]
    buffers = sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith("bn.") and "running" in k)
    assert min(down[2:]) > buffers and sum(down[2:]) < sum(int(r["bytes_down"]) for r in rows(model)[2:]) / 2


class Forgetful:
    """fedsim's ClientApp, but node ``node`` loses its state (a restarted device) before round ``at``."""

    def __init__(self, node: int, at: int) -> None:
        self.node, self.at = node, at
        self.full: dict[int, list[int]] = {}  # round -> the nodes sent the model in it

    def __call__(self, msg: Message, context: Context) -> Message:
        rnd = int(msg.content[CONFIG]["server-round"])
        if ARRAYS in msg.content:
            self.full.setdefault(rnd, []).append(context.node_id)
        if context.node_id == self.node and rnd == self.at:
            for key in list(context.state.keys()):
                del context.state[key]
        return client_app(msg, context)


def test_a_node_that_lost_its_model_refuses_and_gets_the_model_next_round(tmp_path, caplog):
    cfg = load_config({**BASE, "strategy": "sign-mv", "num-server-rounds": 8, "downlink": "signs", "results-dir": str(tmp_path / "r")})
    app = Forgetful(FIRST_NODE_ID + 4, 5)
    grid = InProcessGrid(app, cfg.num_nodes, cfg.to_mapping())
    try:
        with caplog.at_level(logging.WARNING, logger="flwr"):
            run_experiment(grid, cfg, engine="inprocess")
    finally:
        grid.close()
        release_runtimes()
    table = rows(tmp_path / "r")
    assert [int(r["rejected"]) for r in table[1:]] == [0, 0, 0, 0, 1, 0, 0, 0]
    assert [int(r["clients"]) for r in table[1:]] == [9, 9, 9, 9, 8, 9, 9, 9]
    refused = [r.getMessage() for r in caplog.records if "rejected the reply of node 1005" in r.getMessage()]
    assert len(refused) == 1 and "round 5:" in refused[0] and "holds no model (a new or restarted device)" in refused[0], refused
    assert "\n" not in refused[0]
    # round 1: every node gets the model; round 6: node 1005 again, after its refusal; else votes
    assert app.full == {1: list(range(FIRST_NODE_ID, FIRST_NODE_ID + 9)), 6: [FIRST_NODE_ID + 4]}
    down = [int(r["bytes_down"]) for r in table]
    assert down[6] > down[7] + 0.8 * down[1] / 9  # bytes-down counts the model sent to it


class Slow(Forgetful):
    """fedsim's ClientApp, but node ``node`` blocks in round ``at`` until ``release`` is set."""

    def __init__(self, node: int, at: int) -> None:
        super().__init__(node, at)
        self.release = threading.Event()

    def __call__(self, msg: Message, context: Context) -> Message:
        rnd = int(msg.content[CONFIG]["server-round"])
        if ARRAYS in msg.content:
            self.full.setdefault(rnd, []).append(context.node_id)
        if context.node_id == self.node and rnd == self.at:
            self.release.wait(60)
        return client_app(msg, context)


def test_a_node_whose_reply_never_came_gets_the_model_next_round(tmp_path):
    """The round-timeout drops a late reply and the node's state change (in-process engine):
    the server cannot know what the node holds, so it sends it the full model next time."""
    cfg = load_config({**BASE, "strategy": "sign-mv", "num-server-rounds": 5, "downlink": "signs", "round-timeout": 5.0,
                       "results-dir": str(tmp_path / "r")})
    app = Slow(FIRST_NODE_ID + 2, 3)
    grid = InProcessGrid(app, cfg.num_nodes, cfg.to_mapping())
    try:
        run_experiment(grid, cfg, engine="inprocess")
    finally:
        app.release.set()
        grid.close()
        release_runtimes()
    table = rows(tmp_path / "r")
    assert [int(r["clients"]) for r in table[1:]] == [9, 9, 8, 9, 9]
    assert all(int(r["rejected"]) == 0 for r in table)
    assert app.full == {1: list(range(FIRST_NODE_ID, FIRST_NODE_ID + 9)), 4: [FIRST_NODE_ID + 2]}


# --- the two halves, message by message ---------------------------------------------------------


def _model(seed: int = 0) -> tuple[ArrayRecord, ModelSpec]:
    g = torch.Generator().manual_seed(seed)
    state = {"w": torch.randn(50, 40, generator=g), "b": torch.randn(50, generator=g), "bn.mean": torch.randn(5, generator=g),
             "bn.count": torch.tensor(3)}
    arrays = to_array_record({k: v.numpy() for k, v in state.items()})
    return arrays, ModelSpec.of(array_spec(arrays), ["w", "b"])


def _next(arrays: ArrayRecord, spec: ModelSpec, seed: int, lr: float = 0.01) -> ArrayRecord:
    """The sign-vote server's next model: descend by a vote with ties, new float buffers."""
    u = torch.randint(-1, 2, (spec.num_params,), generator=torch.Generator().manual_seed(seed)).to(torch.int8)
    new = descend(arrays, spec.param_keys, u, lr)
    new["bn.mean"] = to_flwr_array(np.full(5, float(seed), np.float32))
    return new


def _reply(node: int, error: bool = False) -> Message:
    msg = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    assign_message_id(msg, f"m{node}")
    return Message(client_app_error("downlink") if error else RecordDict(), reply_to=msg)  # from node


def test_votes_rebuild_the_servers_model_bit_for_bit_and_missed_rounds_are_caught_up():
    x0, spec = _model()
    server = DownlinkServer(spec, lr=0.01)
    states = {1: RecordDict(), 2: RecordDict()}
    models = [x0]
    for rnd in range(1, 6):
        msgs = server.messages(rnd, models[-1], ConfigRecord({"server-round": rnd}), [1, 2] if rnd != 3 else [1])
        for node, content in msgs.items():
            got = model_for_round(content, states[node], rnd, spec.param_keys, 0.01)
            assert state_digest(got) == state_digest(models[-1])
            assert (ARRAYS in content) == (rnd == 1)  # node 2 missed round 3 and is caught up in round 4
        if rnd == 4:
            assert sorted({k.split("/")[0] for k in msgs[2][VOTES].keys()}) == ["2", "3"]
            assert BUFFERS in msgs[2]  # the model's other entries travel in full beside the votes
        server.settle([_reply(n) for n in msgs])
        models.append(_next(models[-1], spec, rnd))
    assert server.held == {1: 4, 2: 4}


def test_a_stale_wrong_or_missing_model_is_refused_and_the_node_gets_the_model_next_time():
    x0, spec = _model()
    server = DownlinkServer(spec, lr=0.01)
    state = RecordDict()
    first = server.messages(1, x0, ConfigRecord({"server-round": 1}), [7])[7]
    model_for_round(first, state, 1, spec.param_keys, 0.01)
    server.settle([_reply(7)])
    x1 = _next(x0, spec, 1)
    votes = server.messages(2, x1, ConfigRecord({"server-round": 2}), [7])[7]
    assert ARRAYS not in votes
    with pytest.raises(DownlinkMismatch, match="holds no model"):
        model_for_round(votes, RecordDict(), 2, spec.param_keys, 0.01)
    stale = RecordDict({**state})
    stale[HELD_ROUND] = ConfigRecord({"round": 3})
    with pytest.raises(DownlinkMismatch, match="holds the model of round 3"):
        model_for_round(votes, stale, 2, spec.param_keys, 0.01)
    wrong = RecordDict({**state})
    wrong[HELD] = _next(x0, spec, 99)  # a device whose model is not the server's
    with pytest.raises(DownlinkMismatch, match="digest"):
        model_for_round(votes, wrong, 2, spec.param_keys, 0.01)
    bad = RecordDict({**votes})
    bad[CONFIG] = ConfigRecord({**votes[CONFIG], MODEL_DIGEST: "0" * 16})
    with pytest.raises(DownlinkMismatch, match="digest"):
        model_for_round(bad, RecordDict({**state}), 2, spec.param_keys, 0.01)
    server.settle([_reply(7, error=True)])
    assert 7 not in server.held
    again = server.messages(3, _next(x1, spec, 2), ConfigRecord({"server-round": 3}), [7])[7]
    assert ARRAYS in again  # the full model after a refusal


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ({"1/packed": np.zeros(packed_size(40), np.uint8)}, "ROUND/packed"),  # round 1 is not after the base, round 1
        ({"2/packed": np.zeros(3, np.uint8)}, "not the code of 40 signs"),
        ({"2/packed": np.zeros(packed_size(40), np.int8)}, "not the code of 40 signs"),
        ({"2/zeros": np.zeros(1, np.uint32)}, "expected 'packed'"),
        ({"2/signs": np.zeros(packed_size(40), np.uint8)}, "ROUND/packed"),
        ({"2/packed": np.zeros(packed_size(40), np.uint8), "2/zeros": np.array([5, 3], np.uint32)}, "strictly increasing"),
        ({"2/trits": np.full(8, 243, np.uint8)}, "not 5 base-3 digits"),
        ({"2/trits": np.zeros(9, np.uint8)}, "not the code of 40 signs"),
        ({"2/trits": np.zeros(8, np.uint8), "2/packed": np.zeros(packed_size(40), np.uint8)}, "'trits' alone"),
    ],
)
def test_a_malformed_votes_record_is_a_clear_error(arrays, fragment):
    with pytest.raises(ValueError, match=fragment):
        checked_votes(to_array_record(arrays), 1, 2, 40)


def test_the_vote_between_two_models_is_none_where_no_sign_step_joins_them():
    x0, spec = _model()
    x1 = _next(x0, spec, 1)
    u = vote_between(x0, x1, spec.param_keys, 0.01)
    assert u is not None and set(u.tolist()) <= {-1, 0, 1}
    assert vote_between(x0, x1, spec.param_keys, 0.02) is None  # another step size
    assert vote_between(x0, _model(seed=1)[0], spec.param_keys, 0.01) is None  # unrelated models


@pytest.mark.flower
def test_the_signs_downlink_on_flowers_runtime_gives_the_in_process_rounds(tmp_path, flwr_home):
    """Flower's simulation runtime keeps each node's context.state across rounds, as a
    deployment's SuperNode does: the nodes rebuild the model from the votes there too. (Full
    participation: Flower's node ids are random, so a sample of them is other partitions.)"""
    cfg = {**BASE, "strategy": "llr-vote", "num-server-rounds": 6, "eval-every": 2, "downlink": "signs"}
    flower = run_flower({**cfg, "results-dir": str(tmp_path / "flower")}, flwr_home=flwr_home, echo=False)
    inproc = run(tmp_path, "inprocess", **cfg)
    a, b = rows(flower), rows(inproc)
    assert a == b
    assert all(int(r["rejected"]) == 0 for r in a)
    down = [int(r["bytes_down"]) for r in a]  # round 1: the model to each node, as in every round of "model"
    assert max(down[2:]) < down[1] / 20  # later: one vote each


@pytest.mark.flower
def test_the_signs_downlink_in_a_deployment_gives_the_in_process_rounds(tmp_path):
    """A deployment's SuperNode starts a fresh ClientApp process per message and keeps the
    node's context.state between them: the nodes rebuild the model from the votes."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    cfg = {"strategy": "sign-mv", "lr": 0.01, "num-server-rounds": 3, "num-nodes": 2, "seed": 0, "downlink": "signs"}
    results = tmp_path / "deployed"
    with LocalSuperLink(home, simulation=False) as link:
        for pid in range(2):
            link.start_supernode(f"supernode-{pid}", f"partition-id={pid} num-partitions=2")
        run_config = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in cfg.items())
        out = link.flwr("run", str(PROJECT_ROOT), link.connection, "--stream", "--run-config", f"{run_config} results-dir='{results}'", timeout=420)
    left = link.stragglers + link.leftovers()
    text = out.stdout + out.stderr
    (home / "flwr-run.log").write_text(text)
    assert out.returncode == 0 and not left, (left, text[-3000:])
    inproc = run_inprocess({**cfg, "results-dir": str(tmp_path / "inprocess")}, quiet=True, workers=1)
    a, b = rows(results), rows(inproc)
    assert a == b, text[-3000:]
    assert all(int(r["rejected"]) == 0 for r in a[1:])
    down = [int(r["bytes_down"]) for r in a]
    assert max(down[2:]) < down[1] / 8  # votes after round 1 (2 voters tie often: the ternary code's 2 bits)


def _votes_message() -> tuple[RecordDict, RecordDict, ModelSpec, ArrayRecord]:
    """(a round-2 votes message, the state of the node it is for, the model spec, its model)."""
    x0, spec = _model()
    server, state = DownlinkServer(spec, lr=0.01), RecordDict()
    model_for_round(server.messages(1, x0, ConfigRecord({"server-round": 1}), [7])[7], state, 1, spec.param_keys, 0.01)
    server.settle([_reply(7)])
    x1 = _next(x0, spec, 1)
    return server.messages(2, x1, ConfigRecord({"server-round": 2}), [7])[7], state, spec, x1


def _without_buffers(m: RecordDict) -> None:
    del m[BUFFERS]


def _short_buffer(m: RecordDict) -> None:
    m[BUFFERS] = to_array_record({"bn.mean": np.zeros(4, np.float32), "bn.count": np.array(3)})


def _nan_buffer(m: RecordDict) -> None:
    m[BUFFERS] = to_array_record({"bn.mean": np.full(5, np.nan, np.float32), "bn.count": np.array(3)})


def _no_base_round(m: RecordDict) -> None:
    m[CONFIG] = ConfigRecord({k: v for k, v in m[CONFIG].items() if k != "base-round"})


def _bool_base_round(m: RecordDict) -> None:
    m[CONFIG] = ConfigRecord({**m[CONFIG], "base-round": True})


def _unknown_mode(m: RecordDict) -> None:
    m[CONFIG] = ConfigRecord({**m[CONFIG], "downlink": "gossip"})


def _no_votes(m: RecordDict) -> None:
    del m[VOTES]


@pytest.mark.parametrize(
    "spoil, fragment",
    [
        (_without_buffers, "must hold the model's entries"),
        (_short_buffer, "has dtype float32 and shape (4,)"),
        (_nan_buffer, "expected finite"),
        (_no_base_round, "needs an integer 'base-round'"),
        (_bool_base_round, "needs an integer 'base-round'"),
        (_unknown_mode, "'gossip'"),
        (_no_votes, "carries neither"),
    ],
)
def test_a_malformed_votes_message_is_refused_with_one_line_and_the_node_keeps_its_model(spoil, fragment):
    message, state, spec, x1 = _votes_message()
    held = state[HELD]
    spoil(message)
    with pytest.raises(ValueError, match=re.escape(fragment)) as err:
        model_for_round(message, state, 2, spec.param_keys, 0.01)
    assert "\n" not in str(err.value)
    assert state[HELD] is held  # nothing kept from a message it refused
    message, state, spec, x1 = _votes_message()
    assert state_digest(model_for_round(message, state, 2, spec.param_keys, 0.01)) == state_digest(x1)  # unspoilt: fine


@pytest.mark.parametrize("n", [1, 4, 5, 6, 4810])
def test_the_base_3_code_round_trips_and_takes_ceil_n_over_5_bytes(n):
    g = torch.Generator().manual_seed(n)
    t = torch.randint(-1, 2, (n,), generator=g).to(torch.float32) * torch.rand(n, generator=g)
    packed = pack_trits(t)
    assert packed.dtype == np.uint8 and packed.shape == (trits_size(n),) == ((n + 4) // 5,)
    assert torch.equal(unpack_trits(packed, n), torch.sign(t).to(torch.int8))
    with pytest.raises(ValueError, match="NaN"):
        pack_trits(torch.full((n,), float("nan")))


def test_a_tie_heavy_vote_travels_in_base_3(tmp_path):
    """sign-mv with 10 voters ties on many coordinates: the vote goes at 1.6 bits per
    coordinate (5 per byte) instead of the ternary code's 2; results as with the model."""
    cfg = {"strategy": "sign-mv", "num-nodes": 10, "num-server-rounds": 6, "zero-sign": "plus"}
    model = run(tmp_path, "model", **cfg)
    signs = run(tmp_path, "signs", downlink="signs", **cfg)
    assert without_bytes_down(rows(model)) == without_bytes_down(rows(signs)) and same_model(model, signs)
    per_message = [int(r["bytes_down"]) / 10 for r in rows(signs)[2:]]
    trits = trits_size(DIGITS_MLP_PARAMS) + 128  # the base-3 bytes and their .npy header
    assert all(trits < b < trits + 200 for b in per_message), per_message  # + the key and the config
    ratio = int(rows(model)[2]["bytes_down"]) / int(rows(signs)[2]["bytes_down"])
    assert ratio > 15, ratio  # 12.5x with the ternary code's 2 bits
