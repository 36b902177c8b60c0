"""fedsim's ServerApp: build the strategy the run config names and run its rounds.

``run_experiment`` is setup -> start or resume -> rounds -> summary, each a small
function. The global model is evaluated on the server's test set before round 1, every
``eval-every`` rounds and after the last round. After each round the ``Evaluator`` builds
the round's row (``RoundEnd``) and hands it to the run's callbacks in order
(fedsim.callbacks): collect the row, append it to rounds.csv, the caller's callbacks
(e.g. a progress bar), the run config's (TensorBoard, MLflow, a user's), save a
checkpoint (when evaluated), log the progress line, stop at ``stop-at-accuracy``. A
callback returns True to end the run after that round.

A run is complete when every round it trained committed a new model; a round that kept
the previous one (fewer than ``min-replies`` valid replies, fewer than the aggregator
needs, or a non-finite aggregate: ``FedsimStrategy.failed_rounds``) makes it incomplete: summary.json says
``"complete": false`` and ``rounds_failed``, and ``run_experiment`` raises RunFailed (exit
1). ``max-bad-rounds`` such rounds in a row stop the run early.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedsim.algorithms import REGISTRY
from fedsim.algorithms.memory import check_state_fits, state_clients
from fedsim.arrays import load_into
from fedsim.callbacks import Callback, RoundEnd, RunEnd, RunStart, named_callbacks
from fedsim.callbacks.builtin import Checkpointer, ClientsCsv, CollectRows, LogLine, RoundsCsv, StopAtAccuracy
from fedsim.checkpoint import load_checkpoint, restore_strategy
from fedsim.config import ConfigError, RunConfig
from fedsim.data.errors import DataError
from fedsim.device import device_label
from fedsim.errors import RunFailed
from fedsim.log_lines import install as install_one_line_logs
from fedsim.models import build_model, count_parameters
from fedsim.parallel import available_cores, block_map
from fedsim.partitions import format_label_counts, label_counts
from fedsim.plan import RunPlan, own_data, server_plan
from fedsim.protocol import ModelSpec, array_spec
from fedsim.results import RoundRow, RunWriter, environment_info
from fedsim.run_folder import claim_run_folder
from fedsim.runtime import Runtime, evaluate, runtime
from fedsim.strategies import FederatedEvaluation, FedsimStrategy, build_strategy
from fedsim.strategies.base import TOO_FEW_FOR_RULE
from fedsim.validation import load_config

app = ServerApp()


class Evaluator:
    """Turns (round, arrays, the strategy's round metrics) into a RoundEnd, evaluating the
    model on the test set when the round is due (round 0, every eval-every, the last)."""

    def __init__(self, plan: RunPlan, rt: Runtime) -> None:
        self.cfg = plan.cfg
        self.objective = plan.objective
        self.x_test, self.y_test = rt.test_inputs(plan), rt.y_test
        self.model = build_model(plan.model, num_classes=rt.num_classes, seed=0).to(rt.device)
        self.t0 = time.perf_counter()

    def resume(self, seconds: float) -> None:
        """Continue a checkpoint's clock."""
        self.t0 = time.perf_counter() - seconds

    def __call__(
        self, server_round: int, arrays: ArrayRecord, metrics: MetricRecord | None, fed: FederatedEvaluation | None = None
    ) -> RoundEnd:
        row = RoundRow(round=server_round, seconds=time.perf_counter() - self.t0)
        if metrics is not None:
            row.train_loss = _number(metrics.get("train-loss", math.nan))
            for key in ("bytes-up", "bytes-down", "clients", "rejected"):
                setattr(row, key.replace("-", "_"), int(_number(metrics.get(key, 0))))
        due = server_round % self.cfg.eval_every == 0 or server_round == self.cfg.num_server_rounds
        if due and len(self.y_test):  # no central test set on the nodes' own data without server-test
            load_into(self.model, arrays)
            row.test_loss, values = evaluate(self.model, self.x_test, self.y_test, self.objective)
            row.test_accuracy = values.pop("accuracy", math.nan)
            row.extra.update({f"test_{k}": v for k, v in values.items()})
        if fed is not None:
            row.extra.update({f"fed_{k}": v for k, v in fed.figures.items()})
        return RoundEnd(row, arrays, due, fed)


def _number(value: object) -> float:
    """A metric the strategy wrote (an int or float) as a float."""
    return float(value) if isinstance(value, (int, float)) else math.nan


@dataclass
class ServerSetup:
    """What the server resolved for a run: plan, connected nodes, data, model, strategy."""

    cfg: RunConfig
    plan: RunPlan
    nodes: list[int]
    rt: Runtime
    initial: ArrayRecord
    num_params: int
    strategy: FedsimStrategy
    evaluator: Evaluator

    @property
    def device(self) -> torch.device:
        assert self.plan.device is not None  # a server plan resolves it
        return self.plan.device


@dataclass
class Start:
    """Where the rounds start: from round 1, or after a checkpoint's round."""

    first_round: int
    arrays: ArrayRecord
    rows: list[RoundRow]
    resumed_after: int | None


def set_up(grid: Grid, cfg: RunConfig, cores: int | None = None) -> ServerSetup:
    """The plan (for the nodes that connected), model, strategy and evaluator of a run.
    ``cores``: the server's share of the machine (the LLR vote's threads on a CPU)."""
    plan = server_plan(cfg)  # before waiting for nodes or touching the results folder
    nodes = wait_for_nodes(grid, cfg.num_nodes, cfg.node_wait)
    if len(nodes) != cfg.num_nodes:
        log(WARNING, "fedsim: num-nodes is %d but the federation has %d nodes; using %d", cfg.num_nodes, len(nodes), len(nodes))
        plan = server_plan(cfg, len(nodes))
    device = plan.device
    assert device is not None
    rt = runtime(plan, device)
    model = build_model(plan.model, num_classes=plan.num_classes, seed=cfg.seed)
    initial = ArrayRecord(model.state_dict())
    param_keys = [n for n, p in model.named_parameters() if p.requires_grad]
    threads = 1 if device.type != "cpu" else max(1, (cores or available_cores()) // max(1, torch.get_num_threads()))
    # Replies may claim partition ids below max(num-nodes, connected nodes) and at most the
    # training set's size as num-examples: a node cannot grow the server's state at will.
    mine = own_data(cfg)  # the nodes' own data: the server cannot know their sizes
    check_state_fits(cfg, plan.num_params, state_clients(max(cfg.num_nodes, len(nodes)), mine), device)
    strategy = build_strategy(
        cfg, ModelSpec.of(array_spec(initial), param_keys), num_partitions=max(cfg.num_nodes, len(nodes)),
        max_examples=None if mine else len(rt.y_train), device=device, map_blocks=block_map(threads),
        metric_names=plan.metric_names, max_clients_by_node=mine,
    )
    return ServerSetup(cfg, plan, nodes, rt, initial, count_parameters(model), strategy, Evaluator(plan, rt))


LOGGED_CLIENTS = 100  # more clients than this: the log gets a summary, the files get every row


def log_setup(setup: ServerSetup) -> np.ndarray | None:
    """Log what the run is (model size, batch sizes, attackers, label counts); returns the
    label counts per client [clients, classes] (None for a regression task, the nodes' own
    data, or partitions drawn per client ("full", "sample") with more than LOGGED_CLIENTS x 10
    clients: drawing every client's examples would cost more than the run's start)."""
    cfg, plan = setup.cfg, setup.plan
    log(INFO, "fedsim: %s on %s (%s, %d parameters), %d nodes, batch sizes by partition %s",
        cfg.strategy, cfg.dataset, plan.model_name, setup.num_params, len(setup.nodes), _listed(plan.batch_sizes))
    if plan.attackers:
        log(INFO, "fedsim: %d attackers (%s) by partition id: %s", len(plan.attackers), cfg.attack, _listed(plan.attackers))
    beyond = REGISTRY[cfg.strategy].config_warning(cfg, len(plan.attackers))
    if beyond:
        log(WARNING, "fedsim: %s", beyond)
    if not plan.splits.classification or not plan.partitions:  # regression, or the nodes' own data
        return None
    if plan.partitions.overlapping and len(plan.partitions) > 10 * LOGGED_CLIENTS:
        log(INFO, "fedsim: %d clients, each %d examples drawn from the whole set (%s); label counts per client not computed",
            len(plan.partitions), int(plan.partitions.sizes()[0]), cfg.partitioning)
        return None
    counts = label_counts(plan.splits.y_train.numpy(), plan.partitions, plan.num_classes)
    if len(counts) <= LOGGED_CLIENTS:
        log(INFO, "fedsim: label counts per client (%s partition):\n%s", cfg.partitioning, format_label_counts(counts))
    else:
        sizes, kinds = counts.sum(axis=1), (counts > 0).sum(axis=1)
        log(INFO, "fedsim: %d clients (%s partition): examples min %d / median %d / max %d, labels min %d / median %d / max %d; "
            "every client's counts in label_counts.csv", len(counts), cfg.partitioning, sizes.min(), np.median(sizes), sizes.max(),
            kinds.min(), np.median(kinds), kinds.max())
    return counts


def _listed(values: Sequence[int]) -> str:
    """The values as a list, or for more than LOGGED_CLIENTS of them, each distinct value's count."""
    if len(values) <= LOGGED_CLIENTS:
        return str(list(values))
    distinct, times = np.unique(np.asarray(values), return_counts=True)
    shown = ", ".join(f"{int(v)} x{int(t)}" for v, t in zip(distinct[:20], times[:20], strict=True))
    return f"({len(values)} clients: {shown}{', ...' if len(distinct) > 20 else ''})"


def extra_columns(plan: RunPlan) -> tuple[str, ...]:
    """rounds.csv's columns after the common ones: the task's metrics other than accuracy
    (``test_<name>``) and, with federated evaluation, its figures (``fed_<name>``)."""
    test = [f"test_{n}" for n in plan.metric_names if n != "accuracy"]
    if plan.cfg.eval_fraction <= 0:
        return tuple(test)
    fed = ["loss", *plan.metric_names]
    if "accuracy" in plan.metric_names:
        fed += ["accuracy_client_mean", "accuracy_p10", "accuracy_min"]
    return (*test, *(f"fed_{n}" for n in fed), "fed_clients")


def start_or_resume(setup: ServerSetup, writer: RunWriter | None, counts: np.ndarray | None) -> Start:
    """Resume from the folder's checkpoint when it holds one of this config (and its
    rounds.csv continues it), else start the folder afresh."""
    if writer is not None:
        checkpoint = load_checkpoint(writer.path, setup.cfg, setup.initial)
        stored = writer.resume(checkpoint.round) if checkpoint is not None else None  # None: rounds.csv cannot continue it
        if checkpoint is not None and stored is not None and restore_strategy(setup.strategy, checkpoint, writer.path):
            log(INFO, "fedsim: resuming from the checkpoint after round %d in %s", checkpoint.round, writer.path)
            setup.evaluator.resume(checkpoint.seconds)
            return Start(checkpoint.round + 1, checkpoint.arrays, list(stored), checkpoint.round)
        writer.start(setup.cfg.to_mapping())
        if counts is not None:
            np.savetxt(writer.folder.label_counts, counts, fmt="%d", delimiter=",")
    return Start(1, setup.initial, [], None)


def run_callbacks(setup: ServerSetup, writer: RunWriter | None, rows: list[RoundRow], extra: Sequence[Callback]) -> list[Callback]:
    """The run's callbacks in order (module docstring), ``extra`` (the caller's and the run
    config's) after rounds.csv and before the checkpoint; ``rows`` collects every row."""
    cfg = setup.cfg
    out: list[Callback] = [CollectRows(rows)]
    if writer is not None:
        out.append(RoundsCsv(writer))
        if cfg.eval_fraction > 0:
            out.append(ClientsCsv(writer.folder.clients, setup.plan.metric_names))
    out += extra
    if writer is not None:
        out.append(Checkpointer(writer, cfg, setup.strategy.state_dict))
    return [*out, LogLine(cfg.num_server_rounds), StopAtAccuracy(cfg.stop_at_accuracy)]


def run_rounds(grid: Grid, setup: ServerSetup, start: Start, callbacks: Sequence[Callback]) -> tuple[ArrayRecord, float]:
    """Every round from ``start``, each followed by the callbacks; (final model, wall seconds)."""

    def on_round_end(server_round: int, arrays: ArrayRecord, metrics: MetricRecord | None, fed: FederatedEvaluation | None) -> bool:
        end = setup.evaluator(server_round, arrays, metrics, fed)
        return any([bool(cb.on_round_end(end)) for cb in callbacks])  # a list: every callback runs

    t0 = time.perf_counter()
    final = setup.strategy.run(
        grid, start.arrays, setup.cfg.num_server_rounds, on_round_end, timeout=setup.cfg.round_timeout,
        train_config=train_config(setup.device), first_round=start.first_round, eval_every=setup.cfg.eval_every,
        max_bad_rounds=setup.cfg.max_bad_rounds,
    )
    return final, time.perf_counter() - t0


def final_figure(rows: list[RoundRow]) -> str:
    """``final test accuracy X``, or without a central test set the last federated one."""
    if rows[-1].test_accuracy == rows[-1].test_accuracy:  # not NaN
        return f"final test accuracy {rows[-1].test_accuracy:.4f}"
    fed = [r.extra["fed_accuracy"] for r in rows if r.extra.get("fed_accuracy", math.nan) == r.extra.get("fed_accuracy")]
    return f"final federated accuracy {fed[-1]:.4f}" if fed else f"final test accuracy {rows[-1].test_accuracy:.4f}"


def failure(rows: list[RoundRow], cfg: RunConfig, strategy: FedsimStrategy) -> str | None:
    """Why a run is not complete (module docstring), else None: no trained round had
    min-replies valid replies; or max-bad-rounds failed rounds in a row stopped it; or some
    trained rounds kept the previous model."""
    short = rounds_below_min_replies(rows, cfg.min_replies)
    failed = failed_rounds(rows, cfg.min_replies, strategy)
    trained = sum(1 for r in rows if r.round > 0)
    if trained and len(short) == trained:
        return (
            f"no round had min-replies={cfg.min_replies} valid replies, so the model never changed "
            f"(every reply was rejected or too few came: see the log's 'rejected the reply' lines and the clients/rejected "
            f"columns of rounds.csv)"
        )
    for_rule = sum(1 for r, why in strategy.failed_rounds.items() if why == TOO_FEW_FOR_RULE and r not in short)
    non_finite = len(failed) - len(short) - for_rule
    rule = f"{for_rule} with fewer valid replies than the aggregator needs, " if for_rule else ""
    why = (f"{len(short)} with fewer than min-replies={cfg.min_replies} valid replies, {rule}{non_finite} with a non-finite "
           "aggregate: see the log's WARNING lines for those rounds")
    if strategy.stalled_at is not None:
        last = strategy.stalled_at
        return (f"the model could not move for max-bad-rounds={cfg.max_bad_rounds} rounds in a row (rounds "
                f"{last - cfg.max_bad_rounds + 1}-{last}), so the run stopped after round {last} of {cfg.num_server_rounds} "
                f"({len(failed)} failed rounds in all: {why})")
    if failed:
        return f"{len(failed)} of {trained} rounds kept the previous model, so the run is incomplete ({why})"
    return None


def failed_rounds(rows: list[RoundRow], min_replies: int, strategy: FedsimStrategy) -> list[int]:
    """The trained rounds that kept the previous model: below min-replies (rounds.csv, also
    before a resume) or recorded by the strategy (a non-finite aggregate)."""
    return sorted(set(rounds_below_min_replies(rows, min_replies)) | set(strategy.failed_rounds))


def summarise(setup: ServerSetup, start: Start, rows: list[RoundRow], wall: float, failed: str | None) -> dict[str, Any]:
    """summary.json's figures of a finished run (the caller adds engine and environment)."""
    cfg, plan, strategy, device = setup.cfg, setup.plan, setup.strategy, setup.device
    last = rows[-1]
    return {
        "seed": cfg.seed, "device": str(device),
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "client_devices": sorted({device_label(code) for code in strategy.reported_devices.values()}),
        "final_test_accuracy": last.test_accuracy, "final_test_loss": last.test_loss,
        "rounds": last.round, "stopped_early_at_round": last.round if last.round < cfg.num_server_rounds else None,
        "num_nodes": len(setup.nodes), "batch_sizes": list(plan.batch_sizes),
        "batch_sizes_reported": dict(sorted(strategy.reported_batch_sizes.items())),
        "resumed_after_round": start.resumed_after, "rounds_below_min_replies": len(rounds_below_min_replies(rows, cfg.min_replies)),
        "rounds_failed": len(failed_rounds(rows, cfg.min_replies, strategy)), "complete": failed is None,
        "stalled_after_round": strategy.stalled_at, "failed": failed, "attackers": list(plan.attackers), "attack": cfg.attack if plan.attackers else None,
        "algorithm": strategy.algorithm.report(), "model": plan.model_name, "num_parameters": setup.num_params,
        "data": {"dataset": cfg.dataset, "input_shape": list(plan.input_shape), "num_classes": plan.num_classes,
                 "task": "classification" if plan.splits.classification else "regression", **plan.splits.info},
        "evaluation": evaluation_kind(cfg, plan),
        "wall_seconds": wall,
    }


def evaluation_kind(cfg: RunConfig, plan: RunPlan) -> str:
    """Which evaluation produced the run's figures: "central" (the server's test set),
    "federated" (the clients' own held-out data), both, or "none"."""
    kinds = [k for k, on in (("central", len(plan.splits.y_test) > 0), ("federated", cfg.eval_fraction > 0)) if on]
    return " and ".join(kinds) or "none"


def run_experiment(
    grid: Grid,
    cfg: RunConfig,
    *,
    engine: str = "flower",
    callbacks: Sequence[Callback] = (),
    engine_settings: Mapping[str, Any] | None = None,
    cores: int | None = None,
) -> list[RoundRow]:
    """Run all rounds of ``cfg`` on ``grid``: setup, start or resume, rounds, summary.
    ``engine`` and ``engine_settings`` (e.g. threads, workers) are recorded in summary.json;
    ``callbacks`` run after each round, after the row is recorded and before the
    checkpoint; ``cores``: the server's share of the machine (default: every core).
    Raises RunFailed when the run is not complete (module docstring; summary.json says so too)."""
    environment = environment_info()  # before any round: the code this process runs
    setup = set_up(grid, cfg, cores)
    counts = log_setup(setup)
    # The folder's lock is held from here until the summary is written (re-entrant: the CLI
    # or a sweep in this process may hold it already).
    folder = Path(cfg.results_dir) if cfg.results_dir else None
    writer = RunWriter(folder, lock=claim_run_folder(folder, cfg), extra=extra_columns(setup.plan)) if folder is not None else None
    rows: list[RoundRow] = []
    cbs: list[Callback] = []
    failed: str | None = None
    end = RunEnd("error", rows, None, folder)
    try:  # the lock goes with the run, however it ends (finish releases it on success)
        named = named_callbacks(cfg)  # a user's that fails to build fails before the folder is written
        start = start_or_resume(setup, writer, counts)
        rows += start.rows
        cbs = run_callbacks(setup, writer, rows, [*callbacks, *named])
        for cb in cbs:
            cb.on_run_start(RunStart(cfg, folder, start.first_round, setup.num_params, {"num_nodes": len(setup.nodes)}))
        final, wall = run_rounds(grid, setup, start, cbs)
        log(INFO, "fedsim: %s after %d rounds (%.1f s)", final_figure(rows), rows[-1].round, wall)
        failed = failure(rows, cfg, setup.strategy)
        summary = {**summarise(setup, start, rows, wall, failed), "engine": engine, "engine_settings": dict(engine_settings or {}), **environment}
        if writer is not None:
            writer.finish(final.to_torch_state_dict(), summary)
        end = RunEnd("failed" if failed else "finished", rows, summary, folder)
    finally:
        if writer is not None and writer.lock is not None:
            writer.lock.release()  # idempotent
        for cb in cbs:
            cb.on_run_end(end)
    if failed:
        raise RunFailed(failed + (f"; results in {folder}" if folder is not None else ""))
    return rows


def train_config(device: torch.device) -> ConfigRecord:
    """What every train message carries besides the strategy's task: the device type the
    server resolved ``device`` to (clients of a CUDA server must find CUDA: fedsim.device)."""
    return ConfigRecord({"device": device.type})


def rounds_below_min_replies(rows: list[RoundRow], min_replies: int) -> list[int]:
    """The trained rounds (> 0) whose valid replies were fewer than ``min_replies``: the
    strategy left the global model unchanged in them."""
    return [r.round for r in rows if r.round > 0 and r.clients < min_replies]


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, poll: float = 1.0) -> list[int]:
    """The connected node ids, once ``wanted`` nodes are connected or ``timeout`` seconds
    have passed (deployed SuperNodes register with the SuperLink in their own time).
    Raises RuntimeError if no node connected at all."""
    deadline = time.monotonic() + timeout
    nodes = sorted(grid.get_node_ids())
    if len(nodes) < wanted:
        log(INFO, "fedsim: %d of %d nodes connected; waiting up to %.0f s (node-wait) for the rest", len(nodes), wanted, timeout)
    while len(nodes) < wanted and time.monotonic() < deadline:
        time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))
        nodes = sorted(grid.get_node_ids())
    if not nodes:
        raise RuntimeError(
            f"no node connected within node-wait={timeout:g} s: start SuperNodes with "
            "flower-supernode --superlink <superlink-host>:<port> --node-config \"partition-id=K num-partitions=M\", "
            "or raise node-wait in the run config"
        )
    return nodes


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point (``flwr run .``, a deployment). A bad run config (or a run that
    learned nothing) is one ERROR line, not a traceback, and the run ends there. (fedsim's
    in-process engine calls ``run_experiment`` itself, and its caller reports errors.)"""
    install_one_line_logs()  # Flower's simulation logs a raising client as ~20 lines
    try:
        run_experiment(grid, load_config(context.run_config), engine="flower")
    except (ConfigError, DataError, RunFailed) as err:
        log(ERROR, "fedsim: error: %s", err)
