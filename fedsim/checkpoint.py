"""Checkpoints: what a run needs to continue after it was killed, bit for bit.

``checkpoint.pt`` in the run's folder holds the last evaluated round, the run config,
the global model and the strategy's state (node-sampling RNG; for the LLR vote the
agreement counts). Clients keep no state between rounds (their random streams derive
from seed, partition and round), so that is all. It is written atomically after every
evaluated round (``eval-every``) and deleted when the run finishes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log

from fedsim.config import RunConfig, same_experiment

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class Checkpoint:
    """The state after ``round`` rounds."""

    round: int
    arrays: ArrayRecord
    strategy: dict[str, Any]
    seconds: float


def save_checkpoint(
    folder: Path, server_round: int, cfg: RunConfig, arrays: ArrayRecord, strategy_state: dict[str, Any], seconds: float
) -> None:
    """Write ``folder/checkpoint.pt`` (via a temporary file and a rename: never half-written)."""
    tmp = folder / (CHECKPOINT + ".tmp")
    state = {
        "round": server_round,
        "config": cfg.to_mapping(),
        "arrays": arrays.to_torch_state_dict(),
        "strategy": strategy_state,
        "seconds": seconds,
    }
    torch.save(state, tmp)
    os.replace(tmp, folder / CHECKPOINT)


def load_checkpoint(folder: Path, cfg: RunConfig) -> Checkpoint | None:
    """The checkpoint in ``folder`` if there is one for this experiment, else None (a
    checkpoint of another experiment is ignored, with a warning)."""
    path = folder / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged checkpoint means: start over
        log(WARNING, "fedsim: cannot read %s (%s); starting from round 0", path, err)
        return None
    if not same_experiment(state["config"], cfg):
        log(WARNING, "fedsim: %s belongs to another run config; starting from round 0", path)
        return None
    return Checkpoint(int(state["round"]), ArrayRecord(state["arrays"]), state["strategy"], float(state["seconds"]))


def remove_checkpoint(folder: Path) -> None:
    (folder / CHECKPOINT).unlink(missing_ok=True)
