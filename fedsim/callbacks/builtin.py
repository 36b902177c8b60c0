"""fedsim's own per-round work, one callback each: collect the rows, append them to
rounds.csv, save the checkpoint, log the progress line, stop at an accuracy."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from fedsim.callbacks.base import Callback, RoundEnd, RunStart
from fedsim.checkpoint import save_checkpoint
from fedsim.config import RunConfig
from fedsim.results import RoundRow, RunWriter


class CollectRows(Callback):
    """Keeps every round's row in ``rows`` (what run_experiment returns)."""

    def __init__(self, rows: list[RoundRow]) -> None:
        self.rows = rows

    def on_round_end(self, end: RoundEnd) -> None:
        self.rows.append(end.row)


class RoundsCsv(Callback):
    """Appends each round's row to the run's rounds.csv."""

    def __init__(self, writer: RunWriter) -> None:
        self.writer = writer

    def on_round_end(self, end: RoundEnd) -> None:
        self.writer.add(end.row)


class ClientsCsv(Callback):
    """Federated evaluation's per-client figures, one row per client and evaluation round,
    in ``clients.csv`` (round, node_id, partition_id, num_examples, loss, each metric); a
    resumed run drops the rows of the rounds it runs again."""

    def __init__(self, path: Path, names: Sequence[str]) -> None:
        self.path, self.columns = path, ["round", "node_id", "partition_id", "num_examples", "loss", *names]

    def on_run_start(self, start: RunStart) -> None:
        kept: list[list[str]] = []
        if start.first_round > 1 and self.path.exists():
            with open(self.path, newline="") as f:
                rows = list(csv.reader(f))
            kept = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < start.first_round] if rows[:1] == [self.columns] else []
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows([self.columns, *kept])

    def on_round_end(self, end: RoundEnd) -> None:
        if end.fed is None:
            return
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerows(
                [end.row.round, c.node_id, "" if c.partition_id is None else c.partition_id, c.num_examples, repr(c.loss), *(repr(c.values[n]) for n in self.columns[5:])]
                for c in end.fed.clients
            )


class Checkpointer(Callback):
    """After each evaluated round, the checkpoint a killed run resumes from; ``state``
    returns the strategy's state (``FedsimStrategy.state_dict``)."""

    def __init__(self, writer: RunWriter, cfg: RunConfig, state: Callable[[], dict[str, Any]]) -> None:
        self.writer, self.cfg, self.state = writer, cfg, state

    def on_round_end(self, end: RoundEnd) -> None:
        if end.evaluated and end.row.round > 0:
            save_checkpoint(self.writer.path, end.row.round, self.cfg, end.arrays, self.state(), end.row.seconds)


class LogLine(Callback):
    """One log line per evaluated round."""

    def __init__(self, num_rounds: int) -> None:
        self.num_rounds = num_rounds

    def on_round_end(self, end: RoundEnd) -> None:
        if end.evaluated or end.fed is not None:
            r = end.row
            fed = ""
            if "fed_accuracy" in r.extra:
                fed = f", federated accuracy {r.extra['fed_accuracy']:.4f} (client min {r.extra.get('fed_accuracy_min', float('nan')):.4f})"
            log(
                INFO, "fedsim round %d/%d: test accuracy %.4f, test loss %.4f%s, train loss %.4f, up %d B, %.1f s",
                r.round, self.num_rounds, r.test_accuracy, r.test_loss, fed, r.train_loss, r.bytes_up, r.seconds,
            )


class StopAtAccuracy(Callback):
    """Ends the run at the first evaluated round (> 0) reaching ``target`` (0: never)."""

    def __init__(self, target: float) -> None:
        self.target = target

    def on_round_end(self, end: RoundEnd) -> bool:
        reached = 0 < self.target <= end.row.test_accuracy and end.evaluated and end.row.round > 0
        if reached:
            log(INFO, "fedsim: stop-at-accuracy %.4f reached at round %d; stopping", self.target, end.row.round)
        return reached


class ProgressBar(Callback):
    """A tqdm progress bar of the rounds, with the last test accuracy and train loss (what
    ``fedsim run`` shows on the in-process engine instead of Flower's per-round lines)."""

    def __init__(self, num_rounds: int) -> None:
        from tqdm.auto import tqdm  # lazy: tqdm.auto probes for a notebook front end at import

        self.bar = tqdm(total=num_rounds, unit="round", disable=None, dynamic_ncols=True)

    def on_round_end(self, end: RoundEnd) -> None:
        row = end.row
        self.bar.update(row.round - self.bar.n)  # a resumed run starts at its checkpoint's round
        if row.test_accuracy == row.test_accuracy:  # not NaN
            self.bar.set_postfix(acc=f"{row.test_accuracy:.4f}", loss=f"{row.train_loss:.3f}")

    def on_run_end(self, end: Any) -> None:
        self.bar.close()
