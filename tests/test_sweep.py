"""Sweeps: expansion, validation, and resuming after the sweep process is killed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from strategy_kit import each_round

from fedsim.config import ConfigError
from fedsim.sweep import load_sweep


def _write(tmp_path, grid='strategy = ["sign-mv", "llr-vote"]\nseed = [0, 1, 2]', rounds=40):
    (tmp_path / "base.toml").write_text('strategy = "fedavg"\nnum-nodes = 4\nlr = 0.01\nllr-warmup = 2\n')
    sweep = tmp_path / "s.toml"
    sweep.write_text(f'base = "base.toml"\nresults-dir = "{tmp_path / "out"}"\n[set]\nnum-server-rounds = {rounds}\neval-every = 10\n[grid]\n{grid}\n')
    return sweep


def test_expansion_names_and_validation(tmp_path):
    runs = load_sweep(_write(tmp_path))
    assert [r.name for r in runs][:2] == ["strategy=sign-mv,seed=0", "strategy=sign-mv,seed=1"]
    assert len(runs) == 6 and all(r.status() == "todo" for r in runs)
    assert runs[4].config.strategy == "llr-vote" and runs[4].config.seed == 1 and runs[4].config.num_server_rounds == 40
    with pytest.raises(ConfigError, match="sweep point strategy=fedprox"):
        load_sweep(_write(tmp_path, grid='strategy = ["fedprox"]'))
    with pytest.raises(ConfigError, match="non-empty list"):
        load_sweep(_write(tmp_path, grid="seed = 3"))


def test_overrides_narrow_grid_keys_and_results_dir_is_refused(tmp_path):
    sweep = _write(tmp_path)
    runs = load_sweep(sweep, overrides={"seed": 1, "lr": 0.5})
    assert [r.name for r in runs] == ["strategy=sign-mv,seed=1", "strategy=llr-vote,seed=1"]
    assert all(r.config.lr == 0.5 and r.config.seed == 1 for r in runs)
    assert runs[0].folder == load_sweep(sweep)[1].folder  # the same run as in the whole sweep
    with pytest.raises(ConfigError, match="results-dir in --set would be replaced"):
        load_sweep(sweep, overrides={"results-dir": "elsewhere"})
    sweep.write_text(sweep.read_text().replace("[set]\n", '[set]\nresults-dir = "x"\n'))
    with pytest.raises(ConfigError, match=r"results-dir in \[set\]"):
        load_sweep(sweep)


def test_killed_sweep_resumes_where_it_stopped(tmp_path):
    sweep = _write(tmp_path, rounds=60)
    cmd = [sys.executable, "-m", "fedsim.cli", "sweep", str(sweep)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    runs = load_sweep(sweep)
    try:
        deadline = time.monotonic() + 240
        while not (runs[1].folder / "summary.json").exists():  # two runs finished
            assert proc.poll() is None and time.monotonic() < deadline, "sweep ended or stalled before two runs"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    done_before = {r.name: (r.folder / "summary.json").stat().st_mtime for r in runs if r.status() == "done"}
    assert 2 <= len(done_before) < len(runs)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(r.status() == "done" for r in runs)
    for name, mtime in done_before.items():  # finished runs were not run again
        assert f"{name}: done, skipped" in out.stdout
        assert (runs[0].folder.parent / name / "summary.json").stat().st_mtime == mtime
    assert f"{len(runs) - len(done_before)} ran, {len(done_before)} already done" in out.stdout
    assert json.loads((runs[-1].folder / "summary.json").read_text())["seed"] == 2


def test_two_workers_share_a_sweep_without_running_a_run_twice(tmp_path):
    sweep = _write(tmp_path, rounds=60)  # runs long enough for the two workers to overlap
    cmd = [sys.executable, "-m", "fedsim.cli", "sweep", str(sweep)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = load_sweep(sweep)
    assert all(r.status() == "done" for r in runs)
    assert not any((r.folder / ".claim").exists() for r in runs)  # claim files are gone: the folder's lock does their job
    for r in runs:  # each run was run by exactly one worker
        assert sum(out.count(f"{r.name}: running") for out in outs) == 1, outs
    assert any("is in use by another fedsim process" in out for out in outs), outs


def test_a_run_locked_by_a_live_process_is_running_and_skipped_and_a_dead_ones_lock_is_free(tmp_path):
    """Without claim files: a run whose folder another live process holds shows as running
    and is left to it; the lock of a process that died is gone with it; an old .claim file
    (written by fedsim before issue #14) is ignored."""
    from fedsim.sweep import run_sweep

    runs = load_sweep(_write(tmp_path, grid='seed = [0, 1, 2]'))
    hold = "import sys, time; from fedsim.run_folder import lock_run_folder; h = lock_run_folder(sys.argv[1]); print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(runs[1].folder)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        dead = subprocess.run([sys.executable, "-c", hold.replace("time.sleep(120)", "pass"), str(runs[0].folder)], capture_output=True, text=True)
        assert dead.stdout.strip() == "held" and (runs[0].folder / ".lock").exists()
        runs[2].folder.mkdir(parents=True)
        (runs[2].folder / ".claim").write_text("some-other-host 1\n")  # an old claim from another host
        assert [r.status() for r in runs] == ["todo", "running", "todo"]
        executed = []

        def execute(cfg):
            executed.append(cfg.seed)
            (runs[cfg.seed].folder / "config.json").write_text(json.dumps(cfg.to_mapping()))
            (runs[cfg.seed].folder / "summary.json").write_text("{}")

        said = []
        outcome = [what for _, what in run_sweep(runs, execute, echo=said.append)]
        assert outcome == ["ran", "busy", "ran"] and executed == [0, 2]
        assert any(f"in use by another fedsim process (pid {holder.pid})" in s for s in said), said
        assert runs[1].status() == "running"
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    assert [r.status() for r in runs] == ["done", "todo", "done"]  # the holder died: its run is free again


def test_a_run_made_before_a_key_existed_is_still_done_at_that_keys_default(tmp_path):
    runs = load_sweep(_write(tmp_path, grid='seed = [0]'))
    run = runs[0]
    run.folder.mkdir(parents=True)
    old_config = run.config.to_mapping()
    del old_config["node-wait"]  # as written by a fedsim without that key
    (run.folder / "config.json").write_text(json.dumps(old_config))
    (run.folder / "summary.json").write_text("{}")
    assert run.status() == "done"
    changed = load_sweep(_write(tmp_path, grid='seed = [0]'), overrides={"node-wait": 5.0})[0]
    assert changed.status() == "stale"


def test_a_finished_run_copied_elsewhere_is_still_done_there(tmp_path):
    import shutil

    run = load_sweep(_write(tmp_path, grid='seed = [0]'))[0]
    run.folder.mkdir(parents=True)
    (run.folder / "config.json").write_text(json.dumps(run.config.to_mapping()))
    (run.folder / "summary.json").write_text("{}")
    shutil.copytree(run.folder.parent, tmp_path / "stored")
    copy = load_sweep(_write(tmp_path, grid='seed = [0]'), results_dir=tmp_path / "stored")[0]
    assert copy.folder != run.folder and copy.status() == "done"


def test_a_killed_run_of_a_sweep_resumes_from_its_checkpoint(tmp_path):
    from fedsim.engine.runner import run_inprocess
    from fedsim.sweep import run_sweep

    runs = load_sweep(_write(tmp_path, grid='seed = [0]', rounds=30))

    def crash(row):
        if row.round == 23:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run_inprocess(runs[0].config.to_mapping(), callbacks=[each_round(crash)])
    assert runs[0].status() == "partial"
    said = []
    outcome = [w for _, w in run_sweep(runs, lambda cfg: run_inprocess(cfg.to_mapping()), echo=said.append)]
    assert outcome == ["ran"] and any("resuming from its checkpoint" in s for s in said), said
    assert json.loads((runs[0].folder / "summary.json").read_text())["resumed_after_round"] == 20


def test_store_copies_finished_runs_small_files_only(tmp_path):
    from fedsim.cli import main

    runs = load_sweep(_write(tmp_path, grid='seed = [0, 1]'))
    for run, finished in zip(runs, [True, False], strict=True):
        run.folder.mkdir(parents=True)
        for name in ["config.json", "rounds.csv", "model.pt", "checkpoint.pt"] + (["summary.json"] if finished else []):
            (run.folder / name).write_text(name)
    dest = tmp_path / "stored"
    assert main(["store", str(runs[0].folder.parent), str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == [runs[0].name]  # the unfinished run is left out
    assert sorted(p.name for p in (dest / runs[0].name).iterdir()) == ["config.json", "rounds.csv", "summary.json"]
    assert main(["store", str(runs[1].folder), str(tmp_path / "none")]) == 1


def test_sweep_runs_record_their_engine_settings(tmp_path, capsys):
    """`fedsim sweep --workers` and sweep_results(workers=...) both go through run_engine,
    which records the settings in each run's summary.json."""
    from fedsim.cli import main
    from fedsim.run_folder import RunFolder
    from fedsim.sweep import sweep_results

    sweep = _write(tmp_path, grid="seed = [0, 1]", rounds=2)
    assert main(["sweep", str(sweep), "--set", "seed=0", "--workers", "1", "--threads", "1"]) == 0, capsys.readouterr().err
    done = sweep_results(sweep, run_missing=True, workers=2)
    assert [r.name for r in done] == ["seed=0", "seed=1"]
    settings = [RunFolder(r.folder).read_summary()["engine_settings"] for r in done]
    assert [(s["engine"], s["threads"], s["workers"]) for s in settings] == [("inprocess", 1, 1), ("inprocess", 1, 2)]
