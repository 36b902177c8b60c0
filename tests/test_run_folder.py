"""Run folders: one writer at a time (a lock that dies with its process), no run of one
config mixed with another's, and damaged files (torn rounds.csv, bad checkpoint) handled
with a warning instead of a traceback."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from strategy_kit import each_round

from fedsim.config import ConfigError, RunConfig, config_differences, same_experiment
from fedsim.engine.runner import run_inprocess
from fedsim.run_folder import (
    CHECKPOINT,
    CONFIG,
    LOCK,
    ROUNDS,
    SUMMARY,
    RunFolder,
    RunFolderBusy,
    RunFolderConflict,
    check_run_folder,
    claim_run_folder,
    clear_run_folder,
    lock_run_folder,
)
from fedsim.validation import load_config

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "experiments" / "quick.toml"
SMALL = {"strategy": "fedavg", "num-nodes": 4, "num-server-rounds": 4, "eval-every": 1, "lr": 0.1}


class Crash(Exception):
    pass


def crash_at(round_):
    def hook(row):
        if row.round == round_:
            raise Crash(round_)

    return hook


def rounds(folder):
    with open(folder / ROUNDS, newline="") as f:
        return [int(r["round"]) for r in csv.DictReader(f)]


def fedsim_run(folder, *sets):
    cmd = [sys.executable, "-m", "fedsim.cli", "run", str(QUICK), "--results-dir", str(folder)]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def start(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def stop(proc):
    """Kill a process started by ``start`` (its whole session), if it still runs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def wait_for(condition, proc, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def has_rows(folder, n):
    try:
        return len(rounds(folder)) >= n
    except (OSError, KeyError, ValueError):
        return False


# --- the lock -----------------------------------------------------------------------


def test_two_fedsim_runs_on_one_folder(tmp_path):
    """The second `fedsim run` on a folder in use exits 2 at once, naming the first's PID;
    the first finishes with every round once."""
    folder = tmp_path / "run"
    cmd = fedsim_run(folder, "num-server-rounds=1500", "eval-every=100")
    first = start(cmd)
    try:
        wait_for(lambda: has_rows(folder, 2), first, "the first run wrote rounds")
        # Stopped (SIGSTOP) mid-run it keeps its lock and cannot finish while the second one
        # starts, however slow a loaded machine makes the second's start-up.
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"results folder {folder} is in use by another fedsim process (pid {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-2000:]
    finally:
        stop(first)
    assert rounds(folder) == list(range(1501))
    assert json.loads((folder / SUMMARY).read_text())["rounds"] == 1500


def test_the_lock_dies_with_its_process(tmp_path):
    """SIGKILL the holder: the folder is free at once, and the same command resumes."""
    folder = tmp_path / "run"
    cmd = fedsim_run(folder, "num-server-rounds=300", "eval-every=10")
    proc = start(cmd)
    try:
        wait_for(lambda: (folder / CHECKPOINT).exists() and has_rows(folder, 12), proc, "a checkpoint")
        with pytest.raises(RunFolderBusy, match=f"pid {proc.pid}"):
            lock_run_folder(folder)
    finally:
        stop(proc)
    assert not (folder / SUMMARY).exists()
    lock_run_folder(folder).release()  # free again
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((folder / SUMMARY).read_text())["resumed_after_round"] >= 10
    assert rounds(folder) == list(range(301))


HOLD = "import sys, time; from fedsim.run_folder import lock_run_folder; hold = lock_run_folder(sys.argv[1]); print('held', flush=True); time.sleep(60)"
TAKE = "import sys; from fedsim.run_folder import lock_run_folder; hold = lock_run_folder(sys.argv[1]); print('taken')"


def test_the_lock_is_reentrant_in_a_process_and_its_children(tmp_path):
    folder = tmp_path / "run"
    with lock_run_folder(folder):
        with lock_run_folder(folder), claim_run_folder(folder, load_config({})):  # the CLI, run_experiment, ...
            pass
        # still held by the outer hold: a child process (the Flower engine's ServerApp) runs under it ...
        child = subprocess.run([sys.executable, "-c", TAKE, str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert child.stdout.strip() == "taken", child.stderr
        # ... while an unrelated process is refused
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "other")], cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            with pytest.raises(RunFolderBusy, match=f"in use by another fedsim process \\(pid {holder.pid}\\)") as err:
                lock_run_folder(tmp_path / "other")
            assert isinstance(err.value, ConfigError)
        finally:
            stop(holder)
    lock_run_folder(tmp_path / "other").release()  # the killed holder's lock is gone
    assert (folder / LOCK).exists()


# --- another config on a used folder ------------------------------------------------


def test_a_changed_config_on_a_finished_folder_is_refused(tmp_path):
    folder = tmp_path / "run"
    first = subprocess.run(fedsim_run(folder, "num-server-rounds=3", "eval-every=1"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {name: (folder / name).read_bytes() for name in (SUMMARY, ROUNDS, CONFIG)}
    out = subprocess.run(fedsim_run(folder, "num-server-rounds=3", "eval-every=1", "lr=0.02"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "holds a finished run of another config (lr: 0.01 -> 0.02)" in out.stderr and "--overwrite" in out.stderr
    assert "Traceback" not in out.stderr
    assert {name: (folder / name).read_bytes() for name in before} == before
    out = subprocess.run([*fedsim_run(folder, "num-server-rounds=3", "eval-every=1", "lr=0.02"), "--overwrite"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((folder / CONFIG).read_text())["lr"] == 0.02
    assert (folder / SUMMARY).read_bytes() != before[SUMMARY] and len((folder / ROUNDS).read_text().splitlines()) == 5


def test_check_run_folder(tmp_path):
    folder = tmp_path / "run"
    cfg = load_config({**SMALL, "results-dir": str(folder)})
    check_run_folder(folder, cfg)  # no folder yet
    folder.mkdir()
    (folder / CONFIG).write_text(json.dumps({**cfg.to_mapping(), "lr": 0.5}))
    check_run_folder(folder, cfg)  # a config and no round: nothing to lose
    (folder / ROUNDS).write_text("round,train_loss\n0,\n")
    with pytest.raises(RunFolderConflict, match=r"holds a started run of another config \(lr: 0.5 -> 0.1\)"):
        check_run_folder(folder, cfg)
    (folder / CONFIG).write_text(json.dumps({**cfg.to_mapping(), "results-dir": "elsewhere"}))
    check_run_folder(folder, cfg)  # where the results live is not part of the experiment
    (folder / CONFIG).unlink()
    with pytest.raises(RunFolderConflict, match=r"without a readable config\.json"):
        check_run_folder(folder, cfg)


def test_config_differences_agree_with_same_experiment():
    cfg = load_config(SMALL)
    stored = {k: v for k, v in cfg.to_mapping().items() if k != "min-replies"}  # a key added later: its default
    assert config_differences(stored, cfg) == {} and same_experiment(stored, cfg)
    stored = {**stored, "lr": 0.2, "results-dir": "x", "gone": 1}
    assert config_differences(stored, cfg) == {"gone": (1, None), "lr": (0.2, 0.1)}
    assert not same_experiment(stored, cfg)


def test_clear_run_folder_removes_run_files_only(tmp_path):
    folder = tmp_path / "run"
    run_inprocess({**SMALL, "results-dir": str(folder)})
    (folder / ".claim").write_text("host 1\n")
    (folder / "notes.txt").write_text("mine\n")
    (folder / CHECKPOINT).mkdir()
    clear_run_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == [".claim", LOCK, "notes.txt"]


def test_a_finished_folder_rerun_with_another_config_after_clearing_is_clean(tmp_path):
    folder = tmp_path / "run"
    run_inprocess({**SMALL, "results-dir": str(folder)})
    with pytest.raises(RunFolderConflict, match=r"lr: 0\.1 -> 0\.05"):
        claim_run_folder(folder, load_config({**SMALL, "lr": 0.05}))
    clear_run_folder(folder)
    with pytest.raises(Crash):  # killed early: no summary of the old run beside the new config
        run_inprocess({**SMALL, "lr": 0.05, "results-dir": str(folder)}, callbacks=[each_round(crash_at(1))])
    assert not (folder / SUMMARY).exists() and json.loads((folder / CONFIG).read_text())["lr"] == 0.05
    run_inprocess({**SMALL, "lr": 0.05, "results-dir": str(folder)})
    summary = json.loads((folder / SUMMARY).read_text())
    assert summary["rounds"] == 4 and rounds(folder) == [0, 1, 2, 3, 4]
    assert json.loads((folder / CONFIG).read_text())["lr"] == 0.05


def test_a_rerun_of_the_same_config_removes_the_old_summary_first(tmp_path):
    folder = tmp_path / "run"
    run_inprocess({**SMALL, "results-dir": str(folder)})
    with pytest.raises(Crash):
        run_inprocess({**SMALL, "results-dir": str(folder)}, callbacks=[each_round(crash_at(0))])
    assert not (folder / SUMMARY).exists() and not (folder / "model.pt").exists() and (folder / CONFIG).exists()


# --- damaged files ------------------------------------------------------------------


def crashed_run(folder):
    """A run killed after round 3 (its checkpoint: round 2; rows 0-3)."""
    with pytest.raises(Crash):
        run_inprocess({**SMALL, "results-dir": str(folder)}, callbacks=[each_round(crash_at(3))])
    assert (folder / CHECKPOINT).exists() and rounds(folder) == [0, 1, 2, 3]


def finish(folder, caplog):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_inprocess({**SMALL, "results-dir": str(folder)})
    assert rounds(folder) == [0, 1, 2, 3, 4] and not (folder / CHECKPOINT).exists()
    return json.loads((folder / SUMMARY).read_text())


@pytest.mark.parametrize("torn", ["4,0.31", "1"])
def test_a_torn_last_line_of_rounds_csv_is_dropped(tmp_path, caplog, torn):
    folder = tmp_path / "run"
    crashed_run(folder)
    with open(folder / ROUNDS, "a") as f:
        f.write(torn)  # killed in the middle of writing a row
    summary = finish(folder, caplog)
    assert f"dropping its torn last line {torn!r}" in caplog.text
    assert summary["resumed_after_round"] == 2


def test_rounds_csv_with_duplicated_rounds_starts_over(tmp_path, caplog):
    folder = tmp_path / "run"
    crashed_run(folder)
    lines = (folder / ROUNDS).read_text().splitlines(keepends=True)
    (folder / ROUNDS).write_text("".join(lines + lines[1:]))
    summary = finish(folder, caplog)
    assert "does not hold rounds 0-2 once each; starting from round 0" in caplog.text
    assert summary["resumed_after_round"] is None


def _missing_keys(folder):
    state = torch.load(folder / CHECKPOINT, weights_only=True)
    del state["arrays"], state["seconds"]
    torch.save(state, folder / CHECKPOINT)


def _wrong_types(folder):
    state = torch.load(folder / CHECKPOINT, weights_only=True)
    torch.save({**state, "round": "two", "strategy": [1, 2]}, folder / CHECKPOINT)


def _wrong_shapes(folder):
    state = torch.load(folder / CHECKPOINT, weights_only=True)
    torch.save({**state, "arrays": {k: v[..., :1] for k, v in state["arrays"].items()}}, folder / CHECKPOINT)


def _bad_strategy_state(folder):
    state = torch.load(folder / CHECKPOINT, weights_only=True)
    torch.save({**state, "strategy": {"rng": 3}}, folder / CHECKPOINT)


def _a_folder(folder):
    (folder / CHECKPOINT).unlink()
    (folder / CHECKPOINT).mkdir()
    (folder / CHECKPOINT / "x").write_text("x")


def _not_torch(folder):
    (folder / CHECKPOINT).write_bytes(b"not a torch file\n")


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_missing_keys, "missing arrays, seconds"),
        (_wrong_types, "wrong type for round, strategy"),
        (_wrong_shapes, "its arrays do not match the model"),
        (_bad_strategy_state, "its strategy state does not fit"),
        (_a_folder, "unreadable (IsADirectoryError"),
        (_not_torch, "unreadable ("),
    ],
)
def test_a_damaged_checkpoint_is_set_aside(tmp_path, caplog, damage, problem):
    folder = tmp_path / "run"
    crashed_run(folder)
    damage(folder)
    summary = finish(folder, caplog)
    assert f"damaged checkpoint {folder / CHECKPOINT}: {problem}" in caplog.text
    assert "moved to checkpoint.pt.damaged, starting from round 0" in caplog.text
    assert os.path.lexists(folder / (CHECKPOINT + ".damaged"))
    assert summary["resumed_after_round"] is None


# --- sweeps -------------------------------------------------------------------------


def test_a_sweep_run_holds_its_folders_lock_and_skips_a_folder_in_use(tmp_path):
    import fcntl

    from fedsim.sweep import load_sweep, run_sweep

    (tmp_path / "base.toml").write_text('strategy = "fedavg"\nnum-nodes = 4\n')
    sweep = tmp_path / "s.toml"
    sweep.write_text(f'base = "base.toml"\nresults-dir = "{tmp_path / "out"}"\n[grid]\nseed = [0, 1]\n')
    runs = load_sweep(sweep)
    held = []

    def execute(cfg):
        fd = os.open(Path(cfg.results_dir) / LOCK, os.O_RDWR)
        try:  # another open file description cannot take it: the sweep holds the flock
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        held.append(Path(cfg.results_dir).name)
        return Path(cfg.results_dir)

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(runs[0].folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # e.g. a `fedsim run` on that folder
        echoed = []
        results = [what for _, what in run_sweep(runs, execute, echo=echoed.append)]
    finally:
        stop(holder)
    assert results == ["busy", "ran"] and held == ["seed=1"]
    assert f"in use by another fedsim process (pid {holder.pid})" in echoed[0]
    assert not (runs[0].folder / ".claim").exists() and runs[0].status() == "todo"  # the lock file alone is no result
    lock_run_folder(runs[1].folder).release()  # released after the run


def test_a_run_that_raises_releases_its_folders_lock(tmp_path, monkeypatch):
    """The lock goes with the run however it ends, not only when the summary is written."""
    from flwr.app import Context, RecordDict

    from fedsim import run_folder
    from fedsim.client_app import app as client_app
    from fedsim.engine.inprocess import InProcessGrid
    from fedsim.server_app import app as server_app
    from fedsim.strategies.base import FedsimStrategy

    def crash(*args, **kwargs):
        raise Crash("round loop died")

    monkeypatch.setattr(FedsimStrategy, "run", crash)
    folder = tmp_path / "run"
    cfg = load_config({**SMALL, "results-dir": str(folder)}).to_mapping()
    try:
        server_app(InProcessGrid(client_app, 4, cfg), Context(1, 1, {}, RecordDict(), cfg))
    except Crash as err:
        kept = err.__traceback__  # as a notebook keeps the last traceback: its frames keep the run's objects alive
    assert kept is not None and folder.resolve() not in run_folder._held


# --- RunFolder: the layout in one place ---------------------------------------------


def test_run_folder_names_each_file_of_the_layout(tmp_path):
    run = RunFolder(str(tmp_path / "run"))  # a str is taken as a Path
    assert run.path == tmp_path / "run"
    names = {
        "config": "config.json", "rounds": "rounds.csv", "summary": "summary.json", "checkpoint": "checkpoint.pt",
        "lock": ".lock", "model": "model.pt", "label_counts": "label_counts.csv",
    }
    assert {prop: getattr(run, prop) for prop in names} == {prop: tmp_path / "run" / name for prop, name in names.items()}
    with pytest.raises(AttributeError):
        run.path = tmp_path  # frozen
    assert RunFolder(tmp_path / "run") == run and len({run, RunFolder(tmp_path / "run")}) == 1


def test_a_finished_run_folder_and_add_to_summary(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.is_empty() and not run.finished and run.state() is None and run.read_summary() is None
    with lock_run_folder(run.path):
        (run.path / ".claim").write_text("host 1\n")
        assert run.is_empty()  # its lock and an old claim file (fedsim before issue #14) are no result
        run.write_config({"lr": 0.1})
        assert not run.is_empty() and run.read_config() == {"lr": 0.1} and not run.finished
        run.write_summary({"rounds": 3, "seed": 0})
        assert run.finished and run.state() == "finished"
        # the caller holds the lock: add_to_summary takes it again (re-entrant)
        new = run.add_to_summary(engine_settings={"engine": "inprocess", "threads": 1, "workers": 2})
    assert new == run.read_summary() == {"rounds": 3, "seed": 0, "engine_settings": {"engine": "inprocess", "threads": 1, "workers": 2}}
    run.add_to_summary(engine_settings={"threads": 4}, note="x")  # replaces a key, adds another
    assert run.read_summary() == {"rounds": 3, "seed": 0, "engine_settings": {"threads": 4}, "note": "x"}
    assert sorted(p.name for p in run.path.iterdir()) == [".claim", LOCK, "config.json", SUMMARY]  # no temporary file left


def test_add_to_summary_replaces_the_file_atomically(tmp_path, monkeypatch):
    """A write that fails before the rename leaves the old summary whole."""
    run = RunFolder(tmp_path)
    run.write_summary({"rounds": 3})
    before = run.summary.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        run.add_to_summary(engine_settings={"threads": 1})
    assert run.summary.read_bytes() == before


def test_add_to_summary_needs_the_folder_lock(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.write_summary({"rounds": 3})
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run.path)], cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy):
            run.add_to_summary(engine_settings={"threads": 1})
    finally:
        stop(holder)
    assert run.read_summary() == {"rounds": 3}


@pytest.mark.parametrize("content", [None, b"", b'{"rounds": 3', b"[1, 2]", b"\xff\xfe"])
def test_a_missing_or_damaged_summary(tmp_path, content):
    """read_summary is None; add_to_summary refuses and leaves the file as it was."""
    run = RunFolder(tmp_path)
    if content is not None:
        run.summary.write_bytes(content)
    assert run.read_summary() is None
    assert run.finished == (content is not None)  # finished means the file exists, readable or not
    with pytest.raises(ValueError, match="missing or not a JSON object"):
        run.add_to_summary(engine_settings={"threads": 1})
    assert (run.summary.read_bytes() if run.summary.exists() else None) == content


def test_remove_all_but_lock(tmp_path):
    run = RunFolder(tmp_path / "run")
    with lock_run_folder(run.path):
        (run.path / ".claim").write_text("host 1\n")
        run.write_config({"lr": 0.1})
        (run.path / "checkpoint.pt.damaged").mkdir()
        (run.path / "notes.txt").write_text("x")
        run.remove_all_but_lock()
    assert sorted(p.name for p in run.path.iterdir()) == [LOCK]


# --- engine settings in summary.json ------------------------------------------------


def test_fedsim_run_records_threads_and_workers_in_the_summary(tmp_path, capsys):
    from fedsim.cli import main

    folder = tmp_path / "run"
    argv = ["run", str(QUICK), "--set", "num-server-rounds=2", "--results-dir", str(folder), "--threads", "1", "--workers", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    summary = RunFolder(folder).read_summary()
    assert summary["engine_settings"] == {
        "engine": "inprocess", "threads": 1, "workers": 2, "cpus_per_client": None, "gpus_per_client": None,
    }
    assert summary["rounds"] == 2 and summary["engine"] == "inprocess"  # the ServerApp's own keys stay
    assert main([*argv[:-4], "--overwrite"]) == 0  # the defaults: one thread, workers "auto"
    assert RunFolder(folder).read_summary()["engine_settings"] == {
        "engine": "inprocess", "threads": 1, "workers": "auto", "cpus_per_client": None, "gpus_per_client": None,
    }


def test_run_engine_on_flower_records_its_resources_and_raises_for_a_failed_run(tmp_path, monkeypatch):
    """The dispatcher's Flower branch, with Flower's runtime replaced by a stand-in that
    writes the summary its ServerApp would (a failed run: Flower's runtime only logs it)."""
    from fedsim.engine import flower_runtime, run_engine
    from fedsim.errors import RunFailed

    calls = []

    def fake_run_flower(cfg, cpus_per_client, gpus_per_client, echo, app=None, ray_address=None):
        calls.append((type(cfg), cpus_per_client, gpus_per_client, echo))
        RunFolder(cfg.results_dir).write_summary({"rounds": 4, "failed": "no round had min-replies=1 valid replies"})
        return Path(cfg.results_dir)

    monkeypatch.setattr(flower_runtime, "run_flower", fake_run_flower)
    cfg = load_config({**SMALL, "device": "cpu", "results-dir": str(tmp_path)})
    with pytest.raises(RunFailed, match="no round had min-replies=1"):
        run_engine(cfg, "flower", cpus_per_client=2.0, quiet=True)
    assert calls == [(RunConfig, 2.0, 0.0, False)]  # the typed config; device cpu: no GPU share
    assert RunFolder(tmp_path).read_summary()["engine_settings"] == {
        "engine": "flower", "threads": None, "workers": None, "cpus_per_client": 2.0, "gpus_per_client": 0.0,
    }
    with pytest.raises(ConfigError, match="--workers and --threads set the inprocess engine"):
        run_engine(cfg, "flower", threads=2)
    with pytest.raises(ConfigError, match="engine 'ray'"):
        run_engine(cfg, "ray")
    assert len(calls) == 1
