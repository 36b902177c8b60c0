"""Analysis helpers: values worked out by hand and monotonicity properties."""

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.analysis import accuracy_vs_bytes, best_setting, best_so_far, over_seeds, rounds_to_target, run_table, speedup


def test_best_so_far_skips_unevaluated_rounds():
    assert best_so_far([0.1, np.nan, 0.5, 0.3, 0.6]).tolist() == [0.1, 0.1, 0.5, 0.5, 0.6]


def test_rounds_to_target_interpolates_on_the_monotone_curve():
    rounds = [0, 10, 20, 30]
    acc = [0.1, 0.8, 0.7, 0.9]
    # best-so-far 0.1, 0.8, 0.8, 0.9: 0.85 is crossed between round 20 (0.8) and 30 (0.9)
    assert rounds_to_target(rounds, acc, 0.85) == pytest.approx(25.0)
    assert rounds_to_target(rounds, acc, 0.45) == pytest.approx(5.0)  # 0 + (0.45-0.1)*10/0.7
    assert rounds_to_target(rounds, acc, 0.1) == 0.0
    assert math.isnan(rounds_to_target(rounds, acc, 0.95))
    assert rounds_to_target([0, 1, 2, 3], [0.2, np.nan, np.nan, 0.6], 0.4) == pytest.approx(1.5)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=30), st.floats(0, 1), st.floats(0, 1))
def test_rounds_to_target_grows_with_the_target(acc, t1, t2):
    lo, hi = sorted((t1, t2))
    r = list(range(len(acc)))
    a, b = rounds_to_target(r, acc, lo), rounds_to_target(r, acc, hi)
    assert math.isnan(b) or (not math.isnan(a) and a <= b + 1e-9)
    assert all(x <= y for x, y in zip(best_so_far(acc), best_so_far(acc)[1:], strict=False))


def _df():
    rows = []
    for run, (lr, seed, accs) in {
        "a": (0.1, 0, [0.1, 0.9, 0.95]),
        "b": (0.1, 1, [0.1, 0.8, 0.97]),
        "c": (0.05, 0, [0.1, 0.5, 0.96]),
    }.items():
        for rnd, acc in enumerate(accs):
            rows.append(dict(run=run, lr=lr, seed=seed, strategy="fedavg", round=rnd, test_accuracy=acc, bytes_up=100 * (rnd > 0)))
    return pd.DataFrame(rows)


def test_tables_over_seeds_and_best_lr():
    table = run_table(_df(), by=["strategy", "lr", "seed"], target=0.9)
    assert table.set_index("run")["rounds_to_target"].to_dict() == pytest.approx({"a": 1.0, "b": 1 + 0.1 / 0.17, "c": 1 + 0.4 / 0.46})
    assert table.set_index("run")["final_accuracy"]["b"] == 0.97
    assert table.set_index("run")["tail_accuracy"]["b"] == pytest.approx((0.1 + 0.8 + 0.97) / 3)
    assert run_table(_df(), by=["lr"], tail=2).set_index("run")["tail_accuracy"]["c"] == pytest.approx((0.5 + 0.96) / 2)
    agg = over_seeds(table, ["strategy", "lr"]).set_index("lr")
    assert agg.loc[0.1, "runs"] == 2 and agg.loc[0.1, "final_accuracy_mean"] == pytest.approx(0.96)
    best = best_setting(over_seeds(table, ["strategy", "lr"]), ["strategy"], over="lr", metric="rounds_to_target_mean")
    assert best["lr"].tolist() == [0.1]  # 1.29 rounds on average vs 1.87 for lr 0.05
    assert speedup([10, 20], baseline=40).tolist() == [4.0, 2.0]
    curve = accuracy_vs_bytes(_df())
    assert curve[curve.run == "a"]["bytes_up_cumulative"].tolist() == [0, 100, 200]


def test_llr_weights_of_attackers_and_honest_clients_from_run_folders(tmp_path):
    import json

    from fedsim.results import load_llr_weights

    def run(name, weights, attackers, **config):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"seed": 0, "attackers": len(attackers), **config}))
        (folder / "rounds.csv").write_text("round\n")
        summary = {"attackers": attackers, "algorithm": {"mean_llr_weight": {str(c): w for c, w in enumerate(weights)}}}
        (folder / "summary.json").write_text(json.dumps(summary))
        return folder

    a = run("a", [-1.0, 2.0, 3.0, -0.5], [0, 3], **{"zero-sign": "random"})
    b = run("b", [1.0, 2.0], [], **{"zero-sign": "plus"})
    mv = tmp_path / "mv"  # a majority-vote run reports no weights: left out
    mv.mkdir()
    (mv / "summary.json").write_text(json.dumps({"attackers": [0], "algorithm": {}}))
    table = load_llr_weights([a, b, mv, tmp_path / "missing"]).set_index("run")
    assert list(table.index) == ["a", "b"]
    assert table.loc["a", "attackers_weight_mean"] == pytest.approx(-0.75) and table.loc["a", "attackers_weight_max"] == -0.5
    assert table.loc["a", "honest_weight_mean"] == pytest.approx(2.5) and table.loc["a", "honest_weight_min"] == 2.0
    assert table.loc["a", "zero-sign"] == "random" and table.loc["a", "attackers"] == 2
    assert math.isnan(table.loc["b", "attackers_weight_mean"]) and table.loc["b", "honest_weight_min"] == 1.0


def test_runs_of_the_same_name_in_two_sweeps_stay_apart_in_a_table(tmp_path):
    """Table 1's B = 10 and B = inf sweeps both have a run "partitioning=iid,lr=0.3": one
    DataFrame of both must not merge them (it once did, and mixed their rounds)."""
    import json

    from fedsim.results import load_runs

    def run(sweep, batch, accuracies):
        folder = tmp_path / sweep / "partitioning=iid,lr=0.3"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"batch-size": batch, "lr": 0.3, "partitioning": "iid"}))
        rows = "".join(f"{r},,{a},,0,0,10,0,0.1\n" for r, a in enumerate(accuracies))
        (folder / "rounds.csv").write_text("round,train_loss,test_accuracy,test_loss,bytes_up,bytes_down,clients,rejected,seconds\n" + rows)
        return folder

    b10 = run("t1_b10", 10, [0.1, 0.98])
    binf = run("t1_binf", 0, [0.1, 0.5, 0.9, 0.98])
    alone = run("other", 10, [0.2, 0.3]).rename(tmp_path / "other" / "alone")
    df = load_runs([b10, binf, alone])
    assert sorted(df["run"].unique()) == ["alone", "t1_b10/partitioning=iid,lr=0.3", "t1_binf/partitioning=iid,lr=0.3"]
    t = run_table(df, by=["batch-size"], target=0.97).set_index("run")
    assert len(t) == 3
    assert t.loc["t1_b10/partitioning=iid,lr=0.3", "rounds_to_target"] == pytest.approx((0.97 - 0.1) / (0.98 - 0.1))
    assert t.loc["t1_binf/partitioning=iid,lr=0.3", "rounds_to_target"] == pytest.approx(2 + (0.97 - 0.9) / (0.98 - 0.9))
    assert t.loc["t1_binf/partitioning=iid,lr=0.3", "batch-size"] == 0
