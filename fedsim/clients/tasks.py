"""What a client computes for one train message; no Flower here.

A client's data is a shared tensor ``x`` (on the training device) and the int64
``indices`` of its examples in it, so that every client of a process can share one copy
of the dataset (the "full copy" partition would otherwise hold it M times).

Micro-batches: a minibatch gradient over more than ``MICRO_BATCH`` examples is computed
as the sum of the gradients of near-equal parts (``micro_batches``), divided by B. The
split depends on B alone, never on threads or workers, so every engine and worker count
gives the same bits; against one whole-batch backward it changes only the order of the
floating-point sums (|difference| ~1e-8 for the MNIST CNN at B = 904). Parts cost less per example
than one big batch on a CPU (cache) and can run on several threads (``part_map``, which
the in-process engine sets). Models whose training forward pass couples the examples of a
batch (BatchNorm statistics) or draws random numbers (dropout) always use whole batches.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from fedsim.objective import CLASSIFICATION, Objective

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
T = TypeVar("T")
R = TypeVar("R")
PartMap = Callable[[Callable[[T], R], Sequence[T]], list[R]]

# Largest micro-batch. On one CPU thread the FV MNIST CNN costs about as much per example
# in parts of 113-151 as in batches of 64-154, and about 30% more in one batch of 904
# (README "Speed"); 160 leaves the batch modes' B = 4, 64 and 154 whole (their results as
# before micro-batches) and splits 304 and 904 into parts that several threads can share.
MICRO_BATCH = 160


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


def micro_batches(batch_size: int) -> list[int]:
    """Sizes of the parts a batch of ``batch_size`` examples is split into: ceil(B / MICRO_BATCH)
    near-equal parts (the first B mod k one larger), in order; [B] when B <= MICRO_BATCH."""
    k = max(1, -(-batch_size // MICRO_BATCH))
    return [batch_size // k + (1 if i < batch_size % k else 0) for i in range(k)]


_PART_MAP: ContextVar[PartMap | None] = ContextVar("fedsim_part_map", default=None)


@contextlib.contextmanager
def part_map(mapper: PartMap) -> Iterator[None]:
    """Within the block (this thread/context), micro-batches run through ``mapper(fn, items)``,
    which must return ``[fn(i) for i in items]`` in order, computed anywhere (e.g. other threads)."""
    token = _PART_MAP.set(mapper)
    try:
        yield
    finally:
        _PART_MAP.reset(token)


def _sequential_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    return [fn(item) for item in items]


def minibatch_gradient(
    model: nn.Module, data: LocalData, batch_size: int, generator: torch.Generator, objective: Objective = CLASSIFICATION
) -> tuple[list[torch.Tensor], float, int]:
    """g = (1/B) sum_{d in batch} grad F(x; d) over one minibatch (B = 0: the whole local set),
    F the objective's loss (default: cross-entropy).

    Returns the gradient of every trainable parameter (in ``model.parameters()`` order),
    the minibatch loss and B. Batches over MICRO_BATCH examples are summed from parts
    (module docstring).
    """
    rows = sample_rows(len(data), batch_size, generator)
    x, y = data.batch(rows, generator)  # whole batch at once: augmentation draws as without parts
    if not model.training:  # model.train() walks every module; skip it when already set
        model.train()
    params = trainable_parameters(model)
    sizes = micro_batches(int(rows.numel())) if batch_separable(model) else [int(rows.numel())]
    if len(sizes) == 1:
        for p in params:
            p.grad = None
        loss = objective.loss(model(x), y)
        loss.backward()
        grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
        return grads, float(loss.detach()), int(rows.numel())
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)

    def part(i: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        # autograd.grad, not backward(): parts may run at once on other threads, and nothing
        # may accumulate into the shared .grad fields
        loss_sum = objective.loss_sum(model(x[bounds[i] : bounds[i + 1]]), y[bounds[i] : bounds[i + 1]])
        return list(torch.autograd.grad(loss_sum, params, allow_unused=True)), loss_sum.detach()

    mapper = _PART_MAP.get() or _sequential_map
    parts = mapper(part, range(len(sizes)))
    b = int(rows.numel())
    grads = []
    for j, p in enumerate(params):
        summed: torch.Tensor | None = None
        for g_parts, _ in parts:  # summed in part order: the same bits wherever the parts ran
            g = g_parts[j] if g_parts[j] is not None else torch.zeros_like(p)
            summed = g.clone() if summed is None else summed.add_(g)
        assert summed is not None  # there are at least two parts here
        grads.append(summed.div_(b))
    return grads, sum(float(part_loss) for _, part_loss in parts) / b, b


def batch_separable(model: nn.Module) -> bool:
    """Whether a training forward pass treats each example on its own and draws no random
    numbers (no BatchNorm/InstanceNorm, no dropout): then a batch may be split into parts."""
    flag = _SEPARABLE.get(model)
    if flag is None:
        coupled = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)
        flag = _SEPARABLE[model] = not any(isinstance(m, coupled) for m in model.modules())
    return flag


_SEPARABLE: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


_PARAMS: weakref.WeakKeyDictionary[nn.Module, list[nn.Parameter]] = weakref.WeakKeyDictionary()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """``[p for p in model.parameters() if p.requires_grad]``, cached per model (the module
    walk behind ``parameters()`` costs more than a small model's forward pass)."""
    params = _PARAMS.get(model)
    if params is None:
        params = _PARAMS[model] = [p for p in model.parameters() if p.requires_grad]
    return params


def flat_gradient(
    model: nn.Module, data: LocalData, batch_size: int, generator: torch.Generator, objective: Objective = CLASSIFICATION
) -> tuple[torch.Tensor, float, int]:
    """minibatch_gradient, concatenated into one vector of length N."""
    grads, loss, b = minibatch_gradient(model, data, batch_size, generator, objective)
    return torch.cat([g.reshape(-1) for g in grads]), loss, b


def local_epochs(
    model: nn.Module, data: LocalData, epochs: int, batch_size: int, lr: float, generator: torch.Generator,
    objective: Objective = CLASSIFICATION,
) -> tuple[float, int]:
    """FedAvg's ClientUpdate: E epochs of plain minibatch SGD (lr, batch B; B = 0: full batch)
    on the objective's loss (default: cross-entropy).

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
            loss = objective.loss(model(x), y)
            loss.backward()
            opt.step()
            losses += loss.detach()
            steps += 1
    return float(losses / max(steps, 1)), steps
