"""fedsim's ServerApp: build the strategy named by the run config and run it.

The global model is evaluated on the server's test set before round 1, every
``eval-every`` rounds and after the last round; each round prints one progress line and,
when ``results-dir`` is set, appends a row to the run's results folder (fedsim.results).
"""

from __future__ import annotations

import math
from collections.abc import Callable
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedsim.checkpoint import load_checkpoint, restore_strategy, save_checkpoint
from fedsim.clients.batch_sizes import client_batch_sizes
from fedsim.clients.setup import device_dataset, input_transforms
from fedsim.clients.tasks import evaluate
from fedsim.config import ConfigError, RunConfig
from fedsim.data.errors import DataError
from fedsim.device import device_label, resolve_device
from fedsim.errors import RunFailed
from fedsim.partitions import format_label_counts
from fedsim.protocol import array_spec
from fedsim.results import RoundRow, RunWriter, environment_info
from fedsim.run_folder import LABEL_COUNTS, claim_run_folder
from fedsim.strategies import FedsimStrategy, build_strategy
from fedsim.strategies.model_vector import load_into
from fedsim.validation import check_experiment

app = ServerApp()


class _TargetReached(Exception):
    """Raised by the reporter to end the run early (``stop-at-accuracy``)."""

    def __init__(self, arrays: ArrayRecord) -> None:
        super().__init__()
        self.arrays = arrays


class RoundReporter:
    """The ``evaluate_fn`` given to ``Strategy.start``: evaluates, logs, records each round."""

    def __init__(
        self, cfg: RunConfig, strategy: FedsimStrategy, writer: RunWriter | None, on_round: Callable[[RoundRow], None] | None = None
    ) -> None:
        from fedsim.models import build_model

        self.cfg = cfg
        self.strategy = strategy
        self.writer = writer
        self.on_round = on_round
        self.device = resolve_device(cfg.device)
        _, _, x_test, self.y_test, splits = device_dataset(cfg.dataset, cfg.data_dir, self.device)
        _, eval_transform = input_transforms(cfg.dataset, splits.input_shape, cfg.model_name)
        self.x_test = eval_transform(x_test) if eval_transform is not None else x_test
        self.model = build_model(cfg.model_name, num_classes=splits.num_classes, seed=0).to(self.device)
        self.rows: list[RoundRow] = []
        self.t0 = time.perf_counter()

    def resume(self, rows: list[RoundRow], seconds: float) -> None:
        """Continue after a checkpoint: its rounds' rows, and its clock."""
        self.rows = list(rows)
        self.t0 = time.perf_counter() - seconds

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        row = RoundRow(round=server_round, seconds=time.perf_counter() - self.t0)
        train = self.strategy.last_metrics if server_round > 0 else None
        if train is not None:
            row.train_loss = float(train.get("train-loss", math.nan))
            for key in ("bytes-up", "bytes-down", "clients", "rejected"):
                setattr(row, key.replace("-", "_"), int(train.get(key, 0)))
        due = server_round % self.cfg.eval_every == 0 or server_round == self.cfg.num_server_rounds
        result = None
        if due:
            load_into(self.model, arrays)
            row.test_loss, row.test_accuracy = evaluate(self.model, self.x_test, self.y_test)
            result = MetricRecord({"test-accuracy": row.test_accuracy, "test-loss": row.test_loss})
        self.rows.append(row)
        if self.writer is not None:
            self.writer.add(row)
        if self.on_round is not None:
            self.on_round(row)
        if due and server_round > 0 and self.writer is not None:
            save_checkpoint(self.writer.path, server_round, self.cfg, arrays, self.strategy.state_dict(), row.seconds)
        if due:
            log(
                INFO,
                "fedsim round %d/%d: test accuracy %.4f, test loss %.4f, train loss %.4f, up %d B, %.1f s",
                server_round, self.cfg.num_server_rounds, row.test_accuracy, row.test_loss,
                row.train_loss, row.bytes_up, row.seconds,
            )
            if 0 < self.cfg.stop_at_accuracy <= row.test_accuracy and server_round > 0:
                raise _TargetReached(arrays)
        return result


def run_experiment(grid: Grid, cfg: RunConfig) -> list[RoundRow]:
    """Build model, strategy and reporter from ``cfg``, run all rounds on ``grid``."""
    engine = getattr(grid, "engine_name", "flower")
    from fedsim.models import build_model

    check_experiment(cfg)  # before waiting for nodes or touching the results folder
    environment = environment_info()  # before any round: the code this process runs
    device = resolve_device(cfg.device)
    splits = device_dataset(cfg.dataset, cfg.data_dir, device)[4]
    model = build_model(cfg.model_name, num_classes=splits.num_classes, seed=cfg.seed)
    initial = ArrayRecord(model.state_dict())
    param_keys = [n for n, p in model.named_parameters() if p.requires_grad]

    nodes = wait_for_nodes(grid, cfg.num_nodes, cfg.node_wait)
    if len(nodes) != cfg.num_nodes:
        log(WARNING, "fedsim: num-nodes is %d but the federation has %d nodes; using %d", cfg.num_nodes, len(nodes), len(nodes))
        check_experiment(cfg, num_nodes=len(nodes))
    # Replies may claim partition ids below max(num-nodes, connected nodes) and at most the
    # training set's size as num-examples: a node cannot grow the server's state at will.
    strategy = build_strategy(
        cfg, array_spec(initial), param_keys,
        num_partitions=max(cfg.num_nodes, len(nodes)), max_examples=len(splits.y_train), device=device,
    )
    sizes = client_batch_sizes(cfg.batch_size, cfg.batch_sizes, cfg.batch_mode, max(len(nodes), 1), cfg.seed)
    log(INFO, "fedsim: %s on %s (%s), %d nodes, batch sizes by partition %s", cfg.strategy, cfg.dataset, cfg.model_name, len(nodes), sizes)

    counts = _label_counts(cfg, max(len(nodes), 1))
    log(INFO, "fedsim: label counts per client (%s partition):\n%s", cfg.partitioning, format_label_counts(counts))
    # The folder's lock is held from here until writer.finish has written the summary
    # (re-entrant: the CLI or a sweep in this process may hold it already).
    folder = Path(cfg.results_dir) if cfg.results_dir else None
    writer = RunWriter(folder, lock=claim_run_folder(folder, cfg)) if folder is not None else None
    try:  # the lock goes with the run, however it ends (finish releases it on success)
        reporter = RoundReporter(cfg, strategy, writer, getattr(grid, "on_round", None))
        checkpoint = load_checkpoint(writer.path, cfg, initial) if writer is not None else None
        rows = writer.resume(checkpoint.round) if checkpoint is not None else None  # None: rounds.csv cannot continue it
        if checkpoint is not None and rows is not None and restore_strategy(strategy, checkpoint, writer.path):
            log(INFO, "fedsim: resuming from the checkpoint after round %d in %s", checkpoint.round, writer.path)
            initial = checkpoint.arrays
            reporter.resume(rows, checkpoint.seconds)
        else:
            checkpoint = None
            if writer is not None:
                writer.start(cfg.to_mapping())
                np.savetxt(writer.path / LABEL_COUNTS, counts, fmt="%d", delimiter=",")
        first_round = checkpoint.round + 1 if checkpoint is not None else 1
        t0 = time.perf_counter()
        try:
            result = strategy.start(
                grid=grid, initial_arrays=initial, num_rounds=cfg.num_server_rounds, timeout=cfg.round_timeout,
                train_config=train_config(device),
                evaluate_fn=reporter, first_round=first_round,
            )
            final_arrays, stopped_at = result.arrays, None
        except _TargetReached as stop:
            final_arrays, stopped_at = stop.arrays, reporter.rows[-1].round
            log(INFO, "fedsim: stop-at-accuracy %.4f reached at round %d; stopping", cfg.stop_at_accuracy, stopped_at)
        wall = time.perf_counter() - t0
        last = reporter.rows[-1]
        log(INFO, "fedsim: final test accuracy %.4f after %d rounds (%.1f s)", last.test_accuracy, last.round, wall)
        short = rounds_below_min_replies(reporter.rows, cfg.min_replies)
        trained = sum(1 for r in reporter.rows if r.round > 0)
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
                final_arrays.to_torch_state_dict() if final_arrays is not None else None,
                {
                    "seed": cfg.seed, "engine": engine, "device": str(device),
                    "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "client_devices": sorted({device_label(code) for code in strategy.reported_devices.values()}),
                    "final_test_accuracy": last.test_accuracy, "final_test_loss": last.test_loss,
                    "rounds": last.round, "stopped_early_at_round": stopped_at, "num_nodes": len(nodes), "batch_sizes": sizes,
                    "batch_sizes_reported": dict(sorted(strategy.reported_batch_sizes.items())),
                    "resumed_after_round": checkpoint.round if checkpoint is not None else None,
                    "rounds_below_min_replies": len(short), "failed": failed,
                    "wall_seconds": wall, **environment,
                },
            )
    finally:
        if writer is not None and writer.lock is not None:
            writer.lock.release()  # idempotent
    if failed:
        raise RunFailed(failed + (f"; results in {writer.path}" if writer is not None else ""))
    return reporter.rows


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


def _label_counts(cfg: RunConfig, num_clients: int) -> np.ndarray:
    """Each client's label histogram [clients, classes] under the run's partition."""
    from fedsim.partitions import label_counts, partition_indices

    splits = device_dataset(cfg.dataset, cfg.data_dir, resolve_device(cfg.device))[4]
    labels = splits.y_train.numpy()
    return label_counts(labels, partition_indices(labels, cfg.partitioning, num_clients, cfg.seed), splits.num_classes)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point (``flwr run .``). Under Flower's runtime a bad run config (or a
    run that learned nothing) is one ERROR line, not a traceback, and the run ends there;
    on the in-process engine the error reaches the caller."""
    try:
        run_experiment(grid, RunConfig.from_mapping(context.run_config))
    except (ConfigError, DataError, RunFailed) as err:
        if getattr(grid, "engine_name", None) == "inprocess":
            raise  # fedsim's own engine: its caller (the CLI, a notebook) reports it
        log(ERROR, "fedsim: error: %s", err)
