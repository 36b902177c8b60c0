"""Bad input through the ``fedsim`` command: one line ``fedsim: error: ...``, exit code 2,
no traceback, and no folder created (nothing under the working directory, no results
folder). Each case names a fragment the message must contain, so that a message that
stops naming the problem fails too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "experiments" / "quick.toml")

# (--set overrides on experiments/quick.toml (digits, 10 nodes, llr-vote, batch-mode 2), fragment of the message)
BAD_SETTINGS: list[tuple[list[str], str]] = [
    (['partitioning="labels:11"'], "only 10"),
    (['partitioning="dirichlet:0"'], "alpha must be a finite number > 0"),
    (['partitioning="shards:200"'], "needs at least 2000 examples"),
    (['partitioning="stripes"'], "unknown partitioning"),
    (['partitioning="iid:3"'], "takes no parameter"),
    (['partitioning="labels:1.5"'], "must be an integer >= 1"),
    (["partitioning=5"], "expected str"),
    (['model="foo"'], "model='foo'"),
    (['model="mnist-cnn"'], "takes 1x28x28 inputs"),
    (['dataset="imagenet"'], "dataset='imagenet'"),
    (['strategy="fedprox"'], "strategy='fedprox'"),
    (['downlink="votes"'], "downlink='votes': choose 'model'"),
    (['strategy="fedavg"', 'downlink="signs"'], "downlink='signs' does not apply to strategy='fedavg': it works with ['sign-mv', 'llr-vote', 'sign-fd']"),
    (['strategy="fedsgd"', 'downlink="signs"'], "downlink='signs' does not apply to strategy='fedsgd'"),
    (['strategy="ef-sign"', 'downlink="signs"'], "downlink='signs' does not apply to strategy='ef-sign'"),
    (["seed=-1"], "seed=-1"),
    (["seed=1099511627776"], "seed=1099511627776"),
    (["num-nodes=2000"], "2000 partitions for 1437 examples"),
    (["num-nodes=0"], "num-nodes=0"),
    (["num-nodes=1"], "batch-mode=2 mixes small and large batches"),
    (["batch-mode=7"], "batch-mode=7"),
    (["batch-mode=0", 'batch-sizes="4,x"'], "comma-separated integers"),
    (["batch-mode=0", 'batch-sizes="4,4"'], "lists 2 sizes but there are 10 clients"),
    (["batch-mode=0", 'batch-sizes="-1,4,4,4,4,4,4,4,4,4"'], "must be >= 0"),
    (['batch-sizes="4,4,4,4,4,4,4,4,4,4"'], "not both"),
    (["lr=inf"], "lr=inf"),
    (["lr=nan"], "lr=nan"),
    (["lr=0"], "lr=0"),
    (["lr=-0.1"], "lr=-0.1"),
    (['lr="fast"'], "expected float"),
    (["llr-eps=0.7"], "llr-eps=0.7"),
    (["llr-eps=0"], "llr-eps=0"),
    (["llr-max=inf"], "llr-max=inf"),
    (["llr-forgetting=0"], "llr-forgetting"),
    (["llr-warmup=-1"], "llr-warmup=-1"),
    (["fraction-train=0"], "fraction-train"),
    (["fraction-train=1.5"], "fraction-train"),
    (["num-server-rounds=0"], "num-server-rounds=0"),
    (["num-server-rounds=2.5"], "expected int"),
    (["eval-every=0"], "eval-every=0"),
    (["local-epochs=0"], "local-epochs=0"),
    (["batch-size=-1"], "batch-size=-1"),
    (["stop-at-accuracy=2"], "stop-at-accuracy"),
    (["min-replies=0"], "min-replies=0"),
    (["min-replies=11"], "only 10 clients are sampled per round"),
    (["fraction-train=0.2", "min-replies=3"], "only 2 clients are sampled per round"),
    (["round-timeout=0"], "round-timeout"),
    (["round-timeout=inf"], "round-timeout"),
    (["node-wait=-1"], "node-wait"),
    (["no-such-key=1"], "unknown run-config key"),
    (['data-dir="/nonexistent/fedsim-data"'], "does not exist"),
    (['device="gpu"'], "device='gpu': choose 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (['device="cuda:999"'], "device='cuda:999', but this process sees"),
    (["lr"], "expected key=value"),
    (["=3"], "the key is empty"),
]


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse errors exit
        rc = exit_.code
    out = capsys.readouterr()
    return int(rc or 0), out.out, out.err


def _assert_one_line_error(rc: int, out: str, err: str, fragment: str) -> None:
    assert rc == 2, (rc, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedsim: error: "), err
    assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in out + err


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory: a run that starts would create runs/ here."""
    wd = tmp_path / "wd"
    wd.mkdir()
    monkeypatch.chdir(wd)
    return wd


@pytest.mark.parametrize("settings, fragment", BAD_SETTINGS, ids=[" ".join(s) for s, _ in BAD_SETTINGS])
def test_bad_setting_is_one_line_exit_2_and_no_folder(settings, fragment, workdir, tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["run", QUICK, *[a for s in settings for a in ("--set", s)]]
    rc, out, err = _run_cli(argv, capsys)
    _assert_one_line_error(rc, out, err, fragment)
    assert list(workdir.iterdir()) == []  # no runs/<experiment>-<time> folder
    rc, out, err = _run_cli([*argv, "--results-dir", str(results)], capsys)
    _assert_one_line_error(rc, out, err, fragment)
    assert not results.exists()


def _corrupt_mnist(folder: Path) -> Path:
    folder.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(b"not a gzip file")
    return folder


def _cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    """Bad files, paths and command-line values (each needs the tmp folder)."""
    (tmp_path / "bad.toml").write_text('strategy = "fedavg"\nlr = 0.1\nseed = [1\n')
    (tmp_path / "unknown.toml").write_text('strategy = "fedavg"\nlearning-rate = 0.1\n')
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    corrupt = _corrupt_mnist(tmp_path / "corrupt")
    (tmp_path / "nobase.toml").write_text('[grid]\nseed = [0, 1]\n')
    (tmp_path / "badsweep.toml").write_text(f'base = "{QUICK}"\n[grid\nseed = [0]\n')
    (tmp_path / "setdir.toml").write_text(f'base = "{QUICK}"\n[set]\nresults-dir = "x"\n')
    (tmp_path / "notalist.toml").write_text(f'base = "{QUICK}"\n[grid]\nseed = 3\n')
    (tmp_path / "onebad.toml").write_text(
        f'base = "{QUICK}"\nresults-dir = "{tmp_path / "sweep-out"}"\n[set]\nnum-server-rounds = 2\n'
        '[grid]\npartitioning = ["iid", "labels:11"]\n'
    )
    return [
        (["run", str(tmp_path / "missing.toml")], "does not exist"),
        (["run", str(tmp_path)], "is not a file"),
        (["run", str(tmp_path / "bad.toml")], "is not valid TOML"),
        (["run", str(tmp_path / "unknown.toml")], "unknown run-config key"),
        (["run", QUICK, "--set", f'data-dir="{tmp_path / "afile"}"'], "is a file, not a folder"),
        (["run", QUICK, "--set", 'dataset="mnist"', "--set", 'model="auto"', "--set", f'data-dir="{tmp_path / "empty"}"'], "mnist"),
        (["run", QUICK, "--set", 'dataset="mnist"', "--set", f'data-dir="{corrupt}"'], "is not a valid gzip file"),
        (["run", QUICK, "--results-dir", str(tmp_path / "afile")], "is a file"),
        (["run", QUICK, "--engine", "flower", "--set", 'partitioning="labels:11"'], "only 10"),  # before Flower starts
        (["run", QUICK, "--workers", "0"], "--workers"),
        (["run", QUICK, "--workers", "two"], "--workers"),
        (["run", QUICK, "--threads", "0"], "argument --threads: '0': must be >= 1"),
        (["run", QUICK, "--threads", "1.5"], "argument --threads: '1.5' is not an integer"),
        (["run", QUICK, "--engine", "flower", "--threads", "2"], "--workers and --threads set the inprocess engine"),
        (["run", QUICK, "--engine", "flower", "--workers", "2"], "--workers and --threads set the inprocess engine"),
        (["run", QUICK, "--engine", "ray"], "--engine"),
        (["run", QUICK, "--cpus-per-client", "0"], "--cpus-per-client"),
        (["run", QUICK, "--gpus-per-client", "-1"], "--gpus-per-client"),
        (["run"], "experiment"),
        (["sweep", str(tmp_path / "nobase.toml")], "needs base"),
        (["sweep", str(tmp_path / "badsweep.toml")], "is not valid TOML"),
        (["sweep", str(tmp_path / "setdir.toml")], "results-dir in [set]"),
        (["sweep", str(tmp_path / "notalist.toml")], "non-empty list"),
        (["sweep", str(tmp_path / "onebad.toml")], "sweep point partitioning=labels_11"),
        (["sweep", str(tmp_path / "onebad.toml"), "--dry-run"], "sweep point partitioning=labels_11"),
        (["sweep", str(tmp_path / "onebad.toml"), "--threads", "-1"], "argument --threads: '-1': must be >= 1"),
        (["sweep", str(tmp_path / "onebad.toml"), "--engine", "flower", "--threads", "1"], "set the inprocess engine"),
    ]


def test_bad_files_paths_and_options_are_one_line_exit_2_and_no_folder(workdir, tmp_path, capsys):
    cases = _cases(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, fragment in cases:
        rc, out, err = _run_cli(argv, capsys)
        _assert_one_line_error(rc, out, err, fragment)
        assert list(workdir.iterdir()) == [], argv
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # e.g. no sweep-out/ from the sweep with one bad point


def test_the_installed_command_exits_2_without_traceback(tmp_path):
    """The real entry point in a fresh process, as a user runs it."""
    env = {**os.environ, "FEDSIM_DEBUG": ""}
    for argv, fragment in [
        (["run", QUICK, "--set", 'partitioning="labels:11"'], "only 10"),
        (["run", QUICK, "--set", "lr=inf"], "lr=inf"),
        (["run", str(tmp_path)], "is not a file"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "fedsim.cli", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        _assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(workdir, capsys):
    from fedsim.config import ConfigError

    with pytest.raises(ConfigError, match="lr=inf"):
        main(["run", QUICK, "--set", "lr=inf", "--debug"])
