"""What a model is trained and evaluated for: the loss and the metrics of a task.

The default is classification: cross-entropy loss and accuracy. A user's task names its
own by import path: ``loss = "pkg.mod:fn"`` with ``fn(outputs, targets)`` the mean loss
over a batch (a scalar tensor with a gradient), and ``metrics = "pkg.mod:fn"`` with
``fn(outputs, targets)`` a ``{name: number}`` dict computed on a whole evaluation set
(e.g. a regression's ``{"mae": ...}``). Every algorithm only needs the loss's gradient.

Sums over a batch's parts (micro-batches) use ``loss_sum``: for the default it is
``cross_entropy(..., reduction="sum")`` (the same bits as before tasks were pluggable);
for a user's loss it is ``loss(outputs, targets) * len(targets)``, which equals the sum
for any loss that is a mean over examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from fedsim.errors import ConfigError
from fedsim.plugins import load_attr

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Metrics = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``{"accuracy": fraction of argmax(outputs) == targets}``."""
    return {"accuracy": float((outputs.argmax(dim=1) == targets).sum()) / max(len(targets), 1)}


@dataclass(frozen=True)
class Objective:
    """A task's loss and metrics (module docstring); ``classification``: integer class
    targets (the default loss, or a user's loss on class ids)."""

    loss: Loss = F.cross_entropy
    metrics: Metrics | None = accuracy
    classification: bool = True
    builtin: bool = True

    def loss_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum of the per-example losses of a batch."""
        if self.builtin:
            return F.cross_entropy(outputs, targets, reduction="sum")
        return self.loss(outputs, targets) * len(targets)


CLASSIFICATION = Objective()


def user_objective(loss: str, metrics: str, classification: bool) -> Objective:
    """The objective a run config names (``loss``/``metrics``, "" for the default's)."""
    if not loss and not metrics:
        return CLASSIFICATION
    loss_fn: Loss = _callable(loss, "loss") if loss else F.cross_entropy
    metrics_fn: Metrics | None = _callable(metrics, "metrics") if metrics else (accuracy if classification else None)
    return Objective(loss_fn, metrics_fn, classification, builtin=not loss)


def _callable(path: str, what: str) -> Any:
    fn = load_attr(path, what)
    if not callable(fn):
        raise ConfigError(f"{what}={path!r} is a {type(fn).__name__}, not a function")
    return fn


def checked_metrics(values: object, where: str) -> dict[str, float]:
    """A metrics function's result as {name: finite float}; ConfigError naming the problem."""
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ConfigError(f"{where} returned a {type(values).__name__}; return a dict of name -> number")
    out = {}
    for k, v in values.items():
        try:
            number = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} returned {k}={v!r}, not a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where} returned {k}={number}, not finite")
        out[k] = number
    return out
