"""Byzantine clients (fedsim.attacks): who attacks, what each attack sends, the config
checks, and attacked runs on the in-process engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from torch import nn

from fedsim.algorithms import REGISTRY, ClientStep
from fedsim.attacks import HONEST, Attack, attacker_ids, run_attackers
from fedsim.cli import main
from fedsim.clients.tasks import LocalData
from fedsim.config import ConfigError
from fedsim.core.signs import PACKED, pack_signs, unpack_signs
from fedsim.engine.runner import run_inprocess
from fedsim.plan import client_plan, release_plans, server_plan
from fedsim.validation import load_config

QUICK = str(Path(__file__).resolve().parents[1] / "experiments" / "quick.toml")


def test_attackers_are_k_distinct_clients_drawn_from_the_seed():
    a = attacker_ids(0, 15, 5)
    assert a == attacker_ids(0, 15, 5) and len(set(a)) == 5 and all(0 <= i < 15 for i in a) and a == sorted(a)
    assert {tuple(attacker_ids(s, 15, 5)) for s in range(10)} != {tuple(a)}
    assert attacker_ids(0, 15, 0) == [] and attacker_ids(3, 4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="attackers=5"):
        attacker_ids(0, 4, 5)


def test_server_and_clients_agree_on_the_attackers_whatever_their_counts():
    """The server plans for the nodes that connected (12 here) and a client for its node
    config's num-partitions (7): both take the attackers from the run config's num-nodes."""
    cfg = load_config({"attackers": 3, "num-nodes": 10, "seed": 4})
    try:
        server, client = server_plan(cfg, 12), client_plan(cfg, 7)
        assert server.num_partitions == 12 and client.num_partitions == 7
        assert server.attackers == client.attackers == tuple(attacker_ids(4, 10, 3))
        assert [client.attack_of(i).kind for i in range(7)] == ["sign-flip" if i in server.attackers else "none" for i in range(7)]
    finally:
        release_plans()


def test_named_attackers_replace_the_draw():
    assert run_attackers(load_config({"attacker-ids": " 7, 0,3 "})) == (0, 3, 7)
    assert run_attackers(load_config({"attacker-ids": "0,3,7", "attackers": 3})) == (0, 3, 7)
    assert run_attackers(load_config({"attackers": 2, "seed": 5})) == tuple(attacker_ids(5, 10, 2))
    assert run_attackers(load_config({})) == ()


@pytest.mark.parametrize(
    "value, fragment",
    [
        ('"0,0"', "attacker-ids='0,0': partition id 0 is given twice; give distinct partition ids in 0..9"),
        ('"0,10"', "attacker-ids='0,10': partition id 10 is not below num-nodes=10"),
        ('"1,x"', "attacker-ids='1,x': 'x' is not a partition id"),
        ('"-1"', "attacker-ids='-1': '-1' is not a partition id"),
        ("3", "run-config key 'attacker-ids': expected str, got 3"),
    ],
)
def test_bad_attacker_ids_are_one_line_exit_2(value, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["run", QUICK, "--set", f"attacker-ids={value}", "--set", 'strategy="sign-mv"'])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("fedsim: error: ") and fragment in lines[0], (rc, out, err)
    assert "Traceback" not in out + err and list(tmp_path.iterdir()) == []


def test_named_attackers_and_a_different_count_conflict():
    with pytest.raises(ConfigError, match=r"attacker-ids='0,3,7' names 3 attackers but attackers=2: set attackers = 0 \(or 3\)"):
        load_config({"attacker-ids": "0,3,7", "attackers": 2})


def test_bit_flip_inverts_every_sent_sign_and_keeps_the_padding_zero():
    g = torch.tensor([0.5, -1.0, 0.0, 2.0, -3.0, 1.0, 1.0, -1.0, 0.25, -0.5, 0.0])
    honest = {PACKED: pack_signs(g)}
    flipped = Attack("bit-flip").signs(honest, g.numel(), torch.Generator())
    assert torch.equal(unpack_signs(flipped[PACKED], g.numel()), -unpack_signs(honest[PACKED], g.numel()))
    assert flipped[PACKED][-1] & 0b00011111 == 0  # 11 signs: the last byte's 5 padding bits stay 0
    assert Attack("sign-flip").gradient(g).tolist() == (-g).tolist() and HONEST.gradient(g) is g


def test_random_signs_come_from_the_clients_stream():
    arrays = {PACKED: pack_signs(torch.ones(4000))}
    a, b = (Attack("random").signs(arrays, 4000, torch.Generator().manual_seed(7)) for _ in range(2))
    assert np.array_equal(a[PACKED], b[PACKED])
    assert abs(float(unpack_signs(a[PACKED], 4000).float().mean())) < 0.07  # 4.4 sigma


def test_scale_and_noise_change_the_update_as_stated():
    u = torch.tensor([1.0, -2.0, 0.5])
    assert Attack("scale", scale=3.0).update(u, torch.Generator()).tolist() == [-3.0, 6.0, -1.5]
    noisy = Attack("noise", noise=0.5).update(torch.zeros(20000), torch.Generator().manual_seed(1))
    assert abs(float(noisy.std()) - 0.5) < 0.02


@pytest.mark.parametrize("p", [0.1, 0.3, 0.8])
def test_stochastic_flips_each_sent_sign_with_probability_p(p):
    n = 100_003  # not a multiple of 8: the padding bits must stay 0
    g = torch.from_numpy(np.random.default_rng(0).standard_normal(n).astype(np.float32))
    honest = {PACKED: pack_signs(g)}
    a, b = (Attack("stochastic", prob=p).signs(honest, n, torch.Generator().manual_seed(3)) for _ in range(2))
    assert np.array_equal(a[PACKED], b[PACKED])  # the client's seeded stream: same seed, same flips
    flipped = unpack_signs(a[PACKED], n) != unpack_signs(honest[PACKED], n)
    assert abs(float(flipped.double().mean()) - p) < 4.5 * (p * (1 - p) / n) ** 0.5
    assert a[PACKED][-1] & 0b00011111 == 0  # 100003 = 8 * 12500 + 3: 5 padding bits


def test_stochastic_negates_each_update_coordinate_with_probability_p():
    u = torch.from_numpy(np.random.default_rng(1).uniform(0.5, 2.0, 50_000).astype(np.float32)).reshape(250, 200)
    sent = Attack("stochastic", prob=0.3).update(u, torch.Generator().manual_seed(9))
    assert sent.shape == u.shape and torch.equal(sent.abs(), u.abs())
    assert abs(float((sent < 0).double().mean()) - 0.3) < 4.5 * (0.3 * 0.7 / u.numel()) ** 0.5
    assert torch.equal(Attack("stochastic", prob=1.0).update(u, torch.Generator()), -u)


def test_gauss_replaces_the_update_by_zero_mean_noise_of_sigma():
    u = torch.full((40_000,), 5.0)
    sent = Attack("gauss", noise=2.0).update(u, torch.Generator().manual_seed(2))
    same_draw = Attack("gauss", noise=2.0).update(torch.zeros(40_000), torch.Generator().manual_seed(2))
    assert torch.equal(sent, same_draw)  # nothing of u is left
    assert abs(float(sent.mean())) < 4.5 * 2.0 / 200 and abs(float(sent.std()) - 2.0) < 0.03


def test_a_fedavg_attacker_sends_the_start_minus_c_times_its_update():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = LocalData(x=x, y=(x[:, 0] > 0).long(), indices=torch.arange(64))

    def upload(attack):
        model = nn.Linear(4, 2)
        torch.nn.init.constant_(model.weight, 0.1)
        torch.nn.init.zeros_(model.bias)
        step = ClientStep(model, data, 8, torch.Generator().manual_seed(5), ["weight", "bias"], RecordDict(), 1, attack)
        fedavg = REGISTRY["fedavg"]
        return fedavg.client_step(fedavg.hyperparams(load_config({"lr": 0.5})), step).arrays

    honest, attacked = upload(HONEST), upload(Attack("scale", scale=4.0))
    start = {"weight": np.full((2, 4), 0.1, np.float32), "bias": np.zeros(2, np.float32)}
    for key in start:
        np.testing.assert_allclose(attacked[key], start[key] - 4.0 * (honest[key] - start[key]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"strategy": "fedavg", "attackers": 2, "attack": "bit-flip"}, "attack='bit-flip' does not apply to strategy='fedavg'"),
        ({"strategy": "sign-mv", "attackers": 2, "attack": "scale"}, "attack='scale' does not apply to strategy='sign-mv'"),
        ({"attackers": 11}, "attackers=11: must be in 0..num-nodes (10)"),
        ({"attack": "flip"}, "attack='flip': choose one of"),
        ({"attack-scale": 0.0}, "attack-scale=0.0: must be a finite number > 0"),
        ({"attack-prob": 0.0}, "attack-prob=0.0: must be in (0, 1]"),
        ({"attack-prob": 1.5}, "attack-prob=1.5: must be in (0, 1]"),
        ({"strategy": "sign-mv", "attackers": 2, "attack": "gauss"}, "attack='gauss' does not apply to strategy='sign-mv'"),
        ({"zero-sign": "minus"}, "zero-sign='minus': choose one of ['plus', 'random', 'abstain']"),
    ],
)
def test_bad_attack_settings_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        load_config(values)


@pytest.mark.parametrize("zero_sign", ["plus", "random"])
def test_bit_flippers_get_the_lowest_llr_weights_and_the_summary_names_them(zero_sign, tmp_path):
    """Under ``plus`` a bit flipper's +1 for a zero coordinate arrives as -1 against every
    honest +1, so its mean weight is negative; under ``random`` (the default) the many
    coordinates where every digits client's gradient is exactly zero are coin flips for
    everyone and pull every mean weight towards 0, but the flippers stay below every honest
    client (measured: 0.05-0.20 against 0.66-0.73)."""
    out = run_inprocess(
        {"strategy": "llr-vote", "lr": 0.01, "num-server-rounds": 20, "llr-warmup": 5, "eval-every": 10,
         "attackers": 3, "attack": "bit-flip", "zero-sign": zero_sign, "results-dir": str(tmp_path / "run")},
        quiet=True,
    )
    summary = json.loads((out / "summary.json").read_text())
    attackers = summary["attackers"]
    assert attackers == attacker_ids(0, 10, 3) and summary["attack"] == "bit-flip"
    weights = {int(k): v for k, v in summary["algorithm"]["mean_llr_weight"].items()}
    assert sorted(weights) == list(range(10))
    honest = min(w for i, w in weights.items() if i not in attackers)
    assert max(weights[i] for i in attackers) < (0 if zero_sign == "plus" else honest) < honest + 1e-9 and honest > 0, weights


def test_an_honest_run_records_no_attackers(tmp_path):
    out = run_inprocess({"strategy": "sign-mv", "lr": 0.01, "num-server-rounds": 2, "results-dir": str(tmp_path / "run")}, quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["attackers"] == [] and summary["attack"] is None and summary["algorithm"] == {}


# --- the new attacks end to end (fedsim run on the embedded digits data) -------------------

SHORT = ["--set", "num-server-rounds=3", "--set", "eval-every=3", "--set", "batch-mode=0"]


def _fedsim_run(folder: Path, *settings: str, workers: int = 1) -> Path:
    """``fedsim run experiments/quick.toml`` for 3 rounds with ``settings`` (key=value); the run's folder."""
    argv = ["run", QUICK, *SHORT, *[a for s in settings for a in ("--set", s)], "--results-dir", str(folder), "--workers", str(workers)]
    assert main(argv) == 0
    return folder


@pytest.fixture(scope="module")
def honest_models(tmp_path_factory):
    """Each strategy's model after an honest run of the same settings (to tell that an attack did something)."""
    root = tmp_path_factory.mktemp("honest")
    return {s: (_fedsim_run(root / s, f'strategy="{s}"') / "model.pt").read_bytes() for s in ("sign-mv", "fedsgd")}


@pytest.mark.parametrize("strategy, attack", [("sign-mv", "stochastic"), ("fedsgd", "stochastic"), ("fedsgd", "gauss")])
def test_each_new_attack_runs_to_the_end_and_changes_the_model(strategy, attack, honest_models, tmp_path):
    out = _fedsim_run(tmp_path / "run", f'strategy="{strategy}"', "attackers=3", f'attack="{attack}"', "attack-prob=0.7")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["attack"] == attack and summary["attackers"] == attacker_ids(0, 10, 3)
    assert (out / "model.pt").read_bytes() != honest_models[strategy]
