"""Byzantine-robust aggregators (issue #24, item 1): each rule against Flower's own legacy
functions, their properties (client order, bounded influence, translation), and the
run-config keys through FedSGD and FedAvg, the checks before a run and in a round."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_kit import cli
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.server.strategy.aggregate import aggregate, aggregate_bulyan, aggregate_krum, aggregate_median, aggregate_trimmed_avg
from hypothesis import given, settings
from hypothesis import strategies as st
from strategy_kit import make, sent

from fedsim import protocol
from fedsim.aggregators import AGGREGATORS, Settings
from fedsim.aggregators.krum import krum_scores, squared_distances
from fedsim.algorithms import REGISTRY
from fedsim.config import ConfigError
from fedsim.core.aggregate import weighted_mean
from fedsim.engine.flower_internals import set_server_identity
from fedsim.results import RoundRow
from fedsim.server_app import failure
from fedsim.strategies.base import NON_FINITE, TOO_FEW_FOR_RULE
from fedsim.validation import load_config

set_server_identity(run_id=24)

QUICK = str(Path(__file__).resolve().parents[1] / "experiments" / "quick.toml")

ROBUST = ("median", "trimmed-mean", "krum", "multi-krum", "bulyan")


def clients(seed: int, n: int, d: int, outliers: int = 0, scale: float = 1e6) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """n client vectors of d coordinates (standard normal), ``outliers`` of them (at random
    rows) replaced by values of magnitude ~``scale``; their weights (num-examples); the
    outlier rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    bad = sorted(rng.choice(n, size=outliers, replace=False).tolist()) if outliers else []
    x[bad] = scale * (1 + rng.random((len(bad), d))) * rng.choice([-1.0, 1.0], size=(len(bad), d))
    weights = rng.integers(1, 100, size=n).astype(np.float64)
    return x, weights, bad


def ours(name: str, x: np.ndarray, w: np.ndarray, **kw: float) -> np.ndarray:
    out = AGGREGATORS[name].apply(torch.from_numpy(x), w.tolist(), Settings(**kw))
    assert out.dtype == torch.float64 and out.shape == (x.shape[1],)
    return out.numpy()


def flower_results(x: np.ndarray, w: np.ndarray, layers: int = 2) -> list[tuple[list[np.ndarray], int]]:
    """Flower's input: per client its arrays (x split into ``layers`` arrays) and num-examples,
    the clients in lexicographic order of their vectors: Flower breaks an exact tie of Krum
    scores by list position, fedsim by the vectors' values, and so they then agree."""
    order = sorted(range(len(x)), key=lambda i: (x[i].tolist(), w[i]))
    return [(np.array_split(x[i], layers), int(w[i])) for i in order]


def flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.reshape(-1) for a in arrays])


# --- agreement with Flower's legacy aggregate functions ------------------------------------

CASES = [(seed, n, f, outliers) for seed, (n, f) in enumerate([(7, 1), (8, 1), (11, 2), (12, 2), (15, 3)]) for outliers in (0, f)]


@pytest.mark.parametrize("seed, n, f, outliers", CASES)
def test_mean_median_and_trimmed_mean_agree_with_flower(seed, n, f, outliers):
    x, w, _ = clients(seed, n, 9, outliers)
    np.testing.assert_allclose(ours("mean", x, w), flat(aggregate(flower_results(x, w))), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(ours("median", x, w), flat(aggregate_median(flower_results(x, w))), rtol=1e-12, atol=0)
    for beta in (0.0, 0.1, 0.2, 0.3, 0.49):
        np.testing.assert_allclose(
            ours("trimmed-mean", x, w, trim_fraction=beta), flat(aggregate_trimmed_avg(flower_results(x, w), beta)), rtol=1e-9, atol=1e-9,
        )


@pytest.mark.parametrize("seed, n, f, outliers", CASES)
def test_krum_and_multi_krum_agree_with_flower(seed, n, f, outliers):
    x, w, bad = clients(seed, n, 9, outliers)
    picked = ours("krum", x, w, byzantine_f=f)
    assert np.array_equal(picked, flat(aggregate_krum(flower_results(x, w), f, to_keep=0)))  # the very client Flower picks
    assert any(np.array_equal(picked, x[i]) for i in range(n) if i not in bad)
    for m in (1, 2, n - f, n):
        np.testing.assert_allclose(
            ours("multi-krum", x, w, byzantine_f=f, krum_m=m), flat(aggregate_krum(flower_results(x, w), f, to_keep=m)), rtol=1e-12, atol=1e-9,
        )
    np.testing.assert_allclose(ours("multi-krum", x, w, byzantine_f=f), ours("multi-krum", x, w, byzantine_f=f, krum_m=n - f))


@pytest.mark.parametrize("seed, n, f, outliers", [(s, n, f, o) for s, (n, f) in enumerate([(3, 0), (7, 1), (8, 1), (11, 2), (12, 2), (15, 3)]) for o in (0, f)])
def test_bulyan_agrees_with_flower(seed, n, f, outliers):
    x, w, _ = clients(100 + seed, n, 9, outliers)
    expected = flat(aggregate_bulyan(flower_results(x, w), f, aggregate_krum, to_keep=0))
    np.testing.assert_allclose(ours("bulyan", x, w, byzantine_f=f), expected, rtol=1e-12, atol=1e-9)


def test_krum_scores_sum_the_n_minus_f_minus_2_nearest_squared_distances():
    x, _, _ = clients(5, 8, 4)
    d = np.array([[np.sum((a - b) ** 2) for b in x] for a in x])
    k = 8 - 1 - 2
    expected = [np.sort(np.delete(d[i], i))[:k].sum() for i in range(8)]
    np.testing.assert_allclose(krum_scores(squared_distances(torch.from_numpy(x)), 1).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("n, d, cache", [(1, 5, 64), (2, 3, 64), (7, 1000, 64), (15, 5000, 262_144)])
def test_squared_distances_over_many_coordinate_blocks_are_the_pairwise_differences(monkeypatch, n, d, cache):
    import fedsim.aggregators.krum as krum_module

    monkeypatch.setattr(krum_module, "DISTANCE_CACHE", cache)  # 64: 16 coordinates per block, many blocks
    x = np.random.default_rng(n + d).standard_normal((n, d)) * np.logspace(-3, 3, d)
    got = squared_distances(torch.from_numpy(x))
    expected = np.array([[np.sum((a - b) ** 2) for b in x] for a in x])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert torch.equal(got, got.T) and not got.diagonal().any()
    x[1 % n] = x[0]  # identical clients are exactly 0 apart and exactly as far from every other
    got = squared_distances(torch.from_numpy(x)).numpy()
    if n > 1:
        assert got[0, 1] == 0 and np.array_equal(got[0, 2:], got[1, 2:])


def test_weights_count_only_for_the_mean_and_multi_krum():
    x, w, _ = clients(9, 9, 5)
    for name, a in AGGREGATORS.items():
        kw = {"byzantine_f": 1, "krum_m": 4}
        same = np.allclose(ours(name, x, w, **kw), ours(name, x, np.ones_like(w), **kw))
        assert same != a.weighted, name


def test_float32_input_comes_back_float32_and_too_few_clients_raise():
    x = torch.randn(5, 3)
    for name in AGGREGATORS:
        assert AGGREGATORS[name].apply(x, [1.0] * 5, Settings(byzantine_f=0)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"needs n > 2f \+ 2"):
        AGGREGATORS["krum"].apply(x[:4], [1.0] * 4, Settings(byzantine_f=1))
    with pytest.raises(ValueError, match=r"needs n >= 4f \+ 3"):
        AGGREGATORS["bulyan"].apply(x, [1.0] * 5, Settings(byzantine_f=1))


# --- properties ------------------------------------------------------------------------------

def _settings_for(name: str, n: int, f: int) -> Settings:
    return Settings(trim_fraction=min(0.49, (f + 0.5) / n), byzantine_f=f, krum_m=0)


sizes = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 3), st.integers(1, 6)).map(
    lambda t: (t[0], 4 * t[1] + 3 + t[0] % 3, t[1], t[2])  # seed, n >= 4f + 3, f, d
)


@settings(max_examples=60, deadline=None)
@given(sizes, st.sampled_from((*ROBUST, "mean")))
def test_every_rule_ignores_the_order_of_the_clients(case, name):
    seed, n, f, d = case
    x, w, _ = clients(seed, n, d)
    perm = np.random.default_rng(seed + 1).permutation(n)
    s = _settings_for(name, n, f)
    np.testing.assert_allclose(ours(name, x[perm], w[perm], **vars(s)), ours(name, x, w, **vars(s)), rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(sizes, st.sampled_from((*ROBUST, "mean")), st.floats(-1e3, 1e3))
def test_every_rule_is_translation_equivariant(case, name, c):
    seed, n, f, d = case
    x, w, _ = clients(seed, n, d)
    shift = c * np.random.default_rng(seed + 2).standard_normal(d)
    s = _settings_for(name, n, f)
    np.testing.assert_allclose(ours(name, x + shift, w, **vars(s)), ours(name, x, w, **vars(s)) + shift, rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(sizes, st.sampled_from(ROBUST), st.booleans())
def test_f_huge_outliers_cannot_pull_a_robust_rule_out_of_the_honest_range(case, name, clustered):
    seed, n, f, d = case
    x, w, bad = clients(seed, n, d, outliers=f)
    if clustered and bad:  # the attackers agree with each other: one point, so their distances are 0
        x[bad] = x[bad[0]]
    honest = np.delete(x, bad, axis=0)
    out = ours(name, x, w, **vars(_settings_for(name, n, f)))
    assert np.all(out >= honest.min(axis=0) - 1e-9) and np.all(out <= honest.max(axis=0) + 1e-9)
    if name == "krum":
        assert any(np.array_equal(out, h) for h in honest)


def test_the_mean_is_not_robust_which_the_bounded_influence_test_would_catch():
    x, w, bad = clients(3, 7, 4, outliers=1)
    honest = np.delete(x, bad, axis=0)
    out = ours("mean", x, w)
    assert np.any(out < honest.min(axis=0)) or np.any(out > honest.max(axis=0))


def test_an_exact_tie_of_krum_scores_goes_to_the_smaller_vector_whatever_the_order():
    x = np.array([[0.0], [1.0], [5.0]])  # f = 0, k = 1: rows 0 and 1 are each other's nearest, both score 1
    for perm in ([0, 1, 2], [1, 0, 2], [2, 1, 0]):
        assert ours("krum", x[perm], np.ones(3), byzantine_f=0).tolist() == [0.0]
    assert flat(aggregate_krum([([np.array([1.0])], 1), ([np.array([0.0])], 1), ([np.array([5.0])], 1)], 0, 0)).tolist() == [1.0]  # Flower: list order


# --- through FedSGD and FedAvg ---------------------------------------------------------------

W0 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
B0 = np.array([0.5, -0.5], np.float32)
GLOBAL = ArrayRecord({"w": Array(W0), "b": Array(B0), "steps": Array(np.array(4, np.int64))})
SPEC = protocol.array_spec(GLOBAL)
PARAMS = ["w", "b"]


def reply(to: Message, record: str, arrays: dict[str, np.ndarray], n: int, pid: int) -> Message:
    metrics = MetricRecord({"num-examples": n, "train-loss": 1.0, "partition-id": pid, "batch-size": 4})
    return Message(RecordDict({record: ArrayRecord({k: Array(v) for k, v in arrays.items()}), protocol.METRICS: metrics}), reply_to=to)


def grads_round(strategy, grads: list[dict[str, np.ndarray]], ns: list[int]) -> tuple[ArrayRecord | None, Any]:
    msgs = sent(strategy, GLOBAL, len(grads))
    return strategy.aggregate_train(1, [reply(m, protocol.GRADS, g, n, pid) for pid, (m, g, n) in enumerate(zip(msgs, grads, ns, strict=True))])


def random_grads(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"w": rng.standard_normal((2, 2)).astype(np.float32), "b": rng.standard_normal(2).astype(np.float32)} for _ in range(n)]


def test_fedsgd_with_the_median_steps_by_the_median_gradient():
    grads = random_grads(1, 6)
    grads[2] = {"w": np.full((2, 2), 1e30, np.float32), "b": np.full(2, -1e30, np.float32)}  # one attacker
    arrays, metrics = grads_round(make("fedsgd", SPEC, PARAMS, lr=0.5, aggregator="median"), grads, [10, 20, 30, 40, 50, 60])
    assert arrays is not None and metrics["updated"] == 1
    for key, start in (("w", W0), ("b", B0)):
        expected = start - np.float32(0.5) * np.median(np.stack([g[key] for g in grads]).astype(np.float64), axis=0).astype(np.float32)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert arrays["steps"].numpy() == 4  # not a trainable entry: untouched


def test_fedavg_with_krum_takes_one_honest_clients_whole_model_and_mean_is_the_old_rule_bit_for_bit():
    rng = np.random.default_rng(2)
    models = [{"w": rng.standard_normal((2, 2)).astype(np.float32), "b": rng.standard_normal(2).astype(np.float32),
               "steps": np.array(5 + i, np.int64)} for i in range(6)]
    models[4] = {"w": np.full((2, 2), 1e6, np.float32), "b": np.full(2, 1e6, np.float32), "steps": np.array(0, np.int64)}
    ns = [10, 20, 30, 40, 50, 60]

    def run(**options: Any) -> ArrayRecord:
        s = make("fedavg", SPEC, PARAMS, lr=0.1, **options)
        msgs = sent(s, GLOBAL, 6)
        arrays, _ = s.aggregate_train(1, [reply(m, protocol.ARRAYS, a, n, pid) for pid, (m, a, n) in enumerate(zip(msgs, models, ns, strict=True))])
        assert arrays is not None
        return arrays

    picked = run(aggregator="krum", byzantine_f=1)
    assert sum(all(np.array_equal(picked[k].numpy(), m[k]) for k in m) for i, m in enumerate(models) if i != 4) == 1
    mean = run()
    for key in ("w", "b", "steps"):  # the rule before the aggregator existed
        old = weighted_mean([torch.from_numpy(m[key].astype(np.float64)) for m in models], ns)
        old = old.round() if key == "steps" else old
        assert np.array_equal(mean[key].numpy(), old.numpy().astype(models[0][key].dtype))


@pytest.mark.parametrize("options, n, line", [
    ({"aggregator": "bulyan", "byzantine_f": 1}, 6, "aggregator='bulyan' with byzantine-f=1 needs n >= 4f + 3 (n >= 7) and has n = 6"),
    ({"aggregator": "multi-krum", "byzantine_f": 0, "krum_m": 6}, 5,
     "aggregator='multi-krum' with byzantine-f=0, krum-m=6 needs n > 2f + 2 and n >= krum-m (n >= 6) and has n = 5"),
])
def test_too_few_replies_for_bulyan_or_for_krum_m_keep_the_model(options, n, line, caplog):
    s = make("fedsgd", SPEC, PARAMS, lr=0.5, **options)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, _ = grads_round(s, random_grads(5, n), [10] * n)
    assert arrays is None and s.failed_rounds == {1: TOO_FEW_FOR_RULE}
    assert f"round 1: {n} valid replies: {line}; the global model is unchanged" in caplog.text
    arrays, _ = grads_round(s, random_grads(6, n + 1), [10] * (n + 1))
    assert arrays is not None


def test_a_round_with_too_few_valid_replies_for_krum_keeps_the_model_and_logs_one_line(caplog):
    s = make("fedsgd", SPEC, PARAMS, lr=0.5, aggregator="krum", byzantine_f=1)
    grads = random_grads(3, 5)
    grads[1]["w"][0, 0] = np.nan  # rejected: 4 valid replies, Krum with f = 1 needs 5
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = grads_round(s, grads, [10] * 5)
    assert arrays is None and metrics["updated"] == 0 and metrics["clients"] == 4 and metrics["rejected"] == 1
    assert s.failed_rounds == {1: TOO_FEW_FOR_RULE}
    lines = [r.getMessage() for r in caplog.records if "valid replies" in r.getMessage()]
    assert lines == ["round 1: 4 valid replies: aggregator='krum' with byzantine-f=1 needs n > 2f + 2 (n >= 5) and has n = 4; "
                     "the global model is unchanged"]
    arrays, _ = grads_round(s, random_grads(4, 5), [10] * 5)  # five valid replies: it moves again
    assert arrays is not None


# --- the checks before a run -----------------------------------------------------------------

BAD_OPTIONS = [
    ({"aggregator": "geomed"}, "aggregator='geomed': choose one of ['mean', 'median', 'trimmed-mean', 'krum', 'multi-krum', 'bulyan']"),
    ({"trim-fraction": 0.5}, "trim-fraction=0.5: must be a number in [0, 0.5)"),
    ({"byzantine-f": -1}, "byzantine-f=-1: must be an integer >= 0"),
    ({"krum-m": -2}, "krum-m=-2: must be an integer >= 0"),
    ({"aggregator": "krum", "byzantine-f": 4},
     "byzantine-f=4: aggregator='krum' needs n > 2f + 2 (n >= 11), but only 10 clients are sampled per round (num-nodes=10, "
     "fraction-train=1.0); sample at least 11 clients per round or lower byzantine-f to 3"),
    ({"aggregator": "bulyan", "byzantine-f": 1, "fraction-train": 0.5},
     "byzantine-f=1: aggregator='bulyan' needs n >= 4f + 3 (n >= 7), but only 5 clients are sampled per round (num-nodes=10, "
     "fraction-train=0.5); sample at least 7 clients per round or lower byzantine-f to 0"),
    ({"aggregator": "multi-krum", "krum-m": 11}, "krum-m=11: aggregator='multi-krum' needs n >= krum-m, but only 10 clients"),
    ({"strategy": "sign-mv", "aggregator": "median"}, "aggregator='median' does not apply to strategy='sign-mv': it applies to ['fedsgd', 'fedavg']"),
]


@pytest.mark.parametrize("values, fragment", BAD_OPTIONS)
def test_bad_aggregator_settings_are_config_errors(values, fragment):
    with pytest.raises(ConfigError) as err:
        load_config({"strategy": "fedsgd", "num-nodes": 10, **values})
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_the_conditions_at_their_bounds_are_accepted():
    for strategy in ("fedsgd", "fedavg"):
        load_config({"strategy": strategy, "num-nodes": 5, "aggregator": "krum", "byzantine-f": 1})
        load_config({"strategy": strategy, "num-nodes": 7, "aggregator": "bulyan", "byzantine-f": 1})
        load_config({"strategy": strategy, "num-nodes": 7, "aggregator": "multi-krum", "krum-m": 7})
        load_config({"strategy": strategy, "num-nodes": 2, "aggregator": "median", "byzantine-f": 5})  # median reads no f


@pytest.mark.parametrize("settings_, fragment", [
    (['strategy="fedsgd"', 'aggregator="bulyan"', "byzantine-f=2"], "byzantine-f=2: aggregator='bulyan' needs n >= 4f + 3 (n >= 11)"),
    (['strategy="fedavg"', 'aggregator="multi-krum"', "krum-m=12"], "krum-m=12: aggregator='multi-krum' needs n >= krum-m"),
    (['aggregator="krum"'], "aggregator='krum' does not apply to strategy='llr-vote'"),
])
def test_an_aggregator_condition_the_run_cannot_meet_is_one_line_exit_2_and_no_folder(settings_, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    rc, err = cli(["run", QUICK, *[a for s in settings_ for a in ("--set", s)], "--results-dir", str(results)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("fedsim: error: "), err
    assert fragment in lines[0]
    assert not results.exists() and list(tmp_path.iterdir()) == []


# --- a whole run -----------------------------------------------------------------------------

def test_fedsgd_with_krum_and_one_attacker_runs_to_the_end_on_the_in_process_engine(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "krum"
    settings_ = ['strategy="fedsgd"', 'aggregator="krum"', "byzantine-f=1", "attackers=1", 'attack="scale"',
                 "num-server-rounds=20", "lr=0.5"]
    rc, err = cli(["run", QUICK, *[a for s in settings_ for a in ("--set", s)], "--results-dir", str(results)], capsys)
    assert rc == 0, err
    summary = json.loads((results / "summary.json").read_text())
    assert summary["complete"] and summary["rounds"] == 20 and len(summary["attackers"]) == 1
    config = json.loads((results / "config.json").read_text())
    assert config["aggregator"] == "krum" and config["byzantine-f"] == 1
    with open(results / "rounds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["clients"]) for r in rows[1:]] == [10] * 20
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"]) + 0.2  # the scaled attacker did not stop it


def test_an_incomplete_run_counts_the_rounds_the_aggregator_could_not_use_apart():
    s = make("fedsgd", SPEC, PARAMS, lr=0.5, aggregator="krum")
    s.failed_rounds = {2: TOO_FEW_FOR_RULE, 3: NON_FINITE}
    rows = [RoundRow(round=r, clients=5) for r in range(5)]
    why = failure(rows, load_config({"strategy": "fedsgd", "aggregator": "krum"}), s)
    assert why is not None and why.startswith("2 of 4 rounds kept the previous model")
    assert ("0 with fewer than min-replies=1 valid replies, 1 with fewer valid replies than the aggregator needs, "
            "1 with a non-finite aggregate") in why


def test_more_attackers_than_byzantine_f_is_said_once_at_the_start(tmp_path, monkeypatch, capsys, caplog):
    """The run goes on (a stress test beyond f is legitimate), with one WARNING line that
    names both numbers; within f, and for rules that assume no f, nothing is said."""
    fedsgd = REGISTRY["fedsgd"]
    cfg = load_config({"strategy": "fedsgd", "aggregator": "krum", "byzantine-f": 1, "attackers": 2, "attack": "sign-flip"})
    line = fedsgd.config_warning(cfg, 2)
    assert line is not None and line.startswith("2 attackers but aggregator='krum' assumes at most byzantine-f=1")
    assert fedsgd.config_warning(cfg, 1) is None
    assert fedsgd.config_warning(load_config({"strategy": "fedsgd", "aggregator": "median", "attackers": 3}), 3) is None
    monkeypatch.chdir(tmp_path)
    settings_ = ['strategy="fedsgd"', 'aggregator="krum"', "byzantine-f=1", "attackers=2", 'attack="sign-flip"', "num-server-rounds=2"]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        rc, err = cli(["run", QUICK, *[a for s in settings_ for a in ("--set", s)], "--results-dir", str(tmp_path / "r")], capsys)
    assert rc == 0, err
    said = [r for r in caplog.records if "assumes at most byzantine-f" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING, caplog.text
    assert "fedsim: 2 attackers but aggregator='krum' assumes at most byzantine-f=1" in said[0].getMessage()
