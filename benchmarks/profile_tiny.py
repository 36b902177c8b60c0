#!/usr/bin/env python
"""Where the in-process engine's time goes when the model costs ~nothing (benchmark row 3:
signSGD-FV, ``digits-logreg``, B = 1, 15 clients, one worker): the framework's cost per
client and round, split into its parts. Issue 13's "profile that says exactly what is left".

    python benchmarks/profile_tiny.py                # 300 rounds, ~20 s
    python benchmarks/profile_tiny.py --rounds 1000

Prints the time per client-round of the bare loop (benchmarks/bench_engines.py
``bare_loop``: the same arithmetic with no framework), of a plain in-process run, and of an
instrumented one whose parts are timed with ``perf_counter`` wrappers (about 1 us of their
own per call: cProfile was not used because it slows Python code several times more than
torch kernels and so inflates exactly the framework parts being measured). Then, per part,
microseconds per client-round in the instrumented run.
"""

from __future__ import annotations

import argparse
import csv
import functools
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engines as be


def parts() -> list[tuple[str, list[tuple[Any, str]]]]:
    """(label, [(namespace, attribute), ...]): each attribute is replaced by a timed wrapper
    in that namespace only (a module: the calls made from that module; a class: every call).
    No part's function calls another part's, so the parts do not overlap."""
    from fedsim import client_app
    from fedsim.algorithms import sign_vote
    from fedsim.clients import tasks
    from fedsim.engine import inprocess
    from fedsim.strategies.base import FedsimStrategy

    return [
        ("client: forward/backward and minibatch draw (the model's work)", [(tasks, "minibatch_gradient")]),
        ("client: signs packed to 1 bit", [(sign_vote, "pack_signs"), (sign_vote, "fill_zeros")]),
        ("client: global model loaded into the local model", [(client_app, "load_into")]),
        ("client: reply built (ArrayRecord, MetricRecord, RecordDict, Message)", [
            (client_app, "to_array_record"), (client_app, "MetricRecord"), (client_app, "RecordDict"), (client_app, "Message")]),
        ("client: config, hyperparameters, runtime, device and seed lookups", [
            (client_app, "load_config_cached"), (client_app, "client_plan"), (client_app, "_hyperparams"),
            (client_app, "runtime"), (client_app, "generator"), (client_app, "client_device")]),
        ("engine: per-client message copy and delivery (content copy, metadata, ids)", [
            (inprocess, "_copy_content"), (inprocess, "message_with_metadata"), (inprocess, "assign_message_id")]),
        ("server: reply checks (metrics, payload decoded and validated)", [(FedsimStrategy, "_check")]),
        ("server: vote and model update", [(sign_vote.SignVote, "server_rule")]),
        ("server: train messages built", [(FedsimStrategy, "configure_train")]),
    ]


def instrument(table: list[tuple[str, list[tuple[Any, str]]]], spent: dict[str, float]) -> Callable[[], None]:
    """Wrap every listed attribute so that its calls add their wall time to ``spent[label]``;
    returns the function that puts the originals back."""
    undo = []
    for label, targets in table:
        for namespace, name in targets:
            raw = vars(namespace)[name] if isinstance(namespace, type) else getattr(namespace, name)
            kind = type(raw) if isinstance(raw, (classmethod, staticmethod)) else None
            func = raw.__func__ if kind else raw

            def timed(*args: Any, _func: Callable = func, _label: str = label, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return _func(*args, **kwargs)
                finally:
                    spent[_label] += time.perf_counter() - t0

            if not isinstance(func, type):
                timed = functools.wraps(func)(timed)
            setattr(namespace, name, kind(timed) if kind else timed)
            undo.append((namespace, name, raw))

    def restore() -> None:
        for namespace, name, raw in reversed(undo):
            setattr(namespace, name, raw)

    return restore


def per_round_seconds(results: Path) -> float:
    """(s_R - s_1) / (R - 1) from rounds.csv, as the benchmark: round 1 and both evaluations left out."""
    with open(results / "rounds.csv", newline="") as f:
        secs = [float(r["seconds"]) for r in csv.DictReader(f) if int(r["round"]) >= 1]
    return (secs[-1] - secs[0]) / (len(secs) - 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=300, help="rounds per run (default 300)")
    args = p.parse_args(argv)
    if args.rounds < 3:
        p.error("--rounds must be >= 3")

    from fedsim.engine.inprocess import InProcessGrid
    from fedsim.engine.runner import run_inprocess
    from fedsim.strategies.base import FedsimStrategy

    cfg = be.trivial_config(args.rounds)
    clients = cfg["num-nodes"]
    table = parts()
    spent = {label: 0.0 for label, _ in table}
    work = Path(tempfile.mkdtemp(prefix="fedsim-profile-"))
    try:
        bare = be.bare_loop(cfg, "cpu")["per_round_s"]
        run_inprocess({**cfg, "results-dir": str(work / "plain")}, threads=1, workers=1, quiet=True)
        plain = per_round_seconds(work / "plain")
        totals = [("all rounds", [(FedsimStrategy, "run")]),
                  ("subtotal: every client message (InProcessGrid._deliver: the ClientApp call and the engine's copies)",
                   [(InProcessGrid, "_deliver")])]
        spent.update({label: 0.0 for label, _ in totals})
        restore = instrument(table + totals, spent)
        try:
            run_inprocess({**cfg, "results-dir": str(work / "timed")}, threads=1, workers=1, quiet=True)
        finally:
            restore()
        timed = per_round_seconds(work / "timed")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    us = 1e6 / clients  # seconds per round -> microseconds per client-round
    n = args.rounds * clients
    print(f"signSGD-FV, digits-logreg, B = 1, {clients} clients, {args.rounds} rounds, one worker, one torch thread")
    print(f"bare loop {bare * us:.0f} us per client-round; in-process {plain * us:.0f} us (ratio {plain / bare:.2f}x, "
          f"framework {(plain - bare) * us:.0f} us); instrumented {timed * us:.0f} us\n")
    print("| part | us per client-round (instrumented run, all rounds) |")
    print("|---|---|")
    for label, _ in table:
        print(f"| {label} | {spent[label] / n * 1e6:.1f} |")
    rest = spent["all rounds"] - sum(spent[label] for label, _ in table)
    print(f"| rest: round loop, ClientApp dispatch, result rows, the 2 evaluations, everything not listed | {rest / n * 1e6:.1f} |")
    print(f"| all rounds (FedsimStrategy.run) | {spent['all rounds'] / n * 1e6:.1f} |")
    for label in list(spent)[len(table) + 1:]:
        print(f"| {label} | {spent[label] / n * 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
