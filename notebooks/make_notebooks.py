"""Writes the notebooks in this folder from the cells below (run it after editing them):
    python notebooks/make_notebooks.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''import os
from pathlib import Path

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").exists())
os.chdir(ROOT)  # experiment files use paths relative to the project root
MODE = os.environ.get("FEDSIM_NOTEBOOK_MODE", "quick")  # "quick" runs a small sweep; "full" reads stored results
print("mode:", MODE, "| project:", ROOT)


def sweep_folder(sweep_file):
    """Where a sweep's runs are: $FEDSIM_NOTEBOOK_RESULTS if set; in full mode the copies of
    our runs committed under docs/results/runs/; else the sweep file's own results-dir."""
    if os.environ.get("FEDSIM_NOTEBOOK_RESULTS"):
        return os.environ["FEDSIM_NOTEBOOK_RESULTS"]
    return ROOT / "docs" / "results" / "runs" / Path(sweep_file).stem if MODE == "full" else None'''

FV_CELLS = [
    new_markdown_cell(
        "# signSGD-FV: LLR-weighted vote vs majority vote across batch modes\n\n"
        "Seed 000 (IT-signSGD, published as signSGD-FV) reports that the more heterogeneous the "
        "clients' batch sizes, the larger the gain of the LLR-weighted sign vote over the plain "
        "majority vote. Batch modes (15 clients, total batch 960): mode 1 all B = 64; mode 2 "
        "9 x B = 4 + 6 x 154; mode 3 12 x 4 + 3 x 304; mode 4 14 x 4 + 1 x 904.\n\n"
        "* **quick** (default, run by CI): the comparison in miniature on the bundled digits data "
        "(`experiments/sweeps/fv_digits_quick.toml`: 300 rounds, the authors' 100-round warm-up; "
        "about a minute on a CPU).\n"
        "* **full** (`FEDSIM_NOTEBOOK_MODE=full`): reads the results of "
        "`fedsim sweep experiments/sweeps/fv_mnist_modes.toml` (MNIST, the authors' CNN, 3000 rounds): "
        "by default the copies of our runs in `docs/results/runs/fv_mnist_modes/`; "
        "`FEDSIM_NOTEBOOK_RESULTS=runs/fv_mnist_modes` reads your own (hours on a CPU), and saves "
        "the figure to `docs/results/`.\n\n"
        "Every number shown comes from the runs this notebook runs or reads."
    ),
    new_code_cell(SETUP),
    new_code_cell(
        '''from fedsim.sweep import sweep_results

sweep_file = {"quick": "experiments/sweeps/fv_digits_quick.toml", "full": "experiments/sweeps/fv_mnist_modes.toml"}[MODE]
# quick: run what is missing; full: read the stored runs (see sweep_folder above)
runs = sweep_results(sweep_file, run_missing=MODE == "quick", results_dir=sweep_folder(sweep_file))'''
    ),
    new_code_cell(
        '''import pandas as pd
from fedsim.analysis import over_seeds, run_table
from fedsim.results import load_runs

df = load_runs([r.folder for r in runs])
table = over_seeds(run_table(df, by=["batch-mode", "strategy", "seed"]), ["batch-mode", "strategy"])
# final: the last evaluation; tail: mean of the last 10 evaluations (single evaluations of sign votes are noisy)
cols = {}
for metric in ("final_accuracy_mean", "tail_accuracy_mean"):
    wide = table.pivot(index="batch-mode", columns="strategy", values=metric)
    name = metric.split("_")[0]
    cols.update({f"{name} MV": wide["sign-mv"], f"{name} LLR": wide["llr-vote"], f"{name} LLR - MV": wide["llr-vote"] - wide["sign-mv"]})
runs_per = table.pivot(index="batch-mode", columns="strategy", values="runs")
cols["seeds MV / LLR"] = runs_per["sign-mv"].astype(str) + " / " + runs_per["llr-vote"].astype(str)
pd.DataFrame(cols).round(4)'''
    ),
    new_code_cell(
        '''# per mode and seed: final, tail and best accuracy, and the worst evaluation after the warm-up's
# first 100 rounds with how many evaluations fell below 90% (the sign votes' collapses)
def per_seed(frame):
    t = run_table(frame, by=["batch-mode", "seed", "strategy"])
    after = frame[frame["round"] >= 2 * int(frame["llr-warmup"].iloc[0])].dropna(subset=["test_accuracy"])
    worst = after.groupby("run")["test_accuracy"].agg(worst="min", below_90=lambda a: int((a < 0.9).sum()))
    t = t.join(worst, on="run")
    wide = t.pivot(index=["batch-mode", "seed"], columns="strategy",
                   values=["final_accuracy", "tail_accuracy", "best_accuracy", "worst", "below_90"])
    wide[("tail LLR - MV", "")] = wide[("tail_accuracy", "llr-vote")] - wide[("tail_accuracy", "sign-mv")]
    return wide.round(4)


per_seed(df)'''
    ),
    new_code_cell(
        '''# full mode: the same runs with the signSGD-FV authors' zero-gradient convention (zero-sign abstain:
# a coordinate whose gradient is exactly 0 does not vote), beside fedsim's default (plus) for the same mode and seed
abstain_file = "experiments/sweeps/fv_mnist_modes_abstain.toml"
abstain = sweep_results(abstain_file, run_missing=False, results_dir=sweep_folder(abstain_file)) if MODE == "full" else []
if abstain:
    by_convention = pd.concat({"abstain": per_seed(load_runs([r.folder for r in abstain])), "plus": per_seed(df)}, names=["zero-sign"])
    shared = by_convention.loc["abstain"].index
    display(by_convention[by_convention.index.droplevel(0).isin(shared)].sort_index(level=[1, 2, 0]))
else:
    print("zero-sign abstain: no finished runs read (full mode reads them)")'''
    ),
    new_code_cell(
        '''import matplotlib.pyplot as plt

modes = sorted(df["batch-mode"].unique())
fig, axes = plt.subplots(1, len(modes), figsize=(3.2 * len(modes), 3), sharey=True, squeeze=False)
axes = axes[0]
for ax, mode in zip(axes, modes):
    for strategy, style in [("sign-mv", "--"), ("llr-vote", "-")]:
        d = df[(df["batch-mode"] == mode) & (df["strategy"] == strategy)].dropna(subset=["test_accuracy"])
        curve = d.groupby("round")["test_accuracy"].mean()
        ax.plot(curve.index, curve.values, style, label=strategy)
    seeds = df[df["batch-mode"] == mode]["seed"].nunique()
    ax.set_title(f"batch mode {mode} ({seeds} seed{'s' if seeds > 1 else ''})")
    ax.set_xlabel("round")
axes[0].set_ylabel("test accuracy (mean over seeds)")
axes[-1].legend()
fig.tight_layout()
if MODE == "full":
    fig.savefig(ROOT / "docs" / "results" / "signsgd_fv_mnist_modes.png", dpi=110)'''
    ),
    new_markdown_cell(
        "Reading it: during warm-up (the first `llr-warmup` rounds) the LLR vote *is* the majority "
        "vote, so both curves coincide there. The quick mode is a small model on a small dataset "
        "with one seed: it shows the machinery, not the paper's effect. The warm-up matters: with "
        "20 rounds instead of 100 the LLR vote fell up to 15 points behind the majority vote in modes "
        "3-4 on digits (`docs/results/signsgd_fv_digits_warmup.md`). `docs/results/` holds what our "
        "runs found."
    ),
]


PARTITION_CELLS = [
    new_markdown_cell(
        "# Who holds what: the partitions\n\n"
        "Label counts per client for each partition scheme (flwr-datasets partitioners; `full` is "
        "every client holding the whole set). **quick** (default): the bundled digits, 10 clients. "
        "**full** (`FEDSIM_NOTEBOOK_MODE=full`): MNIST from `../shared/data/mnist`, 100 clients, as in the "
        "FedAvg paper (the shards scheme: 200 shards of 300, 2 per client)."
    ),
    new_code_cell(SETUP),
    new_code_cell(
        '''import numpy as np
import pandas as pd
from fedsim.data import load_dataset
from fedsim.partitions import format_label_counts, label_counts, partition_indices

name, data_dir, clients = ("digits", None, 10) if MODE == "quick" else ("mnist", "../shared/data/mnist", 100)
splits = load_dataset(name, data_dir)
labels = splits.y_train.numpy()
schemes = ["iid", "shards:2", "dirichlet:0.3", "labels:2", "full"]
counts = {s: label_counts(labels, partition_indices(labels, s, clients, seed=0), splits.num_classes) for s in schemes}
print(format_label_counts(counts["shards:2"][:10]))
held = {s: (c > 0).sum(axis=1) for s, c in counts.items()}
pd.DataFrame(
    {
        "examples per client (min)": [counts[s].sum(1).min() for s in schemes],
        "examples per client (max)": [counts[s].sum(1).max() for s in schemes],
        "labels per client (min)": [held[s].min() for s in schemes],
        "labels per client (max)": [held[s].max() for s in schemes],
        "labels per client (mean)": [round(float(held[s].mean()), 2) for s in schemes],
    },
    index=pd.Index(schemes, name="scheme"),
)'''
    ),
    new_code_cell(
        '''import matplotlib.pyplot as plt

fig, axes = plt.subplots(len(schemes), 1, figsize=(10, 2.2 * len(schemes)))
for ax, s in zip(axes, schemes):
    c = counts[s]
    bottom = np.zeros(len(c))
    for label in range(c.shape[1]):
        ax.bar(np.arange(len(c)), c[:, label], bottom=bottom, width=0.9, color=plt.cm.tab10(label))
        bottom += c[:, label]
    ax.set_title(s, fontsize=9)
    ax.set_ylabel("examples")
axes[-1].set_xlabel("client")
fig.tight_layout()'''
    ),
]

COMM_CELLS = [
    new_markdown_cell(
        "# Communication: accuracy against uploaded bytes\n\n"
        "FedSGD and FedAvg upload 32-bit floats per parameter; the sign votes upload 1 bit per "
        "parameter (plus ~100 bytes of record overhead). Both modes run "
        "`experiments/sweeps/quick_strategies.toml` (digits, 16 runs, about 15 s) where its runs are "
        "missing; `FEDSIM_NOTEBOOK_RESULTS` points it at another folder of that sweep's runs."
    ),
    new_code_cell(SETUP),
    new_code_cell(
        '''from fedsim.sweep import sweep_results

# the same small sweep in both modes (13 s here): run what is missing
done = sweep_results("experiments/sweeps/quick_strategies.toml", run_missing=True,
                     results_dir=os.environ.get("FEDSIM_NOTEBOOK_RESULTS"))'''
    ),
    new_code_cell(
        '''from fedsim.analysis import accuracy_vs_bytes, best_setting, over_seeds, run_table
from fedsim.results import load_runs

df = load_runs([r.folder for r in done])
table = over_seeds(run_table(df, by=["strategy", "lr", "seed"]), ["strategy", "lr"])
best = best_setting(table, ["strategy"], over="lr", metric="final_accuracy_mean")
per_round = df[df["round"] == 1].groupby("strategy")[["bytes_up", "clients"]].first()
best = best.merge((per_round["bytes_up"] / per_round["clients"]).rename("bytes up per client and round"), on="strategy")
best[["strategy", "lr", "final_accuracy_mean", "bytes up per client and round"]].round(4)'''
    ),
    new_code_cell(
        '''import matplotlib.pyplot as plt

curves = accuracy_vs_bytes(df).merge(df[["run", "strategy", "lr", "seed"]].drop_duplicates(), on="run")
fig, ax = plt.subplots(figsize=(6, 4))
for _, row in best.iterrows():
    d = curves[(curves.strategy == row.strategy) & (curves.lr == row.lr)]
    mean = d.groupby("round")[["bytes_up_cumulative", "test_accuracy"]].mean()
    ax.plot(mean["bytes_up_cumulative"] / 1e6, mean["test_accuracy"], marker="o", ms=3, label=f"{row.strategy} (lr {row.lr})")
ax.set_xscale("symlog", linthresh=0.01)
ax.set_xlabel("uploaded MB (all clients, cumulative)")
ax.set_ylabel("test accuracy")
ax.legend()
fig.tight_layout()'''
    ),
]


FEDAVG_CELLS = [
    new_markdown_cell(
        "# FedAvg: rounds to a target accuracy, ours beside the paper's\n\n"
        "Rounds to target are measured as the FedAvg paper does: best-so-far accuracy curve, linear "
        "interpolation between evaluated rounds (`fedsim.analysis.rounds_to_target`); speed-up is "
        "relative to the E = 1, B = inf row (FedSGD), and missing where that row never reached the "
        "target. **quick** (default): a miniature grid on digits "
        "(`experiments/sweeps/fedavg_digits_quick.toml`, one lr for all rows, target 75%). **full**: reads "
        "the runs of `experiments/sweeps/fedavg_table2_iid_cpu.toml` (MNIST CNN, the IID rows a CPU finishes, "
        "target 99%; our copies in `docs/results/runs/`) and puts the paper's Table 2 numbers beside ours; "
        "`FEDSIM_NOTEBOOK_SWEEP=experiments/sweeps/fedavg_table2.toml` with `FEDSIM_NOTEBOOK_RESULTS` "
        "reads the whole table once you have run it. The paper's numbers are the paper's, not ours, and "
        "rows we have not run show as missing."
    ),
    new_code_cell(SETUP),
    new_code_cell(
        '''from fedsim.sweep import sweep_results

sweep_file, target = {"quick": ("experiments/sweeps/fedavg_digits_quick.toml", 0.75),
                      "full": (os.environ.get("FEDSIM_NOTEBOOK_SWEEP", "experiments/sweeps/fedavg_table2_iid_cpu.toml"), 0.99)}[MODE]
done = sweep_results(sweep_file, run_missing=MODE == "quick", results_dir=sweep_folder(sweep_file))
print("target", target)'''
    ),
    new_code_cell(
        '''import pandas as pd
from fedsim.analysis import run_table, speedup
from fedsim.results import load_runs

# FedAvg paper, Table 2 (MNIST CNN, C = 0.1, rounds to 99%): the paper's numbers.
PAPER = {(1, 0): (626, 483), (5, 0): (179, 1000), (1, 50): (65, 600), (20, 0): (234, 672), (1, 10): (34, 350),
         (5, 50): (29, 334), (20, 50): (32, 426), (5, 10): (20, 229), (20, 10): (18, 173)}
t = run_table(load_runs([r.folder for r in done]), by=["partitioning", "local-epochs", "batch-size"], target=target)
t["B"] = t["batch-size"].map(lambda b: "inf" if b == 0 else b)
rows = []
for part, g in t.groupby("partitioning"):
    base = g[(g["local-epochs"] == 1) & (g["batch-size"] == 0)]["rounds_to_target"]
    g = g.assign(speedup=speedup(g["rounds_to_target"], float(base.iloc[0])) if len(base) else float("nan"))
    if MODE == "full":
        col = 0 if part == "iid" else 1
        g = g.assign(paper=[PAPER.get((e, b), (None, None))[col] for e, b in zip(g["local-epochs"], g["batch-size"])])
        g = g.assign(ours_over_paper=g["rounds_to_target"] / g["paper"])
    rows.append(g)
table = pd.concat(rows).sort_values(["partitioning", "local-epochs", "batch-size"])
cols = ["partitioning", "local-epochs", "B", "rounds_to_target", "speedup", "final_accuracy"]
table[cols + (["paper", "ours_over_paper"] if MODE == "full" else [])].round(2)'''
    ),
    new_code_cell(
        '''import matplotlib.pyplot as plt
from fedsim.analysis import best_so_far

df = load_runs([r.folder for r in done])
parts = sorted(df["partitioning"].unique())
fig, axes = plt.subplots(1, len(parts), figsize=(5 * len(parts), 3.5), sharey=True, squeeze=False)
axes = axes[0]
for ax, part in zip(axes, parts):
    for run, g in df[df["partitioning"] == part].groupby("run"):
        g = g.dropna(subset=["test_accuracy"]).sort_values("round")
        e, b = g["local-epochs"].iloc[0], g["batch-size"].iloc[0]
        ax.plot(g["round"], best_so_far(g["test_accuracy"]), label=f"E={e}, B={'inf' if b == 0 else b}")
    ax.axhline(target, color="grey", lw=0.8, ls=":")
    ax.set_ylim(target - 0.1, 1.0)  # the approach to the target is what the table measures
    ax.set_title(part)
    ax.set_xlabel("round")
axes[0].set_ylabel("best test accuracy so far")
axes[-1].legend(fontsize=8)
fig.tight_layout()
if MODE == "full":
    fig.savefig(ROOT / "docs" / "results" / f"{Path(sweep_file).stem}.png", dpi=110)'''
    ),
    new_markdown_cell(
        "## Table 1: the effect of the client fraction C (2NN, E = 1, target 97%)\n\n"
        "The paper's Table 1 (seed 003): rounds to 97% test accuracy for the 2NN with E = 1, for "
        "C = 0 (one client per round), 0.1, 0.2, 0.5, 1.0, B in {inf, 10}, IID and the pathological "
        "non-IID shards. As the paper, each cell reports the best learning rate of a grid fixed "
        "before running (ours: 0.03, 0.1, 0.3 for B = 10; 0.1, 0.3, 1.0 for B = inf), with the speed-up "
        "over C = 0 in its column. **quick**: the same table in miniature on digits "
        "(`experiments/sweeps/fedavg_digits_table1_quick.toml`, C in {0, 0.5}, target 80%). **full**: "
        "reads `experiments/sweeps/fedavg_table1_2nn_b10.toml` and `fedavg_table1_2nn_binf.toml` "
        "(our copies in `docs/results/runs/`); cells whose runs are not finished show as missing, "
        "\"not reached\" means no lr of the grid reached the target within the sweep's round cap. "
        "The paper's column is the paper's numbers, not ours."
    ),
    new_code_cell(
        '''from fedsim.analysis import best_setting

t1_files, t1_target = ({"quick": (["experiments/sweeps/fedavg_digits_table1_quick.toml"], 0.8),
                        "full": (["experiments/sweeps/fedavg_table1_2nn_b10.toml",
                                  "experiments/sweeps/fedavg_table1_2nn_binf.toml"], 0.97)}[MODE])
t1_runs = [r for f in t1_files for r in sweep_results(f, run_missing=MODE == "quick", results_dir=sweep_folder(f))]
# FedAvg paper, Table 1, 2NN (rounds to 97%): (C, B) -> (IID, non-IID); None: not in the paper ("-")
PAPER_T1 = {(0.0, 0): (1455, 4278), (0.1, 0): (1474, 1796), (0.2, 0): (1658, 1528), (0.5, 0): (None, None),
            (1.0, 0): (None, None), (0.0, 10): (316, 3275), (0.1, 10): (87, 664), (0.2, 10): (77, 619),
            (0.5, 10): (75, 443), (1.0, 10): (70, 380)}
t1 = run_table(load_runs([r.folder for r in t1_runs]), by=["partitioning", "batch-size", "fraction-train", "lr", "num-nodes"],
               target=t1_target)
t1["C"] = [0.0 if round(f * n) <= 1 else f for f, n in zip(t1["fraction-train"], t1["num-nodes"])]
best = best_setting(t1, ["partitioning", "batch-size", "C"], over="lr")
cells = {}
for (part, b), g in best.groupby(["partitioning", "batch-size"]):
    base = g[g["C"] == 0.0]["rounds_to_target"]
    base = float(base.iloc[0]) if len(base) else float("nan")  # C = 0's rounds: the speed-up's baseline
    for _, row in g.iterrows():
        r = row["rounds_to_target"]
        gain = f" ({base / r:.1f}x)" if base == base and r == r else ""
        ours = "not reached" if r != r else f"{r:.0f}{gain} lr {row['lr']:g}"
        key = ("IID" if part == "iid" else "non-IID", "inf" if b == 0 else b)
        cells.setdefault(key + ("ours",), {})[row["C"]] = ours
        if MODE == "full":
            paper = PAPER_T1.get((row["C"], b), (None, None))[0 if part == "iid" else 1]
            cells.setdefault(key + ("paper",), {})[row["C"]] = "-" if paper is None else paper
table1 = pd.DataFrame(cells).sort_index()
table1.index.name = "C"
table1'''
    ),
]


ATTACK_CELLS = [
    new_markdown_cell(
        "# Sign votes under sign-flipping clients: accuracy against k\n\n"
        "k of the clients (drawn from the seed; `attackers`) are Byzantine: each sends the signs of "
        "-g instead of g (`attack = \"sign-flip\"`, `fedsim/attacks.py`). Three sign votes aggregate "
        "the signs: the majority vote (`sign-mv`), the LLR-weighted vote (`llr-vote`, signSGD-FV), "
        "which learns a weight per client and turns a flipping client's weight negative, and "
        "signSGD-FD (`sign-fd`). Both weighted votes are plain majority votes during their warm-up.\n\n"
        "What a client sends for an exactly zero gradient coordinate is the `zero-sign` convention: "
        "`plus` sends +1 (1 bit; the signSGD-MV authors' code), so on such a coordinate an attacker "
        "sends the same +1 as an honest client; `random` a fair coin; `abstain` sends 0: the "
        "coordinate does not vote (a ternary code).\n\n"
        "* **quick** (default, run by CI): the comparison in miniature on the bundled digits data "
        "(`experiments/sweeps/attacks_digits_quick.toml`: 15 clients each holding all of digits, batch 32, "
        "120 rounds, k in 0, 3, 5, 7, zero-sign `plus` and `abstain`, one seed; 24 runs, about 100 s "
        "of CPU).\n"
        "* **full** (`FEDSIM_NOTEBOOK_MODE=full`): reads the results of "
        "`fedsim sweep experiments/sweeps/attacks_mnist.toml` (MNIST, the signSGD-FV setup in batch mode 1, "
        "200 rounds, k in 0, 5, 7, all three conventions): by default the copies of our runs in "
        "`docs/results/runs/attacks_mnist/`; `FEDSIM_NOTEBOOK_RESULTS=runs/attacks_mnist` reads your own. "
        "It uses whatever runs are finished (e.g. seed 0 only) and saves the figure to `docs/results/`.\n\n"
        "Every number shown comes from the runs this notebook runs or reads."
    ),
    new_code_cell(SETUP),
    new_code_cell(
        '''from fedsim.sweep import sweep_results

sweep_file = {"quick": "experiments/sweeps/attacks_digits_quick.toml", "full": "experiments/sweeps/attacks_mnist.toml"}[MODE]
# quick: run what is missing; full: read the finished runs (see sweep_folder above), skipping the others
runs = sweep_results(sweep_file, run_missing=MODE == "quick", results_dir=sweep_folder(sweep_file))
assert runs, f"no finished runs of {sweep_file}: run fedsim sweep {sweep_file} first"'''
    ),
    new_code_cell(
        '''import pandas as pd
from fedsim.analysis import over_seeds, run_table
from fedsim.results import load_runs

df = load_runs([r.folder for r in runs])
# tail: mean over the evaluations in the second half of the rounds (single evaluations of sign votes are noisy)
first = df[df["run"] == df["run"].iloc[0]].dropna(subset=["test_accuracy"])
TAIL = int((first["round"] >= first["round"].max() / 2).sum())
print(f"final: accuracy at the last round; tail: mean of the last {TAIL} evaluations (rounds {int(first['round'].iloc[-TAIL])}-{int(first['round'].max())})")


def accuracy_table(frame, index):
    """Per setting ``index`` (rows) and vote (columns): final and tail accuracy, mean over seeds, the tail's sd and the seeds."""
    keys = [*index, "strategy"]
    t = over_seeds(run_table(frame, by=[*keys, "seed"], tail=TAIL), keys)
    wide = t.pivot(index=index, columns="strategy")
    cols = {}
    for strategy in [s for s in ("sign-mv", "llr-vote", "sign-fd") if s in t["strategy"].values]:
        for metric in ("final_accuracy", "tail_accuracy"):
            cols[(strategy, metric.split("_")[0])] = wide[(f"{metric}_mean", strategy)]
        cols[(strategy, "tail sd")] = wide[("tail_accuracy_std", strategy)]
        cols[(strategy, "seeds")] = wide[("runs", strategy)].astype("Int64")
    return t, pd.DataFrame(cols).round(4)


table, shown = accuracy_table(df, ["zero-sign", "attackers"])
shown'''
    ),
    new_code_cell(
        '''from fedsim.results import load_llr_weights

# the LLR vote's weight per client at the end of the run (mean over coordinates; negative: its signs are read flipped)
def weight_table(runs, by):
    """Per setting: the attackers' mean weight (mean and sd over seeds) and their largest, the honest clients' mean and smallest."""
    w = load_llr_weights([r.folder for r in runs])
    return w.groupby(by).agg(
        attackers_mean=("attackers_weight_mean", "mean"), attackers_sd=("attackers_weight_mean", "std"),
        attackers_max=("attackers_weight_max", "max"), honest_mean=("honest_weight_mean", "mean"),
        honest_min=("honest_weight_min", "min"), seeds=("seed", "nunique"),
    ).round(3)


weight_table(runs, ["zero-sign", "attackers"])'''
    ),
    new_code_cell(
        '''# full mode: the control, bit flippers (every sent bit inverted, zero gradients included; zero-sign plus),
# and sign flippers in batch mode 3 (12 x B = 4, 3 x B = 304)
for title, more_file, index in [("bit flippers", "experiments/sweeps/attacks_mnist_bitflip.toml", ["attackers"]),
                                ("batch mode 3", "experiments/sweeps/attacks_mnist_mode3.toml", ["zero-sign", "attackers"])]:
    more = sweep_results(more_file, run_missing=False, results_dir=sweep_folder(more_file)) if MODE == "full" else []
    if not more:
        print(f"{title}: no finished runs read (full mode reads them)")
        continue
    print(title)
    display(accuracy_table(load_runs([r.folder for r in more]), index)[1])
    display(weight_table(more, index))'''
    ),
    new_code_cell(
        '''import matplotlib.pyplot as plt

conventions = [z for z in ("plus", "random", "abstain") if z in table["zero-sign"].values]
fig, axes = plt.subplots(1, len(conventions), figsize=(3.6 * len(conventions), 3.2), sharey=True, squeeze=False)
axes = axes[0]
for ax, zero_sign in zip(axes, conventions):
    for strategy, style in [("sign-mv", "s--"), ("llr-vote", "o-"), ("sign-fd", "^:")]:
        d = table[(table["zero-sign"] == zero_sign) & (table["strategy"] == strategy)].sort_values("attackers")
        if len(d):
            ax.errorbar(d["attackers"], d["tail_accuracy_mean"], yerr=d["tail_accuracy_std"].fillna(0), fmt=style, capsize=3, label=strategy)
    seeds = df[df["zero-sign"] == zero_sign]["seed"].nunique()
    ax.set_title(f"zero-sign {zero_sign} ({seeds} seed{'s' if seeds > 1 else ''})")
    ax.set_xlabel(f"attackers k (of {int(df['num-nodes'].iloc[0])})")
    ax.set_xticks(sorted(table["attackers"].unique()))
axes[0].set_ylabel(f"test accuracy (tail, last {TAIL} evaluations)")
axes[-1].legend()
fig.tight_layout()
if MODE == "full":
    fig.savefig(ROOT / "docs" / "results" / "attacks_mnist.png", dpi=110)'''
    ),
    new_markdown_cell(
        "Reading it: k = 0 is each vote without attackers. During the warm-up the "
        "weighted votes are majority votes; after it, a client whose signs disagree with the vote "
        "gets a negative LLR weight on those coordinates, so its signs count flipped. The weight "
        "table averages each client's weight over *all* coordinates: where every client sends the "
        "same sign (under `plus`, every coordinate whose gradient is exactly zero: +1 from honest "
        "clients and attackers alike) an attacker agrees with the vote, which pulls its mean weight "
        "up. Error bars are the standard deviation over seeds (none with one seed); a point missing "
        "from a line is a run not finished yet. The quick mode is a small model on a small dataset "
        "with one seed: it shows the machinery, not a measured effect. `docs/results/` holds what "
        "our runs found."
    ),
    new_markdown_cell(
        "## Beside Byzantine-robust aggregation (issue 24)\n\n"
        "The sign votes send 1 bit per coordinate; FedSGD sends the full-precision gradient and can "
        "aggregate it with a robust rule (`aggregator`: `mean`, `median`, `trimmed-mean`, `krum`, "
        "`multi-krum`, `bulyan`; `fedsim/aggregators/`). The table gives, per method and number of "
        "attackers k, the final test accuracy (mean ± sd over seeds, the seeds in brackets) and the "
        "bytes each client uploads per round.\n\n"
        "* **quick**: digits, 15 clients, 120 rounds, k in 0 and 5 sign flippers, one seed "
        "(`experiments/sweeps/robust_digits_quick_signs.toml`, `robust_digits_quick_fedsgd.toml`; 12 runs).\n"
        "* **full**: the MNIST sweeps of `docs/results/robust_mnist.md` (`robust_mnist_clean_signs`, "
        "`robust_mnist_clean_fedsgd`, `robust_mnist_signs`, `robust_mnist_fedsgd`): whatever runs are finished."
    ),
    new_code_cell(
        '''ROBUST = {"quick": ["robust_digits_quick_signs", "robust_digits_quick_fedsgd"],
          "full": ["robust_mnist_clean_signs", "robust_mnist_clean_fedsgd", "robust_mnist_signs", "robust_mnist_fedsgd"]}[MODE]
METHODS = ["sign-mv", "llr-vote", "sign-fd", "fedsgd/mean", "fedsgd/median", "fedsgd/trimmed-mean", "fedsgd/krum", "fedsgd/bulyan"]
frames = []
for name in ROBUST:
    f = f"experiments/sweeps/{name}.toml"
    found = sweep_results(f, run_missing=MODE == "quick", results_dir=sweep_folder(f))
    if found:
        frames.append(load_runs([r.folder for r in found]))
assert frames, f"no finished runs of {ROBUST}"
robust = pd.concat(frames, ignore_index=True)
for col, default in (("attack", "none"), ("attackers", 0), ("aggregator", "mean")):
    robust[col] = robust[col].fillna(default) if col in robust else default
robust["method"] = [s if s != "fedsgd" else f"fedsgd/{a}" for s, a in zip(robust["strategy"], robust["aggregator"])]
robust.loc[robust["attackers"] == 0, "attack"] = "none"
per_run = run_table(robust, by=["method", "attack", "attackers", "seed"])
up = robust[robust["clients"] > 0].assign(b=lambda d: d["bytes_up"] / d["clients"]).groupby("method")["b"].median()


def cell(values):
    v = list(values)
    if not v:
        return "not run"
    sd = f" ± {pd.Series(v).std():.4f}" if len(v) > 1 else ""
    return f"{pd.Series(v).mean():.4f}{sd} ({len(v)})"


ks = sorted(k for k in per_run["attackers"].unique() if k > 0)
tables = {}
for attack in [a for a in ("sign-flip", "stochastic", "gauss", "lie") if a in per_run["attack"].values]:
    rows = {}
    for m in [m for m in METHODS if m in per_run["method"].values]:
        pick = lambda a, k: per_run[(per_run["method"] == m) & (per_run["attack"] == a) & (per_run["attackers"] == k)]["final_accuracy"]
        rows[m] = {"bytes up / client-round": f"{up.get(m, float('nan')):,.0f}", "k = 0": cell(pick("none", 0)),
                   **{f"k = {k}": cell(pick(attack, k)) for k in ks}}
    tables[attack] = pd.DataFrame(rows).T
    print(f"{attack}: final test accuracy, mean ± sd over seeds (seeds)")
    display(tables[attack])'''
    ),
    new_markdown_cell(
        "Reading it: a robust rule is only as good as its assumption; Krum and Bulyan assume at most "
        "`byzantine-f` attackers (3 here), and a run with more says so in a WARNING line at its start. "
        "The sign votes upload about 32x fewer bytes per client and round than FedSGD. With one seed "
        "a difference of a few tenths of a percent is noise; `docs/results/robust_mnist.md` says what "
        "our MNIST runs found and what is not run yet."
    ),
]


def write(name: str, cells: list) -> None:
    for i, cell in enumerate(cells):
        cell.id = f"{Path(name).stem[:50]}-{i}"  # stable ids: regenerating changes nothing that did not change
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, HERE / name)


NOTEBOOKS = {
    "signsgd_fv_batch_modes.ipynb": FV_CELLS,
    "partitions.ipynb": PARTITION_CELLS,
    "communication.ipynb": COMM_CELLS,
    "fedavg_tables.ipynb": FEDAVG_CELLS,
    "attacks.ipynb": ATTACK_CELLS,
}

if __name__ == "__main__":
    for name, cells in NOTEBOOKS.items():
        write(name, cells)
