"""What a client computes for one train message; no Flower here.

A client's data is a shared tensor ``x`` (on the training device) and the int64
``indices`` of its examples in it, so that every client of a process can share one copy
of the dataset (the "full copy" partition would otherwise hold it M times).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class LocalData:
    """A client's view of the training set: rows ``indices`` of ``x`` and ``y``."""

    x: torch.Tensor
    y: torch.Tensor
    indices: torch.Tensor
    augment: Augment | None = None

    def __len__(self) -> int:
        return int(self.indices.numel())

    def batch(self, rows: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at positions ``rows`` of this client's index list."""
        idx = self.indices[rows.to(self.indices.device)]
        x = self.x[idx]
        if self.augment is not None:
            x = self.augment(x, generator)
        return x, self.y[idx]


def sample_rows(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """B distinct positions in range(n), uniformly without replacement; B = 0 or B >= n: all.

    Drawn on the generator's device, so a CUDA client never syncs with the host here.
    """
    if batch_size <= 0 or batch_size >= n:
        return torch.arange(n, device=generator.device)
    return torch.randperm(n, generator=generator, device=generator.device)[:batch_size]


def minibatch_gradient(
    model: nn.Module, data: LocalData, batch_size: int, generator: torch.Generator
) -> tuple[list[torch.Tensor], float, int]:
    """g = (1/B) sum_{d in batch} grad F(x; d) over one minibatch (B = 0: the whole local set).

    Returns the gradient of every trainable parameter (in ``model.parameters()`` order),
    the minibatch loss and B.
    """
    rows = sample_rows(len(data), batch_size, generator)
    x, y = data.batch(rows, generator)
    if not model.training:  # model.train() walks every module; skip it when already set
        model.train()
    params = trainable_parameters(model)
    for p in params:
        p.grad = None
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
    return grads, float(loss.detach()), int(rows.numel())


_PARAMS: "weakref.WeakKeyDictionary[nn.Module, list[nn.Parameter]]" = weakref.WeakKeyDictionary()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """``[p for p in model.parameters() if p.requires_grad]``, cached per model (the module
    walk behind ``parameters()`` costs more than a small model's forward pass)."""
    params = _PARAMS.get(model)
    if params is None:
        params = _PARAMS[model] = [p for p in model.parameters() if p.requires_grad]
    return params


def flat_gradient(
    model: nn.Module, data: LocalData, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, float, int]:
    """minibatch_gradient, concatenated into one vector of length N."""
    grads, loss, b = minibatch_gradient(model, data, batch_size, generator)
    return torch.cat([g.reshape(-1) for g in grads]), loss, b


def local_epochs(
    model: nn.Module, data: LocalData, epochs: int, batch_size: int, lr: float, generator: torch.Generator
) -> tuple[float, int]:
    """FedAvg's ClientUpdate: E epochs of plain minibatch SGD (lr, batch B; B = 0: full batch).

    Each epoch visits the local set once in a fresh random order. Returns the mean
    minibatch loss and the number of local steps taken.
    """
    n = len(data)
    b = n if batch_size <= 0 else min(batch_size, n)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    losses = torch.zeros((), device=data.x.device)
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator, device=generator.device)
        for start in range(0, n, b):
            x, y = data.batch(order[start : start + b], generator)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses += loss.detach()
            steps += 1
    return float(losses / max(steps, 1)), steps


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
        correct += (logits.argmax(dim=1) == target).sum()
    n = max(len(x), 1)
    return float(loss_sum) / n, float(correct) / n
