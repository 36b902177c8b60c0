"""A run's lifecycle as callbacks (modelled on pfl-research's TrainingProcessCallback).

A callback is an object with three methods, each a no-op in ``Callback``; subclass it and
override what you need:

- ``on_run_start(start)``: once, before round 1 (or the first round after a checkpoint);
- ``on_round_end(end) -> bool | None``: after every round, and for round 0 (the initial
  model, evaluated) when a run starts from scratch; return True to end the run after
  this round (every callback still sees the round);
- ``on_run_end(end)``: once, however the run ends (``end.status``: "finished", "failed"
  when it learned nothing, "error" when it raised); the results folder is complete by
  then for "finished" and "failed".

fedsim's own per-round work (rounds.csv, checkpoints, the log line, stop-at-accuracy,
the progress bar, TensorBoard, MLflow) is made of callbacks too (fedsim.callbacks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedsim.config import RunConfig
from fedsim.results import RoundRow
from fedsim.strategies.evaluation import FederatedEvaluation


@dataclass(frozen=True)
class RunStart:
    """What a run is, as it starts."""

    cfg: RunConfig
    folder: Path | None  # the results folder (None: a run that writes none)
    first_round: int  # 1, or the round after the checkpoint it resumes from
    num_params: int  # trainable parameters of the model
    facts: dict[str, Any] = field(default_factory=dict)  # e.g. num_nodes, batch_sizes, attackers


@dataclass(frozen=True)
class RoundEnd:
    """What a round left: its row (test metrics NaN unless ``evaluated``), the model and,
    when one ran this round, the federated evaluation (its figures are in ``row.extra``
    as ``fed_*``; ``fed.clients`` holds each client's reply)."""

    row: RoundRow
    arrays: ArrayRecord
    evaluated: bool
    fed: FederatedEvaluation | None = None


@dataclass(frozen=True)
class RunEnd:
    """How a run ended: ``status`` ("finished", "failed" or "error"), its rows and summary
    (None when it raised before writing one)."""

    status: str
    rows: list[RoundRow]
    summary: dict[str, Any] | None
    folder: Path | None


class Callback:
    """A run's lifecycle hooks; every method is a no-op here (module docstring)."""

    def on_run_start(self, start: RunStart) -> None:
        """Before the first round of this process."""

    def on_round_end(self, end: RoundEnd) -> bool | None:
        """After each round; True ends the run after it."""
        return None

    def on_run_end(self, end: RunEnd) -> None:
        """Once, however the run ended."""
