#!/usr/bin/env python
"""Row 5 of the engine benchmark: cross-device scale, how a round's cost grows with the
number of clients that exist.

    python benchmarks/bench_scale.py            # N = 1,000 / 10,000 / 100,000, both models
    python benchmarks/bench_scale.py --quick    # smoke run: 4 rounds, N = 1,000 and 10,000
    python benchmarks/bench_engines.py --rows 5 # the same row inside the engine benchmark

FedAvg on MNIST, 100 clients per round (fraction-train = 100 / N), every client holding
20 examples drawn from the whole set (partitioning "sample:20", so that a client's work is
the same at every N and N may exceed MNIST's 60,000), E = 1, B = 20 (one local step: the
framework's cost is then a measurable part of a client-round), lr 0.1, models
mnist-logreg and mnist-2nn. For each N, side by side in one run, in alternating blocks
(engine, bare, engine, bare; each side's faster block counts):

- the in-process engine as ``fedsim run --workers 1`` runs it (a child process);
- the bare loop (no framework: the same sampled clients, the same client views built on
  a client's first visit and kept as the engine keeps them, the same local SGD with the
  same generator streams, the same example-weighted mean, in one process); it is
  checked to end with the same model;
- Flower's simulation runtime (``--engine flower``: SuperLink + Ray) at N <= 10,000.

Framework cost per client-round = (engine s/round - bare s/round) / 100. Start-up = the
in-process run's time before its first round (plan, partitions, nodes, server set-up,
data loading and the round-0 evaluation; imports excluded). Peak RSS per child process.
Memory per client: bytes of server bookkeeping per client it has heard from (tracemalloc
over a strategy's record of 100,000 replies) and per client that exists only (RSS of the
plan and the grid at N = 100,000 minus at N = 1,000, divided by the difference).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MNIST_DIR = PROJECT_ROOT.parent / "shared" / "data" / "mnist"
PER_ROUND = 100  # clients per round at every N
FIRST_NODE_ID = 1001  # fedsim.engine.inprocess.FIRST_NODE_ID (not imported: this module imports no fedsim at top level)
RATIO_TARGET = 1.5  # framework cost per client-round, largest / smallest N
STARTUP_TARGET_S = 10.0  # at N = 100,000


def progress(text: str) -> None:
    print(f"[bench-scale] {text}", file=sys.stderr, flush=True)


def scale_config(model: str, n: int, rounds: int, mnist_dir: Path, seed: int = 0) -> dict[str, Any]:
    return {
        "strategy": "fedavg", "dataset": "mnist", "data-dir": str(mnist_dir), "model": model, "num-nodes": n,
        "fraction-train": PER_ROUND / n, "partitioning": "sample:20", "batch-size": 20, "local-epochs": 1, "lr": 0.1,
        "num-server-rounds": rounds, "eval-every": rounds, "seed": seed,
    }


def sampled_partitions(n: int, rounds: int, seed: int, per_round: int = PER_ROUND) -> list[list[int]]:
    """The partition ids FedsimStrategy samples each round: ``random.Random(seed)`` drawing
    round(C N) of the sorted node ids (fedsim.strategies.base.configure_train)."""
    rng = random.Random(seed)
    nodes = list(range(FIRST_NODE_ID, FIRST_NODE_ID + n))
    k = max(1, per_round)
    return [[node - FIRST_NODE_ID for node in sorted(rng.sample(nodes, k))] for _ in range(rounds)]


# --- children -----------------------------------------------------------------------------


def run_child(cmd: list[str], log: Path, what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``cmd`` in a fresh process, its output to ``log``; its last BENCH line as a dict, plus wall time."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{what} child failed ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
    found = [ln for ln in log.read_text().splitlines() if ln.startswith("BENCH ")]
    return {**json.loads(found[-1][len("BENCH "):]), "wall_s": wall}


def child(kind: str, cfg: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run ``--child-<kind>`` in a fresh process; its BENCH line as a dict, plus wall time."""
    return run_child([sys.executable, str(Path(__file__).resolve()), f"--child-{kind}", json.dumps(cfg)], log, kind)


def steady(stamps: list[float]) -> float:
    """The median s/round over rounds 2..R (round 1 also pays first-call costs; the median,
    not the mean, so that a round slowed by another process does not count)."""
    import itertools
    import statistics

    return statistics.median(b - a for a, b in itertools.pairwise(stamps))


def child_engine(cfg: dict[str, Any]) -> dict[str, Any]:
    """The in-process engine, as ``fedsim run --workers W`` (W: ``bench-workers``, default 1)."""
    import csv

    import torch

    from fedsim.engine.runner import run_inprocess

    workers = cfg.pop("bench-workers", 1)
    t0 = time.perf_counter()
    out = run_inprocess(cfg, threads=1, quiet=True, workers=workers)
    run_s = time.perf_counter() - t0
    with open(out / "rounds.csv", newline="") as f:
        rows = {int(r["round"]): float(r["seconds"]) for r in csv.DictReader(f)}
    stamps = [rows[r] for r in sorted(rows) if r >= 1]
    summary = json.loads((out / "summary.json").read_text())
    model = torch.load(out / "model.pt", weights_only=True) if (out / "model.pt").exists() else None
    return {"per_round_s": steady(stamps), "round_seconds": stamps, "run_s": run_s, "strategy_s": summary.get("wall_seconds"),
            "startup_s": run_s - float(summary.get("wall_seconds") or 0.0) + rows.get(0, 0.0),
            "final_test_accuracy": summary.get("final_test_accuracy"), "maxrss_mb": _maxrss_mb(), "has_model": model is not None}


def child_bare(cfg: dict[str, Any]) -> dict[str, Any]:
    """FedAvg with no framework over the engine's sampled clients (module docstring)."""
    import functools

    import numpy as np
    import torch

    from fedsim.clients.tasks import LocalData, local_epochs
    from fedsim.core.aggregate import weighted_mean
    from fedsim.engine.runner import keep_freed_memory
    from fedsim.models import build_model
    from fedsim.plan import server_plan
    from fedsim.runtime import MAX_CLIENT_VIEWS
    from fedsim.seeding import generator
    from fedsim.validation import load_config

    torch.set_num_threads(1)
    keep_freed_memory()
    out = cfg.pop("bare-out")
    c = load_config(cfg)
    plan = server_plan(c)  # the same data, partitions and batch size as the engine's
    x, y = plan.splits.x_train, plan.splits.y_train
    model = build_model(plan.model, num_classes=plan.num_classes, seed=c.seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    @functools.lru_cache(maxsize=MAX_CLIENT_VIEWS)
    def view(pid: int) -> LocalData:
        """The client's data view, built on its first visit and kept as the engine keeps
        them (at most MAX_CLIENT_VIEWS, least recently used dropped first)."""
        return LocalData(x, y, torch.from_numpy(plan.partitions[pid].astype(np.int64)))

    stamps, t0 = [], time.perf_counter()
    for rnd, chosen in enumerate(sampled_partitions(c.num_nodes, c.num_server_rounds, c.seed), start=1):
        uploads, weights = [], []
        for pid in chosen:
            model.load_state_dict(state)
            data = view(pid)
            local_epochs(model, data, c.option("local-epochs"), plan.batch_sizes[pid], c.lr, generator(c.seed, pid, rnd))
            uploads.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(len(data))
        state = {k: weighted_mean([u[k].double() for u in uploads], weights).to(v.dtype) for k, v in state.items()}
        stamps.append(time.perf_counter() - t0)
    torch.save(state, out)
    return {"per_round_s": steady(stamps), "round_seconds": stamps, "maxrss_mb": _maxrss_mb()}


def child_memory(cfg: dict[str, Any]) -> dict[str, Any]:
    """Bytes per idle client (plan + grid RSS, N large vs small) and per heard-from client
    (tracemalloc over the strategy's bookkeeping of ``heard`` replies)."""
    import gc
    import tracemalloc

    from fedsim.arrays import to_array_record
    from fedsim.client_app import app as client_app
    from fedsim.engine.inprocess import InProcessGrid
    from fedsim.models import build_model
    from fedsim.plan import server_plan
    from fedsim.protocol import ModelSpec, ReplyMetrics, array_spec
    from fedsim.strategies import Reply, build_strategy
    from fedsim.validation import load_config

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    small, large, heard = cfg["small"], cfg["large"], cfg["heard"]
    base = {k: v for k, v in cfg.items() if k not in ("small", "large", "heard")}
    keep = []
    server_plan(load_config({**base, "num-nodes": small, "fraction-train": PER_ROUND / small}))  # data loaded once
    gc.collect()
    r0 = rss()
    for n in (small, large):
        c = load_config({**base, "num-nodes": n, "fraction-train": PER_ROUND / n})
        keep.append((server_plan(c), InProcessGrid(client_app, n, c.to_mapping())))
        gc.collect()
        if n == small:
            r1 = rss()
    r2 = rss()
    idle = ((r2 - r1) - (r1 - r0)) / (large - small)
    plan = keep[-1][0]
    net = build_model(plan.model, num_classes=plan.num_classes, seed=0)
    spec = ModelSpec.of(array_spec(to_array_record({k: v.numpy() for k, v in net.state_dict().items()})), [n for n, _ in net.named_parameters()])
    strategy = build_strategy(load_config({**base, "num-nodes": large}), spec, num_partitions=large)
    replies = [Reply(FIRST_NODE_ID + i, ReplyMetrics(num_examples=100, train_loss=0.5, partition_id=i, batch_size=10, cuda_device=-1), None, None)
               for i in range(heard)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    strategy._remember(replies)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"idle_bytes_per_client": idle, "heard_bytes_per_client": (after - before) / heard, "rss_small_mb": (r1 - r0) / 2**20,
            "rss_large_mb": (r2 - r1) / 2**20, "maxrss_mb": _maxrss_mb()}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- pfl-research ---------------------------------------------------------------------------

PFL_INSTALL = "python -m venv benchmarks/.pfl-venv && benchmarks/.pfl-venv/bin/pip install 'pfl[pytorch]'"


def find_pfl_python(given: str | None) -> Path | None:
    """The Python of pfl-research's own venv: ``given``, else $FEDSIM_PFL_PYTHON, else
    ``benchmarks/.pfl-venv/bin/python``; None when it is missing or cannot import pfl."""
    candidate = Path(given or os.environ.get("FEDSIM_PFL_PYTHON") or PROJECT_ROOT / "benchmarks" / ".pfl-venv" / "bin" / "python")
    if not candidate.exists():
        return None
    probe = subprocess.run([str(candidate), "-c", "import pfl, torch"], capture_output=True)
    return candidate if probe.returncode == 0 else None


def write_pfl_spec(cfg: dict[str, Any], workdir: Path, tag: str) -> Path:
    """The clients fedsim samples for ``cfg``, their examples, the initial model and the
    test set, written for ``pfl_fedavg.py`` (its docstring)."""
    import numpy as np
    import torch

    from fedsim.models import build_model
    from fedsim.plan import server_plan
    from fedsim.validation import load_config

    c = load_config(cfg)
    plan = server_plan(c)
    cohorts = sampled_partitions(c.num_nodes, c.num_server_rounds, c.seed, per_round=c.clients_per_round)
    users = sorted({p for cohort in cohorts for p in cohort})
    slot = {p: i for i, p in enumerate(users)}
    held = [np.asarray(plan.partitions[p], dtype=np.int64) for p in users]
    rows = np.concatenate(held)
    keep, rows_local = np.unique(rows, return_inverse=True)  # only the examples the sampled clients hold
    x, y = plan.splits.x_train[torch.from_numpy(keep)], plan.splits.y_train[torch.from_numpy(keep)]
    data, init = workdir / f"{tag}-pfl.npz", workdir / f"{tag}-pfl-init.pt"
    np.savez(data, x=x.numpy(), y=y.numpy(), user_rows=rows_local.astype(np.int64), user_offsets=np.cumsum([0] + [len(h) for h in held]),
             cohorts=np.array([[slot[p] for p in cohort] for cohort in cohorts], dtype=np.int64),
             test_x=plan.splits.x_test.numpy(), test_y=plan.splits.y_test.numpy())
    torch.save(build_model(plan.model, num_classes=plan.num_classes, seed=c.seed).state_dict(), init)
    spec = workdir / f"{tag}-pfl.json"
    spec.write_text(json.dumps({"data": str(data), "init": str(init), "model": plan.model.name, "num_classes": plan.num_classes, "lr": c.lr,
                                "local_epochs": c.option("local-epochs"), "batch_size": plan.batch_sizes[users[0]]}))
    return spec


def child_pfl(pfl_python: Path, spec: Path, log: Path, procs: int = 1) -> dict[str, Any]:
    """pfl_fedavg.py on ``spec`` in pfl's venv: one process, or ``procs`` under torchrun."""
    script = str(Path(__file__).resolve().parent / "pfl_fedavg.py")
    cmd = [str(pfl_python), script, str(spec)] if procs == 1 else [
        str(pfl_python.parent / "torchrun"), f"--nproc_per_node={procs}", "--standalone", script, str(spec)]
    r = run_child(cmd, log, "pfl", {"PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"})
    return {**r, "per_round_s": steady(r["round_stamps"])}


def run_flower(cfg: dict[str, Any], workdir: Path, name: str, cpus: float) -> dict[str, Any]:
    """Flower's simulation runtime on the same config (bench_engines.run_flower_timed)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_engines import run_flower_timed

    r = run_flower_timed(cfg, workdir, name, "cpu", cpus, 0.0)
    return {"per_round_s": steady(r["round_seconds"]), "round_seconds": r["round_seconds"], "wall_s": r["wall_s"]}


# --- the row ------------------------------------------------------------------------------


def same_model(engine_dir: Path, bare_file: Path) -> float | None:
    """max |engine final - bare final| over the model's entries (None: no saved model)."""
    import torch

    from fedsim.checkpoint import CHECKPOINT

    a_path = engine_dir / "model.pt"
    if not a_path.exists():
        a_path = engine_dir / CHECKPOINT
    if not a_path.exists():
        return None
    a = torch.load(a_path, weights_only=True)
    a = a.get("arrays", a) if isinstance(a, dict) else a
    b = torch.load(bare_file, weights_only=True)
    diffs = [float((torch.as_tensor(a[k]).double() - b[k].double()).abs().max()) for k in b if k in a]
    return max(diffs) if diffs else None


def fastest(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """The block with the least s/round, with every block's s/round beside."""
    best = dict(min(blocks, key=lambda r: r["per_round_s"]))
    best["blocks_per_round_s"] = [r["per_round_s"] for r in blocks]
    best["startup_s"] = min(r["startup_s"] for r in blocks) if all("startup_s" in r for r in blocks) else None
    return best


def pfl_rows(tag: str, eng: dict[str, Any], pfl: dict[str, Any], what: str, target: bool) -> list[dict[str, Any]]:
    """Table rows for fedsim beside pfl-research: s/round (``target``: at most pfl's),
    start-up, accuracy."""
    return [
        {"row": f"{tag}: s/round (other = pfl-research, {what}; ratio = fedsim/pfl)", "in-process": f"{eng['per_round_s']:.4f} s",
         "other": f"{pfl['per_round_s']:.4f} s", "ratio": eng["per_round_s"] / pfl["per_round_s"], "target": "≤ 1.0×" if target else "—",
         "pass": eng["per_round_s"] <= pfl["per_round_s"] if target else None},
        {"row": f"{tag}: start-up s, imports excluded (other = pfl-research; ratio = fedsim/pfl); final test accuracy",
         "in-process": f"{eng['startup_s']:.1f} s; {eng['final_test_accuracy']:.4f}", "other": f"{pfl['startup_s']:.1f} s; {pfl['final_test_accuracy']:.4f}",
         "ratio": eng["startup_s"] / pfl["startup_s"], "target": "—", "pass": None},
    ]


def row5_blocks(
    workdir: Path, model: str, cfgs: dict[int, dict[str, Any]], reps: int, pfl_python: Path | None
) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """Every block of row 5 for one model: per N, ``reps`` engine, bare (and pfl) runs.

    The rep loop is outermost, so every N gets a block in every stretch of time: the
    machine's drift over minutes (up to 40% on 2026-12-04) falls on all N alike, not on
    whichever N ran last."""
    specs = {n: write_pfl_spec(cfg, workdir, f"row5-{model}-{n}") if pfl_python else None for n, cfg in cfgs.items()}
    blocks: dict[int, dict[str, list[dict[str, Any]]]] = {n: {"engine": [], "bare": [], "pfl": []} for n in cfgs}
    for rep in range(reps):
        for n, cfg in cfgs.items():
            tag, got, spec = f"row5-{model}-{n}", blocks[n], specs[n]
            progress(f"{tag}: in-process engine (--workers 1), {cfg['num-server-rounds']} rounds, block {rep + 1}/{reps}")
            got["engine"].append(child("engine", {**cfg, "results-dir": str(workdir / f"{tag}-{rep}")}, workdir / f"{tag}-{rep}.log"))
            progress(f"{tag}: bare loop over the same clients, block {rep + 1}/{reps}")
            got["bare"].append(child("bare", {**cfg, "bare-out": str(workdir / f"{tag}-bare.pt")}, workdir / f"{tag}-bare.log"))
            if pfl_python and spec:
                progress(f"{tag}: pfl-research FedAvg on the same clients (one process), block {rep + 1}/{reps}")
                got["pfl"].append(child_pfl(pfl_python, spec, workdir / f"{tag}-pfl.log"))
    return blocks


def row5(
    workdir: Path, rounds: int, mnist_dir: Path, sizes: list[int], flower_sizes: list[int], models: list[str], cpus: float = 1.0, reps: int = 2,
    pfl_python: Path | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Row 5's table rows and raw runs (module docstring)."""
    rows: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    for model in models:
        cost: dict[int, float] = {}
        cfgs = {n: scale_config(model, n, rounds, mnist_dir) for n in sizes}
        blocks = row5_blocks(workdir, model, cfgs, reps, pfl_python)
        for n in sizes:
            cfg, tag = cfgs[n], f"row5-{model}-{n}"
            engs, bares, pfls = blocks[n]["engine"], blocks[n]["bare"], blocks[n]["pfl"]
            eng, bare = fastest(engs), fastest(bares)
            cost[n] = (eng["per_round_s"] - bare["per_round_s"]) / PER_ROUND
            run = {"config": cfg, "inprocess": eng, "bare": bare, "framework_ms_per_client_round": 1e3 * cost[n],
                   "same_model_max_abs_diff": same_model(workdir / f"{tag}-0", workdir / f"{tag}-bare.pt")}
            if n in flower_sizes:
                progress(f"{tag}: Flower simulation runtime (SuperLink + Ray, {cpus:g} CPU per client)")
                run["flower"] = run_flower(cfg, workdir, f"{tag}-flower", cpus)
            runs[tag] = run
            fl = run.get("flower")
            progress(f"  in-process {eng['per_round_s']:.4f} s/round, bare {bare['per_round_s']:.4f}, framework {1e3 * cost[n]:.3f} ms/client-round, "
                     f"start-up {eng['startup_s']:.1f} s, peak RSS {eng['maxrss_mb']:.0f} MB" + (f", Flower {fl['per_round_s']:.3f} s/round" if fl else ""))
            rows.append({"row": f"5 {model} N={n:,}: s/round (other = bare loop; ratio = in-process/bare)",
                         "in-process": f"{eng['per_round_s']:.4f} s", "other": f"{bare['per_round_s']:.4f} s",
                         "ratio": eng["per_round_s"] / bare["per_round_s"], "target": "—", "pass": None})
            rows.append({"row": f"5 {model} N={n:,}: framework ms per client-round; start-up s; peak RSS MB",
                         "in-process": f"{1e3 * cost[n]:.3f} ms; {eng['startup_s']:.1f} s; {eng['maxrss_mb']:.0f} MB", "other": "—",
                         "ratio": None, "target": f"start-up < {STARTUP_TARGET_S:g} s at 100,000" if n == 100_000 else "—",
                         "pass": eng["startup_s"] < STARTUP_TARGET_S if n == 100_000 else None})
            if fl:
                rows.append({"row": f"5 {model} N={n:,}: s/round (other = Flower runtime; ratio = Flower/in-process)",
                             "in-process": f"{eng['per_round_s']:.4f} s", "other": f"{fl['per_round_s']:.4f} s",
                             "ratio": fl["per_round_s"] / eng["per_round_s"], "target": "—", "pass": None})
            if pfls:
                run["pfl"] = fastest(pfls)
                rows += pfl_rows(f"5 {model} N={n:,}", eng, run["pfl"], "one process", target=False)
        spread = max(cost.values()) / min(cost.values()) if min(cost.values()) > 0 else None
        rows.append({"row": f"5 {model}: framework cost per client-round, largest / smallest over N = {', '.join(f'{n:,}' for n in sizes)}",
                     "in-process": ", ".join(f"{1e3 * cost[n]:.3f}" for n in sizes) + " ms", "other": "—", "ratio": spread,
                     "target": f"≤ {RATIO_TARGET}×", "pass": spread is not None and spread <= RATIO_TARGET})
    if len(sizes) > 1:
        progress("memory per client (plan + grid at the smallest and largest N; strategy bookkeeping)")
        mem = child("memory", {**scale_config(models[0], sizes[0], rounds, mnist_dir), "small": sizes[0], "large": sizes[-1], "heard": sizes[-1]},
                    workdir / "row5-memory.log")
        runs["row5-memory"] = mem
        rows.append({"row": f"5 memory: bytes per client that exists only (N={sizes[-1]:,} vs {sizes[0]:,}); per client heard from (server bookkeeping)",
                     "in-process": f"{mem['idle_bytes_per_client']:.0f} B; {mem['heard_bytes_per_client']:.0f} B", "other": "—", "ratio": None,
                     "target": "—", "pass": None})
    return rows, runs


def pfl_config(n: int, rounds: int, mnist_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Row 6: FedAvg on MNIST, mnist-2nn, IID, E = 1, B = 10, lr 0.1, 100 of N per round."""
    return {**scale_config("mnist-2nn", n, rounds, mnist_dir, seed), "partitioning": "iid", "batch-size": 10}


def row6(
    workdir: Path, rounds: int, mnist_dir: Path, sizes: list[int], pfl_python: Path | None, cores: list[int], reps: int = 2,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Row 6 (issue #26): fedsim beside pfl-research on cross-device FedAvg, side by side in
    alternating blocks: one core (``--workers 1`` vs one pfl process) and all cores
    (``--workers auto`` vs pfl under ``torchrun --nproc_per_node=cores``)."""
    if pfl_python is None:
        progress(f"row 6 skipped: pfl-research is not installed (install it in its own venv: {PFL_INSTALL}; or --pfl-python PATH)")
        return [{"row": "6 fedsim vs pfl-research: skipped, pfl-research not installed", "in-process": "—", "other": "—", "ratio": None,
                 "target": "—", "pass": None}], {}
    rows: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    for n in sizes:
        cfg = pfl_config(n, rounds, mnist_dir)
        spec = write_pfl_spec(cfg, workdir, f"row6-{n}")
        for k in cores:
            tag = f"row6-{n}-{k}core"
            workers: int | str = 1 if k == 1 else "auto"
            engs, pfls = [], []
            for rep in range(reps):
                progress(f"{tag}: in-process engine (--workers {workers}), {rounds} rounds, block {rep + 1}/{reps}")
                engs.append(child("engine", {**cfg, "bench-workers": workers, "results-dir": str(workdir / f"{tag}-{rep}")}, workdir / f"{tag}-{rep}.log"))
                progress(f"{tag}: pfl-research ({'one process' if k == 1 else f'torchrun, {k} processes'}), block {rep + 1}/{reps}")
                pfls.append(child_pfl(pfl_python, spec, workdir / f"{tag}-pfl.log", procs=k))
            eng, pfl = fastest(engs), fastest(pfls)
            runs[tag] = {"config": cfg, "inprocess": eng, "pfl": pfl}
            progress(f"  fedsim {eng['per_round_s']:.4f} s/round, pfl {pfl['per_round_s']:.4f}: ratio {eng['per_round_s'] / pfl['per_round_s']:.2f}; "
                     f"start-up {eng['startup_s']:.1f} vs {pfl['startup_s']:.1f} s; accuracy {eng['final_test_accuracy']:.4f} vs {pfl['final_test_accuracy']:.4f}")
            what = "one process" if k == 1 else f"torchrun --nproc_per_node={k}"
            rows += pfl_rows(f"6 mnist-2nn N={n:,}, {k} core{'s' if k > 1 else ''} (--workers {workers})", eng, pfl, what, target=True)
    return rows, runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 4 rounds, N = 1,000 and 10,000, mnist-logreg, no Flower")
    p.add_argument("--rounds", type=int, help="rounds per run (default 30; --quick 4)")
    p.add_argument("--reps", type=int, help="alternating engine/bare blocks per N (default 2; --quick 1)")
    p.add_argument("--sizes", default="1000,10000,100000", help="numbers of clients N (default 1000,10000,100000)")
    p.add_argument("--flower-sizes", default="1000,10000", help="the N at which Flower's runtime runs too ('' for none)")
    p.add_argument("--models", default="mnist-logreg,mnist-2nn")
    p.add_argument("--mnist-dir", default=str(DEFAULT_MNIST_DIR))
    p.add_argument("--rows", default="5", help="5 (scale), 6 (beside pfl-research) or 5,6 (default 5)")
    p.add_argument("--pfl-sizes", default="1000,10000,60000", help="row 6: numbers of clients N (default 1000,10000,60000)")
    p.add_argument("--pfl-python", help=f"the Python of pfl-research's venv (default $FEDSIM_PFL_PYTHON, else benchmarks/.pfl-venv/bin/python; make it: {PFL_INSTALL})")
    p.add_argument("--out", help="JSON results file (default benchmarks/results-<date>-scale.json)")
    for kind in ("engine", "bare", "memory"):
        p.add_argument(f"--child-{kind}", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for kind, fn in (("engine", child_engine), ("bare", child_bare), ("memory", child_memory)):
        given = getattr(args, f"child_{kind}")
        if given:
            print("BENCH " + json.dumps(fn(json.loads(given))), flush=True)
            return 0
    sizes = [1000, 10000] if args.quick else [int(x) for x in args.sizes.split(",") if x]
    flower = [] if args.quick else [int(x) for x in args.flower_sizes.split(",") if x]
    models = ["mnist-logreg"] if args.quick else [m for m in args.models.split(",") if m]
    rounds = args.rounds or (4 if args.quick else 30)
    reps = args.reps or (1 if args.quick else 2)
    wanted = {int(x) for x in args.rows.split(",") if x.strip()}
    pfl_python = find_pfl_python(args.pfl_python)
    if pfl_python is None:
        progress(f"pfl-research not found: its rows are skipped (install it in its own venv: {PFL_INSTALL}; or --pfl-python PATH)")
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    rows, runs = [], {}
    with tempfile.TemporaryDirectory(prefix="fedsim-bench-scale-") as tmp:
        if 5 in wanted:
            rows, runs = row5(Path(tmp), rounds, Path(args.mnist_dir), sizes, flower, models, reps=reps, pfl_python=pfl_python)
        if 6 in wanted:
            pfl_sizes = [1000, 10000] if args.quick else [int(x) for x in args.pfl_sizes.split(",") if x]
            r6_rows, r6_runs = row6(Path(tmp), rounds, Path(args.mnist_dir), pfl_sizes, pfl_python, sorted({1, os.cpu_count() or 1}), reps=reps)
            rows, runs = rows + r6_rows, {**runs, **r6_runs}
    command = "python benchmarks/bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for r in rows:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        print(f"| {r['row']} | {r['in-process']} | {r['other']} | {ratio} | {r['target']} | {'' if r['pass'] is None else ('PASS' if r['pass'] else 'FAIL')} |")
    out = Path(args.out) if args.out else PROJECT_ROOT / "benchmarks" / f"results-{time.strftime('%Y-%m-%d')}-scale.json"
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command, "load_average_at_start": load,
              "load_average_at_end": os.getloadavg()[0], "cores": os.cpu_count(), "rounds": rounds, "reps": reps, "table": rows, "runs": runs,
              "wall_seconds": time.perf_counter() - t0}
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    progress(f"done in {result['wall_seconds']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
