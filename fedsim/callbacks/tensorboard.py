"""TensorBoard event files of a run: every metric of rounds.csv per round, and the run
config as text and as hyperparameters (``--tensorboard DIR`` or ``tensorboard = "DIR"``).

Needs the ``tensorboard`` package (``pip install 'fedsim[tensorboard]'``); the writer is
torch's ``torch.utils.tensorboard.SummaryWriter``. Each run writes its own subfolder of
DIR, named after its results folder, so ``tensorboard --logdir DIR`` shows runs side by
side. Scalars are tagged ``train/loss``, ``test/accuracy``, ``test/loss``,
``comm/bytes_up``, ``comm/bytes_down``, ``clients/valid``, ``clients/rejected``, ``time/seconds``,
with the round as the step; test metrics only in evaluated rounds. A task's other metrics
are ``test/<name>``; federated evaluation's figures ``fed/<name>`` (``fed/accuracy``,
``fed/accuracy_p10``, ...) and the per-client accuracies as a histogram
``fed/client_accuracy``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.callbacks.base import Callback, RoundEnd, RunEnd, RunStart
from fedsim.errors import ConfigError

TAGS = {
    "train_loss": "train/loss", "test_accuracy": "test/accuracy", "test_loss": "test/loss", "bytes_up": "comm/bytes_up",
    "bytes_down": "comm/bytes_down", "clients": "clients/valid", "rejected": "clients/rejected", "seconds": "time/seconds",
}


def summary_writer_class() -> Any:
    """torch's SummaryWriter; ConfigError (one line, with the fix) if tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # lazy: an optional extra
    except ImportError:
        raise ConfigError("tensorboard logging needs the tensorboard package: pip install 'fedsim[tensorboard]'") from None
    return SummaryWriter


class TensorBoard(Callback):
    """Writes the run's metrics to ``<logdir>/<run name>/`` (module docstring)."""

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self._writer_class = summary_writer_class()  # fails before the run starts
        self.writer: Any = None

    def on_run_start(self, start: RunStart) -> None:
        name = start.folder.name if start.folder is not None else "run"
        self.writer = self._writer_class(log_dir=str(self.logdir / name), purge_step=start.first_round)
        config = start.cfg.to_mapping()
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```", 0)
        hparams = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
        self.writer.add_hparams(hparams, {"hparam/final_test_accuracy": math.nan}, run_name=".")

    def on_round_end(self, end: RoundEnd) -> None:
        step = end.row.round
        scalars = {tag: float(getattr(end.row, column)) for column, tag in TAGS.items()}
        scalars.update({name.replace("_", "/", 1): value for name, value in end.row.extra.items()})
        for tag, value in scalars.items():
            if not math.isnan(value):
                self.writer.add_scalar(tag, value, step)
        if end.fed is not None and end.fed.clients and "accuracy" in end.fed.clients[0].values:
            self.writer.add_histogram("fed/client_accuracy", np.array([c.values["accuracy"] for c in end.fed.clients]), step)
        self.writer.flush()

    def on_run_end(self, end: RunEnd) -> None:
        if self.writer is None:
            return
        if end.summary is not None and end.summary.get("final_test_accuracy") is not None:
            self.writer.add_scalar("hparam/final_test_accuracy", float(end.summary["final_test_accuracy"]), end.rows[-1].round if end.rows else 0)
        self.writer.close()
