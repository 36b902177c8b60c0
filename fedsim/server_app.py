"""fedsim's ServerApp: build the strategy the run config names and run its rounds.

The global model is evaluated on the server's test set before round 1, every
``eval-every`` rounds and after the last round. After each round fedsim's loop
(``FedsimStrategy.run``) calls one hook, which builds the round's row (``RoundEnd``) and
hands it to the round hooks in order: record the row (rounds.csv), the caller's hooks
(e.g. a progress bar), save a checkpoint (when evaluated), log the progress line, stop at
``stop-at-accuracy``. A hook returns True to end the run after that round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedsim.arrays import load_into
from fedsim.attacks import attacker_ids
from fedsim.checkpoint import load_checkpoint, restore_strategy, save_checkpoint
from fedsim.config import ConfigError, RunConfig
from fedsim.data.errors import DataError
from fedsim.device import device_label, resolve_device
from fedsim.errors import RunFailed
from fedsim.partitions import format_label_counts
from fedsim.partitions.batch_sizes import client_batch_sizes
from fedsim.protocol import ModelSpec, array_spec
from fedsim.results import RoundRow, RunWriter, environment_info
from fedsim.run_folder import claim_run_folder
from fedsim.runtime import Runtime, evaluate, runtime
from fedsim.strategies import FedsimStrategy, build_strategy
from fedsim.validation import check_experiment

app = ServerApp()


@dataclass(frozen=True)
class RoundEnd:
    """What the round hooks see after a round (round 0: the initial model, not trained)."""

    row: RoundRow  # the round's metrics; test metrics are NaN unless ``evaluated``
    arrays: ArrayRecord  # the global model after the round
    evaluated: bool


RoundHook = Callable[[RoundEnd], "bool | None"]  # True: end the run after this round


class Evaluator:
    """Turns (round, arrays, the strategy's round metrics) into a RoundEnd, evaluating the
    model on the test set when the round is due (round 0, every eval-every, the last)."""

    def __init__(self, cfg: RunConfig, rt: Runtime) -> None:
        from fedsim.models import build_model

        self.cfg = cfg
        self.x_test, self.y_test = rt.test_inputs(cfg), rt.y_test
        self.model = build_model(cfg.model_name, num_classes=rt.num_classes, seed=0).to(rt.device)
        self.t0 = time.perf_counter()

    def resume(self, seconds: float) -> None:
        """Continue a checkpoint's clock."""
        self.t0 = time.perf_counter() - seconds

    def __call__(self, server_round: int, arrays: ArrayRecord, metrics: MetricRecord | None) -> RoundEnd:
        row = RoundRow(round=server_round, seconds=time.perf_counter() - self.t0)
        if metrics is not None:
            row.train_loss = float(metrics.get("train-loss", math.nan))
            for key in ("bytes-up", "bytes-down", "clients", "rejected"):
                setattr(row, key.replace("-", "_"), int(metrics.get(key, 0)))
        due = server_round % self.cfg.eval_every == 0 or server_round == self.cfg.num_server_rounds
        if due:
            load_into(self.model, arrays)
            row.test_loss, row.test_accuracy = evaluate(self.model, self.x_test, self.y_test)
        return RoundEnd(row, arrays, due)


def record_rows(writer: RunWriter) -> RoundHook:
    """Hook: append the round's row to rounds.csv."""
    return lambda end: writer.add(end.row)


def save_checkpoints(writer: RunWriter, cfg: RunConfig, strategy: FedsimStrategy) -> RoundHook:
    """Hook: after each evaluated round, the checkpoint a killed run resumes from."""

    def hook(end: RoundEnd) -> None:
        if end.evaluated and end.row.round > 0:
            save_checkpoint(writer.path, end.row.round, cfg, end.arrays, strategy.state_dict(), end.row.seconds)

    return hook


def log_progress(cfg: RunConfig) -> RoundHook:
    """Hook: one log line per evaluated round."""

    def hook(end: RoundEnd) -> None:
        if end.evaluated:
            r = end.row
            log(
                INFO, "fedsim round %d/%d: test accuracy %.4f, test loss %.4f, train loss %.4f, up %d B, %.1f s",
                r.round, cfg.num_server_rounds, r.test_accuracy, r.test_loss, r.train_loss, r.bytes_up, r.seconds,
            )

    return hook


def stop_at_accuracy(target: float) -> RoundHook:
    """Hook: end the run at the first evaluated round (> 0) reaching ``target`` (0: never)."""

    def hook(end: RoundEnd) -> bool:
        reached = 0 < target <= end.row.test_accuracy and end.evaluated and end.row.round > 0
        if reached:
            log(INFO, "fedsim: stop-at-accuracy %.4f reached at round %d; stopping", target, end.row.round)
        return reached

    return hook


def run_experiment(
    grid: Grid,
    cfg: RunConfig,
    *,
    engine: str = "flower",
    hooks: Sequence[RoundHook] = (),
    engine_settings: Mapping[str, Any] | None = None,
) -> list[RoundRow]:
    """Build model, strategy and round hooks from ``cfg`` and run all rounds on ``grid``.
    ``engine`` and ``engine_settings`` (e.g. threads, workers) are recorded in summary.json;
    ``hooks`` run after each round, after the row is recorded and before the checkpoint."""
    from fedsim.models import build_model

    check_experiment(cfg)  # before waiting for nodes or touching the results folder
    environment = environment_info()  # before any round: the code this process runs
    device = resolve_device(cfg.device)
    rt = runtime(cfg.dataset, cfg.data_dir, device)
    model = build_model(cfg.model_name, num_classes=rt.num_classes, seed=cfg.seed)
    initial = ArrayRecord(model.state_dict())
    param_keys = [n for n, p in model.named_parameters() if p.requires_grad]

    nodes = wait_for_nodes(grid, cfg.num_nodes, cfg.node_wait)
    if len(nodes) != cfg.num_nodes:
        log(WARNING, "fedsim: num-nodes is %d but the federation has %d nodes; using %d", cfg.num_nodes, len(nodes), len(nodes))
        check_experiment(cfg, num_nodes=len(nodes))
    # Replies may claim partition ids below max(num-nodes, connected nodes) and at most the
    # training set's size as num-examples: a node cannot grow the server's state at will.
    strategy = build_strategy(
        cfg, ModelSpec.of(array_spec(initial), param_keys),
        num_partitions=max(cfg.num_nodes, len(nodes)), max_examples=len(rt.y_train), device=device,
    )
    sizes = client_batch_sizes(cfg.batch_size, cfg.batch_sizes, cfg.batch_mode, max(len(nodes), 1), cfg.seed)
    log(INFO, "fedsim: %s on %s (%s), %d nodes, batch sizes by partition %s", cfg.strategy, cfg.dataset, cfg.model_name, len(nodes), sizes)

    attackers = attacker_ids(cfg.seed, max(len(nodes), 1), min(cfg.attackers, max(len(nodes), 1)))
    if attackers:
        log(INFO, "fedsim: %d attackers (%s) by partition id: %s", len(attackers), cfg.attack, attackers)
    counts = _label_counts(cfg, rt, max(len(nodes), 1))
    log(INFO, "fedsim: label counts per client (%s partition):\n%s", cfg.partitioning, format_label_counts(counts))
    # The folder's lock is held from here until writer.finish has written the summary
    # (re-entrant: the CLI or a sweep in this process may hold it already).
    folder = Path(cfg.results_dir) if cfg.results_dir else None
    writer = RunWriter(folder, lock=claim_run_folder(folder, cfg)) if folder is not None else None
    try:  # the lock goes with the run, however it ends (finish releases it on success)
        evaluator = Evaluator(cfg, rt)
        rows: list[RoundRow] = []
        checkpoint = load_checkpoint(writer.path, cfg, initial) if writer is not None else None
        stored = writer.resume(checkpoint.round) if checkpoint is not None else None  # None: rounds.csv cannot continue it
        if checkpoint is not None and stored is not None and restore_strategy(strategy, checkpoint, writer.path):
            log(INFO, "fedsim: resuming from the checkpoint after round %d in %s", checkpoint.round, writer.path)
            initial = checkpoint.arrays
            rows = list(stored)
            evaluator.resume(checkpoint.seconds)
        else:
            checkpoint = None
            if writer is not None:
                writer.start(cfg.to_mapping())
                np.savetxt(writer.folder.label_counts, counts, fmt="%d", delimiter=",")
        round_hooks: list[RoundHook] = [rows_of(rows)]
        if writer is not None:
            round_hooks.append(record_rows(writer))
        round_hooks += list(hooks)
        if writer is not None:
            round_hooks.append(save_checkpoints(writer, cfg, strategy))
        round_hooks += [log_progress(cfg), stop_at_accuracy(cfg.stop_at_accuracy)]

        def on_round_end(server_round: int, arrays: ArrayRecord, metrics: MetricRecord | None) -> bool:
            end = evaluator(server_round, arrays, metrics)
            return any([bool(hook(end)) for hook in round_hooks])  # a list: every hook runs

        t0 = time.perf_counter()
        final_arrays = strategy.run(
            grid, initial, cfg.num_server_rounds, on_round_end, timeout=cfg.round_timeout,
            train_config=train_config(device), first_round=checkpoint.round + 1 if checkpoint is not None else 1,
        )
        wall = time.perf_counter() - t0
        last = rows[-1]
        stopped_at = last.round if last.round < cfg.num_server_rounds else None
        log(INFO, "fedsim: final test accuracy %.4f after %d rounds (%.1f s)", last.test_accuracy, last.round, wall)
        short = rounds_below_min_replies(rows, cfg.min_replies)
        trained = sum(1 for r in rows if r.round > 0)
        failed = None
        if trained and len(short) == trained:
            failed = (
                f"no round had min-replies={cfg.min_replies} valid replies, so the model never changed "
                f"(every reply was rejected or too few came: see the log's 'rejected the reply' lines and the clients/rejected "
                f"columns of rounds.csv)"
            )
        elif short:
            log(WARNING, "fedsim: %d of %d rounds had fewer than min-replies=%d valid replies and left the model unchanged", len(short), trained, cfg.min_replies)
        if writer is not None:
            writer.finish(
                final_arrays.to_torch_state_dict(),
                {
                    "seed": cfg.seed, "engine": engine, "engine_settings": dict(engine_settings or {}), "device": str(device),
                    "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "client_devices": sorted({device_label(code) for code in strategy.reported_devices.values()}),
                    "final_test_accuracy": last.test_accuracy, "final_test_loss": last.test_loss,
                    "rounds": last.round, "stopped_early_at_round": stopped_at, "num_nodes": len(nodes), "batch_sizes": sizes,
                    "batch_sizes_reported": dict(sorted(strategy.reported_batch_sizes.items())),
                    "resumed_after_round": checkpoint.round if checkpoint is not None else None,
                    "rounds_below_min_replies": len(short), "failed": failed,
                    "attackers": attackers, "attack": cfg.attack if attackers else None, "algorithm": strategy.algorithm.report(),
                    "wall_seconds": wall, **environment,
                },
            )
    finally:
        if writer is not None and writer.lock is not None:
            writer.lock.release()  # idempotent
    if failed:
        raise RunFailed(failed + (f"; results in {writer.path}" if writer is not None else ""))
    return rows


def rows_of(rows: list[RoundRow]) -> RoundHook:
    """Hook: collect the rows in ``rows`` (what run_experiment returns)."""
    return lambda end: rows.append(end.row)


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


def _label_counts(cfg: RunConfig, rt: Runtime, num_clients: int) -> np.ndarray:
    """Each client's label histogram [clients, classes] under the run's partition."""
    from fedsim.partitions import label_counts, partition_indices

    labels = rt.splits.y_train.numpy()
    return label_counts(labels, partition_indices(labels, cfg.partitioning, num_clients, cfg.seed), rt.num_classes)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point (``flwr run .``, a deployment). A bad run config (or a run that
    learned nothing) is one ERROR line, not a traceback, and the run ends there. (fedsim's
    in-process engine calls ``run_experiment`` itself, and its caller reports errors.)"""
    try:
        run_experiment(grid, RunConfig.from_mapping(context.run_config), engine="flower")
    except (ConfigError, DataError, RunFailed) as err:
        log(ERROR, "fedsim: error: %s", err)
