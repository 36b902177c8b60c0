"""Reading results the way the papers do: rounds to a target accuracy, spread over
seeds, speed-ups, accuracy against uploaded bytes. Pure functions over numpy arrays and
the DataFrames of ``fedsim.results.load_runs``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def best_so_far(accuracy: Sequence[float]) -> np.ndarray:
    """The monotone curve max_{i <= t} acc_i (NaN entries, i.e. rounds not evaluated, skipped)."""
    a = np.asarray(accuracy, dtype=float)
    return np.fmax.accumulate(np.where(np.isnan(a), -np.inf, a))


def rounds_to_target(rounds: Sequence[float], accuracy: Sequence[float], target: float) -> float:
    """First round at which the best-so-far accuracy reaches ``target``, linearly
    interpolated between the two evaluated rounds around the crossing (the FedAvg
    paper's measure); NaN if the run never reaches it. Rows with NaN accuracy are ignored.
    """
    r = np.asarray(rounds, dtype=float)
    a = np.asarray(accuracy, dtype=float)
    keep = ~np.isnan(a)
    r, best = r[keep], best_so_far(a[keep])
    hits = np.nonzero(best >= target)[0]
    if hits.size == 0:
        return math.nan
    i = int(hits[0])
    if i == 0:
        return float(r[0])
    r0, r1, a0, a1 = r[i - 1], r[i], best[i - 1], best[i]
    return float(r0 + (target - a0) * (r1 - r0) / (a1 - a0))


def run_table(df, by: Sequence[str], target: float | None = None, tail: int = 10):
    """One row per run folder (``run`` column of load_runs): its ``by`` values, final test
    accuracy, ``tail_accuracy`` (mean over the last ``tail`` evaluations: steadier than the
    final one for noisy methods such as sign votes), best accuracy, total bytes up, and
    rounds to ``target`` if given."""
    import pandas as pd

    rows = []
    for run, g in df.groupby("run", sort=True):
        g = g.sort_values("round")
        evaluated = g.dropna(subset=["test_accuracy"])
        row = {k: g[k].iloc[0] for k in by}
        row.update(
            run=run,
            final_accuracy=float(evaluated["test_accuracy"].iloc[-1]) if len(evaluated) else math.nan,
            tail_accuracy=float(evaluated["test_accuracy"].iloc[-tail:].mean()) if len(evaluated) else math.nan,
            best_accuracy=float(evaluated["test_accuracy"].max()) if len(evaluated) else math.nan,
            bytes_up=int(g["bytes_up"].sum()),
        )
        if target is not None:
            row["rounds_to_target"] = rounds_to_target(g["round"], g["test_accuracy"], target)
        rows.append(row)
    return pd.DataFrame(rows)


def over_seeds(table, by: Sequence[str]):
    """Mean, standard deviation and count over the runs that share ``by`` (e.g. all seeds of
    one setting). Rounds-to-target is averaged over the runs that reached the target, and
    ``reached`` counts them."""
    metrics = [c for c in ("final_accuracy", "tail_accuracy", "best_accuracy", "rounds_to_target") if c in table]
    grouped = table.groupby(list(by), sort=True)
    out = grouped[metrics].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out["runs"] = grouped.size()
    if "rounds_to_target" in table:
        out["reached"] = grouped["rounds_to_target"].apply(lambda s: int(s.notna().sum()))
    return out.reset_index()


def best_setting(
    table, by: Sequence[str], over: str = "lr", metric: str = "rounds_to_target", lower_is_better: bool | None = None
):
    """Per setting ``by``, the row whose ``over`` value (e.g. the learning rate) did best on
    ``metric``: fewest rounds for a ``rounds_to_target*`` column, highest value otherwise
    (``lower_is_better`` overrides). The FedAvg paper reports its best eta per setting;
    this names it in the ``over`` column."""
    if lower_is_better is None:
        lower_is_better = metric.startswith("rounds_to_target")
    ranked = table.sort_values(metric, ascending=lower_is_better, na_position="last")
    return ranked.groupby(list(by), sort=True).head(1).sort_values(list(by)).reset_index(drop=True)


def speedup(values: Sequence[float], baseline: float) -> np.ndarray:
    """baseline / value: how many times fewer rounds than the baseline row (FedAvg Table 2)."""
    return baseline / np.asarray(values, dtype=float)


def accuracy_vs_bytes(df):
    """Per run and round: cumulative uploaded bytes and test accuracy (evaluated rounds only)."""
    d = df.sort_values(["run", "round"]).copy()
    d["bytes_up_cumulative"] = d.groupby("run")["bytes_up"].cumsum()
    return d.dropna(subset=["test_accuracy"])[["run", "round", "bytes_up_cumulative", "test_accuracy"]]
