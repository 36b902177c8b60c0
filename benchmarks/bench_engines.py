#!/usr/bin/env python
"""Benchmark fedsim's in-process engine against Flower's simulation runtime and a bare
PyTorch loop. Every figure is a ratio of two measurements taken side by side in one run.

    python benchmarks/bench_engines.py            # full benchmark (several minutes)
    python benchmarks/bench_engines.py --quick    # smoke run: a few rounds per row

Rows (see benchmarks/README.md):
  1. signSGD-FV (llr-vote), 15 clients, batch mode 2, "full" partition, on digits
     (digits-mlp) and MNIST (fv-mnist-cnn): seconds per round, fixed cost and seconds
     per run (whole process) on the in-process engine vs Flower's runtime (Ray).
  2. The same per-round work on the in-process engine vs a bare PyTorch loop (no
     framework), one thread each, interleaved blocks; target overhead <= 1.15x.
  3. Framework cost with ~zero compute (digits-logreg, batch size 1, 15 clients):
     in-process rounds/s vs Flower rounds/s (target >= 20x) and in-process start-up
     (target < 5 s).
  4. Every core: MNIST (fv-mnist-cnn), batch modes 2 and 4, the in-process engine as
     `fedsim run` runs it (--workers auto) vs the bare loop on one thread, interleaved
     blocks; target <= 0.55x on 2 cores.
  5. Cross-device scale (benchmarks/bench_scale.py): FedAvg, 100 clients per round out
     of N = 1,000 / 10,000 / 100,000, mnist-logreg and mnist-2nn: s/round, framework cost
     per client-round (target: within 1.5x across N), start-up (target < 10 s at 100,000),
     peak RSS, memory per client; beside the bare loop and Flower's runtime (N <= 10,000).
     Not in the default --rows (it takes about 15 minutes). With pfl-research installed
     (--pfl-python, benchmarks/README.md) its FedAvg on the same clients runs beside.
  6. Beside pfl-research (benchmarks/bench_scale.py --rows 6): FedAvg, mnist-2nn, IID,
     B = 10, 100 clients per round out of N = 1,000 / 10,000 / 60,000, one core and all
     cores; target fedsim / pfl s/round <= 1.0. Not in the default --rows.

The table goes to stdout, progress to stderr, everything (with per-round times) to the
JSON file given by --out. Nothing outside a temporary folder is written except --out.
Only the standard library is imported at module level: the in-process runs of rows 1 and
3 are child processes of this script (``--child-inprocess``) so that their wall time
includes interpreter start-up and imports, like Flower's.
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime as dt
import json
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MNIST_DIR = PROJECT_ROOT.parent / "shared" / "data" / "mnist"
NUM_CLIENTS = 15
EVAL_EVERY = 1_000_000  # larger than any round count: evaluate only before round 1 and after the last
LLR_WARMUP = 5  # plain majority for the first 5 rounds, the LLR-weighted vote after
OVERHEAD_TARGET = 1.15  # row 2, MNIST: a real model
TINY_OVERHEAD_TARGET = 1.3  # rows 2 (digits) and 3: tiny models, where the framework's own work shows
ALL_CORES_TARGET = 0.55  # row 4 on 2 cores: all cores vs the one-thread bare loop
ROUNDS_PER_S_TARGET = 20.0
STARTUP_TARGET_S = 5.0

T_START = time.perf_counter()


def progress(text: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f} s] {text}", file=sys.stderr, flush=True)


# --- run configs ------------------------------------------------------------------------


def fv_config(dataset: str, rounds: int, mnist_dir: Path, seed: int = 0, mode: int = 2) -> dict[str, Any]:
    """Rows 1, 2 and 4: signSGD-FV, 15 clients, batch mode 2 (9 x B=4, 6 x B=154; row 4 also
    mode 4: 14 x B=4, 1 x B=904), full copy."""
    cfg: dict[str, Any] = {
        "strategy": "llr-vote",
        "num-server-rounds": rounds,
        "seed": seed,
        "dataset": dataset,
        "partitioning": "full",
        "model": "digits-mlp" if dataset == "digits" else "fv-mnist-cnn",
        "batch-mode": mode,
        "lr": 0.001,
        "llr-warmup": LLR_WARMUP,
        "eval-every": EVAL_EVERY,
        "num-nodes": NUM_CLIENTS,
    }
    if dataset == "mnist":
        cfg["data-dir"] = str(mnist_dir)
    return cfg


def trivial_config(rounds: int, seed: int = 0) -> dict[str, Any]:
    """Row 3: the same strategy with ~zero compute per client (logistic regression on
    digits, 650 parameters, one example per client)."""
    return {
        "strategy": "llr-vote",
        "num-server-rounds": rounds,
        "seed": seed,
        "dataset": "digits",
        "partitioning": "full",
        "model": "digits-logreg",
        "batch-size": 1,
        "lr": 0.001,
        "llr-warmup": LLR_WARMUP,
        "eval-every": EVAL_EVERY,
        "num-nodes": NUM_CLIENTS,
    }


# --- reading a results folder -----------------------------------------------------------


def round_seconds(results: Path) -> list[float]:
    """rounds.csv ``seconds`` of rounds 1..R (time since the strategy started, stamped
    when the round's result is reported, before that round's evaluation)."""
    with open(results / "rounds.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["round"]) >= 1]
    return [float(r["seconds"]) for r in sorted(rows, key=lambda r: int(r["round"]))]


def per_round(stamps: list[float]) -> float:
    """Steady per-round seconds: (s_R - s_1) / (R - 1). Round 1 is left out: it also holds
    the round-0 evaluation and every lazy first-call cost (actor start, data loading)."""
    if len(stamps) < 2:
        raise ValueError("need at least 2 rounds to time a round")
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def timed_run(kind: str, wall: float, results: Path, rounds: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    stamps = round_seconds(results)
    if len(stamps) != rounds:
        raise RuntimeError(f"{kind}: expected {rounds} rounds in {results}/rounds.csv, found {len(stamps)}")
    summary = json.loads((results / "summary.json").read_text())
    pr = per_round(stamps)
    return {
        "engine": kind,
        "rounds": rounds,
        "wall_s": wall,  # the whole run: process start(s) to exit
        "per_round_s": pr,
        "fixed_s": wall - rounds * pr,  # start-up + round-0/final evaluation + shut-down
        "strategy_wall_s": summary.get("wall_seconds"),
        "final_test_accuracy": summary.get("final_test_accuracy"),
        "round_seconds": stamps,
        **(extra or {}),
    }


# --- the two engines, each in its own process(es) ---------------------------------------


def child_env() -> dict[str, str]:
    env = os.environ.copy()
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_inprocess_child(cfg: dict[str, Any], workdir: Path, name: str, device: str) -> dict[str, Any]:
    """``run_inprocess`` in a fresh Python process; its wall time includes interpreter
    start-up, imports, data loading and model building."""
    results = workdir / name
    cfg = {**cfg, "device": device, "results-dir": str(results)}  # the run-config key: what fedsim run records
    log = workdir / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-inprocess", json.dumps(cfg)]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"in-process child failed ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
    inner = {}
    for line in log.read_text().splitlines():
        if line.startswith("BENCH-CHILD "):
            inner = json.loads(line[len("BENCH-CHILD "):])
    return timed_run("inprocess", wall, results, cfg["num-server-rounds"], {"child": inner})


def child_main(cfg_json: str) -> int:
    """Entry point of ``--child-inprocess``: one run_inprocess, timings on one line."""
    t0 = time.perf_counter()
    from fedsim.engine.runner import run_inprocess  # imports torch and flwr

    t1 = time.perf_counter()
    run_inprocess(json.loads(cfg_json), threads=1, quiet=True)  # as `fedsim run` runs it
    t2 = time.perf_counter()
    print("BENCH-CHILD " + json.dumps({"import_s": t1 - t0, "run_inprocess_s": t2 - t1}), flush=True)
    return 0


def run_flower_timed(cfg: dict[str, Any], workdir: Path, name: str, device: str, cpus: float, gpus: float) -> dict[str, Any]:
    """fedsim.engine.flower_runtime.run_flower: private SuperLink + ``flwr run`` + Ray,
    started and stopped; wall time from SuperLink start to everything stopped."""
    from fedsim.engine.flower_runtime import run_flower, stop_stragglers

    results = workdir / name
    home = workdir / f"{name}-flwr-home"
    home.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        run_flower({**cfg, "device": device, "results-dir": str(results)}, cpus_per_client=cpus, gpus_per_client=gpus, flwr_home=home, echo=False)
    finally:
        left = stop_stragglers(home)
        if left:
            progress(f"  stopped {len(left)} leftover Flower/Ray process(es): {left}")
    wall = time.perf_counter() - t0
    return timed_run("flower", wall, results, cfg["num-server-rounds"], {"cpus_per_client": cpus, "gpus_per_client": gpus})


# --- the bare PyTorch loop --------------------------------------------------------------


def bare_loop(cfg: dict[str, Any], device: str, workers: int = 1) -> dict[str, Any]:
    """signSGD-FV with no framework: for each round, for each client, draw its minibatch
    (the engine's own generator stream and batch sizes, so the very same examples),
    forward/backward, flatten the gradient, take signs (zero -> +1); then the LLR vote
    (CrossProbabilityEstimator, same warm-up) and x -= lr * U. No messages, no
    serialisation, no sign packing, no per-client model copy.

    ``workers`` > 1: the ceiling for row 4, the same loop with the clients of a round on
    ``workers`` threads (one torch thread each, a model replica per thread, clients longest
    batch first, a micro-batched client's parts shared with idle threads through the
    engine's own thread pool) and the vote's blocks on as many threads: what all cores give
    with no framework at all."""
    import threading

    import torch

    from fedsim.clients.tasks import LocalData, flat_gradient
    from fedsim.core.votes import CrossProbabilityEstimator
    from fedsim.data import load_dataset
    from fedsim.engine.runner import keep_freed_memory
    from fedsim.models import build_model
    from fedsim.parallel import block_map
    from fedsim.partitions import partition_indices
    from fedsim.partitions.batch_sizes import client_batch_sizes
    from fedsim.seeding import generator

    torch.set_num_threads(1)
    keep_freed_memory()  # the same malloc settings as run_inprocess: a difference in allocators is not the framework's
    dev = torch.device(device)
    m, seed, rounds, lr = cfg["num-nodes"], cfg["seed"], cfg["num-server-rounds"], float(cfg["lr"])
    splits = load_dataset(cfg["dataset"], cfg.get("data-dir") or None)
    x, y = splits.x_train.to(dev), splits.y_train.to(dev)
    parts = partition_indices(splits.y_train.numpy(), cfg["partitioning"], m, seed)
    data = [LocalData(x, y, torch.as_tensor(p, dtype=torch.long, device=dev)) for p in parts]
    sizes = client_batch_sizes(cfg.get("batch-size", 10), "", cfg.get("batch-mode", 0), m, seed)
    model = build_model(cfg["model"], num_classes=splits.num_classes, seed=seed).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    est = CrossProbabilityEstimator(n, warmup_rounds=cfg["llr-warmup"], device=dev, map_blocks=block_map(workers))  # one thread: truly one
    clients = list(range(m))
    signs = torch.empty(m, n, dtype=torch.int8, device=dev)
    stamps = []
    t0 = time.perf_counter()
    pool, local = None, threading.local()
    if workers > 1:
        import copy

        from fedsim.clients.tasks import part_map, trainable_parameters
        from fedsim.engine.inprocess import _Workers

        pool = _Workers(workers)
        order = sorted(clients, key=lambda c: -sizes[c])  # longest first, as the engine's plan

    def client_signs(pid: int, rnd: int, net: torch.nn.Module) -> None:
        vec, _loss, _ = flat_gradient(net, data[pid], sizes[pid], generator(seed, pid, rnd, device=dev))
        signs[pid] = torch.where(vec >= 0, 1, -1).to(torch.int8)

    def on_worker(pid: int, rnd: int, weights: torch.Tensor) -> None:
        net = getattr(local, "net", None)
        if net is None or getattr(local, "version", None) != rnd:
            if net is None:
                net = local.net = copy.deepcopy(model)
            torch.nn.utils.vector_to_parameters(weights, trainable_parameters(net))
            local.version = rnd
        with part_map(pool.map_parts):
            client_signs(pid, rnd, net)

    try:
        for rnd in range(1, rounds + 1):
            if pool is None:
                for pid in clients:
                    client_signs(pid, rnd, model)
            else:
                with torch.no_grad():
                    weights = torch.nn.utils.parameters_to_vector(params).detach()
                futures = [pool.submit(lambda pid=pid, rnd=rnd, weights=weights: on_worker(pid, rnd, weights)) for pid in order]
                for f in futures:
                    f.result()
            u = est.vote(clients, signs)
            with torch.no_grad():
                vec = torch.nn.utils.parameters_to_vector(params)
                vec = vec - lr * u.to(vec.dtype)
                torch.nn.utils.vector_to_parameters(vec, params)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            stamps.append(time.perf_counter() - t0)
    finally:
        if pool is not None:
            pool.close()
    final = torch.nn.utils.parameters_to_vector(params).detach().cpu()
    return {"engine": "bare" if workers == 1 else f"bare-{workers}-threads", "rounds": rounds, "per_round_s": per_round(stamps), "round_seconds": stamps, "final": final}


def compare_row2(
    cfg: dict[str, Any], workdir: Path, reps: int, device: str, workers: int | str = 1, ceiling_threads: int = 1
) -> dict[str, Any]:
    """In-process engine (in this process, 1 torch thread per worker, ``workers`` workers) and
    the one-thread bare loop, in alternating blocks of R rounds, ``reps`` blocks each;
    per-round = mean over blocks. ``ceiling_threads`` > 1 adds a block of the bare loop on
    that many threads (``bare_loop(workers=...)``) after each bare block."""
    import torch

    from fedsim.engine.runner import run_inprocess
    from fedsim.models import build_model

    inproc, bare, ceiling = [], [], []
    same = None
    grid_plans = _record_plans()
    for rep in range(reps):
        for which in ("inprocess", "bare") if rep % 2 == 0 else ("bare", "inprocess"):
            progress(f"  block {rep + 1}/{reps}: {which}, {cfg['num-server-rounds']} rounds")
            if which == "bare":
                b = bare_loop(cfg, device)
                bare.append(b)
                if ceiling_threads > 1:
                    progress(f"  block {rep + 1}/{reps}: bare on {ceiling_threads} threads, {cfg['num-server-rounds']} rounds")
                    c = bare_loop(cfg, device, workers=ceiling_threads)
                    if float((c.pop("final") - b["final"]).abs().max()) != 0.0:
                        raise RuntimeError("the bare loop on several threads ended with another model than on one: a bug in the benchmark")
                    ceiling.append(c)
                continue
            results = workdir / f"row2-{cfg['dataset']}-{cfg['batch-mode']}-{workers}-{rep}"
            t0 = time.perf_counter()
            grid_plans.clear()
            run_inprocess({**cfg, "results-dir": str(results)}, threads=1, workers=workers)
            r = timed_run("inprocess", time.perf_counter() - t0, results, cfg["num-server-rounds"],
                          {"workers": workers, "round_plans": {f"{w} worker(s)": n for w, n in sorted(grid_plans.items())}})
            inproc.append(r)
            if same is None:
                state = torch.load(results / "model.pt")
                ref = build_model(cfg["model"], num_classes=10)
                keys = [k for k, p in ref.named_parameters() if p.requires_grad]
                r["final"] = torch.cat([state[k].reshape(-1) for k in keys]).float()
        if same is None and "final" in inproc[0] and bare:
            diff = float((inproc[0].pop("final") - bare[0]["final"]).abs().max())
            same = {"max_abs_diff": diff, "identical": diff == 0.0}
    for b in bare:
        b.pop("final", None)
    pi = sum(r["per_round_s"] for r in inproc) / len(inproc)
    pb = sum(b["per_round_s"] for b in bare) / len(bare)
    out = {"inprocess": inproc, "bare": bare, "inprocess_per_round_s": pi, "bare_per_round_s": pb,
           "overhead": pi / pb, "same_final_model": same}
    if ceiling:
        pc = sum(c["per_round_s"] for c in ceiling) / len(ceiling)
        out.update({"ceiling": ceiling, "ceiling_threads": ceiling_threads, "ceiling_per_round_s": pc, "ceiling_ratio": pc / pb})
    return out


def _record_plans() -> collections.Counter[int]:
    """A counter that every InProcessGrid adds its round plans to when it closes (how many
    rounds ran on how many workers), for the JSON."""
    from fedsim.engine import inprocess

    global _PLANS
    if _PLANS is None:
        _PLANS = collections.Counter()
        close = inprocess.InProcessGrid.close

        def close_and_count(grid: Any) -> None:
            _PLANS.update(grid.plans)
            close(grid)

        inprocess.InProcessGrid.close = close_and_count  # type: ignore[method-assign]
    return _PLANS


_PLANS: collections.Counter[int] | None = None


# --- machine and table ------------------------------------------------------------------


def machine_info(device: str) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "flwr", "ray", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "device": device,
        "load_average_at_start": os.getloadavg(),
    }
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def fmt(v: float | None, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if abs(v) >= 100:
        s = f"{v:.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    elif abs(v) >= 1:
        s = f"{v:.2f}"
    else:
        s = f"{v:.3g}"
    return f"{s}{unit}"


def table_row(name: str, inproc: str, other: str, ratio: float | None, target: str = "—", ok: bool | None = None) -> dict[str, Any]:
    return {"row": name, "in-process": inproc, "other": other, "ratio": ratio,
            "target": target, "pass": ok}


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["row", "in-process", "other", "ratio", "target", "pass/fail"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        verdict = "—" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        lines.append(f"| {r['row']} | {r['in-process']} | {r['other']} | {ratio} | {r['target']} | {verdict} |")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 3 rounds per run, one block per row-2 engine")
    p.add_argument("--rounds", type=int, help="rounds per run (default 30; --quick: 3); row 3's in-process run uses 10x")
    p.add_argument("--reps", type=int, help="row 2: alternating blocks per engine (default 2; --quick: 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i] for every engine (the run-config key device)")
    p.add_argument("--cpus-per-client", type=float, default=1.0, help="Flower runtime: Ray CPUs per client (default 1)")
    p.add_argument("--gpus-per-client", type=float, help="Flower runtime: Ray GPU share per client (default 0; 0.25 with --device cuda)")
    p.add_argument("--mnist-dir", default=str(DEFAULT_MNIST_DIR), help=f"MNIST IDX files (default {DEFAULT_MNIST_DIR})")
    p.add_argument("--rows", default="1,2,3,4", help="which rows to run, e.g. 4 or 1,3 (default 1,2,3,4; 5 and 6 on request)")
    p.add_argument("--pfl-python", help="rows 5 and 6: the Python of pfl-research's venv (default $FEDSIM_PFL_PYTHON, else benchmarks/.pfl-venv/bin/python)")
    p.add_argument("--out", help="JSON results file (default benchmarks/results-<date>.json)")
    p.add_argument("--keep", action="store_true", help="keep the temporary run folders and logs")
    p.add_argument("--child-inprocess", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_inprocess:
        return child_main(args.child_inprocess)

    rounds = args.rounds or (3 if args.quick else 30)
    reps = args.reps or (1 if args.quick else 2)
    if rounds < 2:
        p.error("--rounds must be >= 2 (per-round time is (s_R - s_1) / (R - 1))")
    wanted = {int(x) for x in args.rows.split(",") if x.strip()}
    gpus = args.gpus_per_client if args.gpus_per_client is not None else (0.25 if args.device.startswith("cuda") else 0.0)
    mnist_dir = Path(args.mnist_dir)
    have_mnist = (mnist_dir / "train-images-idx3-ubyte.gz").exists() or (mnist_dir / "train-images-idx3-ubyte").exists()
    out_path = Path(args.out) if args.out else PROJECT_ROOT / "benchmarks" / f"results-{dt.date.today().isoformat()}.json"
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd()), *(argv if argv is not None else sys.argv[1:])])

    import flwr.common.logger  # noqa: F401 - sets the "flwr" logger's level on import: quiet it after

    logging.getLogger("flwr").setLevel(logging.WARNING)  # row 2 runs in this process: no per-round INFO lines
    info = machine_info(args.device)
    progress(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['packages']['torch']}, flwr {info['packages']['flwr']}, device {args.device}")
    progress(f"rounds per run {rounds}, row-2 blocks {reps}, rows {sorted(wanted)}; MNIST {'at ' + str(mnist_dir) if have_mnist else 'NOT FOUND: MNIST rows skipped'}")
    datasets = ["digits", "mnist"] if have_mnist else ["digits"]

    workdir = Path(tempfile.mkdtemp(prefix="fedsim-bench-"))
    rows: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    try:
        if 1 in wanted:
            for ds in datasets:
                cfg = fv_config(ds, rounds, mnist_dir)
                tag = f"1 {ds} ({cfg['model']}) signSGD-FV"
                progress(f"row 1, {ds}: in-process engine, {rounds} rounds (child process)")
                a = run_inprocess_child(cfg, workdir, f"row1-{ds}-inprocess", args.device)
                progress(f"  in-process: {a['per_round_s']:.4f} s/round, {a['wall_s']:.1f} s/run")
                progress(f"row 1, {ds}: Flower runtime, {rounds} rounds (SuperLink + Ray, {args.cpus_per_client:g} CPU/client)")
                b = run_flower_timed(cfg, workdir, f"row1-{ds}-flower", args.device, args.cpus_per_client, gpus)
                progress(f"  Flower: {b['per_round_s']:.4f} s/round, {b['wall_s']:.1f} s/run")
                runs[f"row1-{ds}"] = {"config": cfg, "inprocess": a, "flower": b}
                rows.append(table_row(f"{tag}: s/round (other = Flower; ratio = Flower/in-process)",
                                      fmt(a["per_round_s"], " s"), fmt(b["per_round_s"], " s"), b["per_round_s"] / a["per_round_s"]))
                rows.append(table_row(f"{tag}: fixed s/run: start-up, 2 evaluations, shut-down (ratio = Flower/in-process)",
                                      fmt(a["fixed_s"], " s"), fmt(b["fixed_s"], " s"), b["fixed_s"] / a["fixed_s"] if a["fixed_s"] > 0 else None))
                rows.append(table_row(f"{tag}: s/run, {rounds} rounds incl. start-up (ratio = Flower/in-process)",
                                      fmt(a["wall_s"], " s"), fmt(b["wall_s"], " s"), b["wall_s"] / a["wall_s"]))

        if 2 in wanted:
            for ds in reversed(datasets):  # MNIST (the realistic case) first
                cfg = fv_config(ds, rounds, mnist_dir)
                progress(f"row 2, {ds}: in-process engine vs bare PyTorch loop, {reps} alternating block(s) of {rounds} rounds, 1 thread")
                r = compare_row2(cfg, workdir, reps, args.device, workers=1)
                progress(f"  in-process {r['inprocess_per_round_s']:.4f} s/round, bare {r['bare_per_round_s']:.4f} s/round, overhead {r['overhead']:.3f}x; same final model: {r['same_final_model']}")
                runs[f"row2-{ds}"] = {"config": cfg, **r}
                target = OVERHEAD_TARGET if ds == "mnist" else TINY_OVERHEAD_TARGET
                rows.append(table_row(f"2 {ds} ({cfg['model']}) signSGD-FV, 1 worker: s/round (other = bare PyTorch loop; ratio = in-process/bare)",
                                      fmt(r["inprocess_per_round_s"], " s"), fmt(r["bare_per_round_s"], " s"), r["overhead"],
                                      f"≤ {target}×", r["overhead"] <= target))

        if 3 in wanted:
            cfg_f = trivial_config(rounds)
            cfg_i = trivial_config(10 * rounds)
            progress(f"row 3: trivial model, in-process engine, {10 * rounds} rounds (child process)")
            a = run_inprocess_child(cfg_i, workdir, "row3-inprocess", args.device)
            progress(f"  in-process: {1 / a['per_round_s']:.1f} rounds/s, start-up {a['fixed_s']:.2f} s")
            progress(f"row 3: trivial model, Flower runtime, {rounds} rounds")
            b = run_flower_timed(cfg_f, workdir, "row3-flower", args.device, args.cpus_per_client, gpus)
            progress(f"  Flower: {1 / b['per_round_s']:.2f} rounds/s")
            progress(f"row 3: trivial model, bare PyTorch loop (the compute floor), {10 * rounds} rounds")
            c = bare_loop(cfg_i, args.device)
            c.pop("final")
            progress(f"  bare loop: {1 / c['per_round_s']:.1f} rounds/s")
            runs["row3"] = {"config_inprocess": cfg_i, "config_flower": cfg_f, "inprocess": a, "flower": b, "bare": c}
            ri, rf, rb = 1 / a["per_round_s"], 1 / b["per_round_s"], 1 / c["per_round_s"]
            rows.append(table_row(f"3 {cfg_i['model']}, B=1, {NUM_CLIENTS} clients: rounds/s (other = Flower; ratio = in-process/Flower)",
                                  fmt(ri, " r/s"), fmt(rf, " r/s"), ri / rf, f"≥ {ROUNDS_PER_S_TARGET:g}×", ri / rf >= ROUNDS_PER_S_TARGET))
            rows.append(table_row("3 same: rounds/s (other = bare PyTorch loop, no framework; ratio = bare/in-process)",
                                  fmt(ri, " r/s"), fmt(rb, " r/s"), rb / ri, f"≤ {TINY_OVERHEAD_TARGET}×", rb / ri <= TINY_OVERHEAD_TARGET))
            rows.append(table_row("3 in-process start-up s (fresh process: imports, data, model, 2 evaluations, exit)",
                                  fmt(a["fixed_s"], " s"), "—", None, f"< {STARTUP_TARGET_S:g} s", a["fixed_s"] < STARTUP_TARGET_S))
        if 4 in wanted and have_mnist:
            cores = info["cores_usable"] or info["cores"]
            for mode in (2, 4):
                cfg = fv_config("mnist", rounds, mnist_dir, mode=mode)
                progress(f"row 4, mnist batch mode {mode}: in-process engine, --workers auto ({cores} cores), vs bare loop on 1 thread, "
                         f"{reps} alternating block(s) of {rounds} rounds")
                r = compare_row2(cfg, workdir, reps, args.device, workers="auto", ceiling_threads=cores)
                progress(f"  in-process {r['inprocess_per_round_s']:.4f} s/round, bare {r['bare_per_round_s']:.4f} s/round, "
                         f"ratio {r['overhead']:.3f}x; same final model: {r['same_final_model']}; plans {r['inprocess'][0]['round_plans']}")
                runs[f"row4-mode{mode}"] = {"config": cfg, "cores": cores, **r}
                target = f"≤ {ALL_CORES_TARGET}× (2 cores)" if cores == 2 else "— (target is for 2 cores)"
                rows.append(table_row(f"4 mnist (fv-mnist-cnn) signSGD-FV, batch mode {mode}, --workers auto on {cores} cores: "
                                      "s/round (other = bare PyTorch loop, 1 thread; ratio = in-process/bare)",
                                      fmt(r["inprocess_per_round_s"], " s"), fmt(r["bare_per_round_s"], " s"), r["overhead"],
                                      target, r["overhead"] <= ALL_CORES_TARGET if cores == 2 else None))
                if "ceiling_ratio" in r:
                    progress(f"  bare loop on {cores} threads {r['ceiling_per_round_s']:.4f} s/round, ratio {r['ceiling_ratio']:.3f}x")
                    rows.append(table_row(f"4 same, the ceiling: the bare loop with its clients on {cores} threads (no framework; "
                                          "ratio = that/bare on 1 thread)", "—", fmt(r["ceiling_per_round_s"], " s"), r["ceiling_ratio"]))
        elif 4 in wanted:
            progress("row 4 skipped: it needs MNIST (--mnist-dir)")
        if 5 in wanted and have_mnist:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_scale import find_pfl_python, row5

            quick = bool(args.quick)
            r5_rows, r5_runs = row5(workdir, 4 if quick else 30, mnist_dir, [1000, 10000] if quick else [1000, 10000, 100000],
                                    [] if quick else [1000, 10000], ["mnist-logreg"] if quick else ["mnist-logreg", "mnist-2nn"],
                                    args.cpus_per_client, reps=1 if quick else 2, pfl_python=find_pfl_python(args.pfl_python))
            rows += [table_row(r["row"], r["in-process"], r["other"], r["ratio"], r["target"], r["pass"]) for r in r5_rows]
            runs.update(r5_runs)
        elif 5 in wanted:
            progress("row 5 skipped: it needs MNIST (--mnist-dir)")
        if 6 in wanted and have_mnist:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_scale import find_pfl_python, row6

            sizes = [1000, 10000] if args.quick else [1000, 10000, 60000]
            cores = sorted({1, info["cores_usable"] or info["cores"]})
            r6_rows, r6_runs = row6(workdir, 4 if args.quick else 30, mnist_dir, sizes, find_pfl_python(args.pfl_python), cores, reps=1 if args.quick else 2)
            rows += [table_row(r["row"], r["in-process"], r["other"], r["ratio"], r["target"], r["pass"]) for r in r6_rows]
            runs.update(r6_runs)
        elif 6 in wanted:
            progress("row 6 skipped: it needs MNIST (--mnist-dir)")
    finally:
        if args.keep:
            progress(f"run folders and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    wall = time.perf_counter() - T_START
    info["load_average_at_end"] = os.getloadavg()
    table = markdown(rows)
    header = [
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable); Python {info['python']}, "
        f"torch {info['packages']['torch']}, flwr {info['packages']['flwr']}, ray {info['packages']['ray']}; "
        f"device {args.device}{' (' + info['gpu'] + ')' if 'gpu' in info else ''}; "
        f"load average {info['load_average_at_start'][0]:.2f} at start, {info['load_average_at_end'][0]:.2f} at end",
        f"Command: {command}",
        f"Settings: {rounds} rounds per run (row 3 in-process: {10 * rounds}); row 2: {reps} alternating block(s) per engine; "
        f"{NUM_CLIENTS} clients; signSGD-FV = llr-vote, lr 0.001, llr-warmup {LLR_WARMUP}, eval only before round 1 and after the last; "
        f"1 torch thread per in-process worker and in the bare loop; in-process workers: row 2 one, rows 1, 3 and 4 auto "
        f"(as `fedsim run`); Flower {args.cpus_per_client:g} CPU / {gpus:g} GPU per client",
        "s/round = (s_R - s_1) / (R - 1) from rounds.csv (bare loop: the same from its own clock); "
        "fixed = s/run - R x s/round; s/run = whole process(es), start to exit.",
    ]
    print("\n".join(header) + "\n\n" + table + f"\n\nBenchmark wall time: {wall:.0f} s")
    for key, r in runs.items():
        if key.startswith(("row2", "row4")) and r.get("same_final_model"):
            print(f"{key}: in-process and bare loop final models: max |diff| = {r['same_final_model']['max_abs_diff']:.3g}")
    for r in rows:
        if r["pass"] is not None:
            print(f"{'PASS' if r['pass'] else 'FAIL'}: {r['row']}: {r['ratio']:.3f}× (target {r['target']})"
                  if r["ratio"] is not None else f"{'PASS' if r['pass'] else 'FAIL'}: {r['row']}: {r['in-process']} (target {r['target']})")
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": command,
        "machine": info,
        "settings": {"rounds": rounds, "reps": reps, "num_clients": NUM_CLIENTS, "llr_warmup": LLR_WARMUP,
                     "eval_every": EVAL_EVERY, "cpus_per_client": args.cpus_per_client, "gpus_per_client": gpus},
        "table": rows,
        "table_markdown": table,
        "runs": runs,
        "wall_seconds": wall,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    progress(f"done in {wall:.0f} s; results in {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
