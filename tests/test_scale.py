"""Cross-device scale: more clients than examples (digits: 1,437 training examples), a run that samples a few of many."""

import csv
import json
import subprocess
import sys

from fedsim.engine.runner import run_inprocess


def _run(tmp_path, name, **over):
    cfg = {"dataset": "digits", "num-nodes": 5000, "partitioning": "sample:10", "fraction-train": 0.01, "num-server-rounds": 4,
           "batch-mode": 0, "batch-size": 5, "eval-every": 2, "seed": 3, "results-dir": str(tmp_path / name), **over}
    out = run_inprocess(cfg, quiet=True, workers=1)
    with open(out / "rounds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, rows


def test_5000_clients_on_1437_examples_with_the_llr_vote(tmp_path):
    out, rows = _run(tmp_path, "llr", strategy="llr-vote", **{"llr-warmup": 1})
    assert [int(r["clients"]) for r in rows[1:]] == [50] * 4 and all(int(r["rejected"]) == 0 for r in rows[1:])
    summary = json.loads((out / "summary.json").read_text())
    weights = summary["algorithm"]["mean_llr_weight"]
    assert 150 <= len(weights) <= 200 and all(0 <= int(c) < 5000 for c in weights)  # 4 rounds x 50, a few drawn twice
    assert not (out / "label_counts.csv").exists() or sum(1 for _ in open(out / "label_counts.csv")) == 5000
    _, rows2 = _run(tmp_path, "llr2", strategy="llr-vote", **{"llr-warmup": 1})
    assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in rows2]  # same seed, same result


def test_a_disjoint_scheme_with_more_clients_than_examples_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "fedsim.cli", "run", "experiments/quick.toml", "--results-dir", str(tmp_path / "r"),
           "--set", "num-nodes=5000", "--set", "partitioning='shards:2'"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "5000 partitions for 1437 examples" in lines[0] and "partitioning 'sample:K'" in lines[0]
    assert not (tmp_path / "r").exists()
