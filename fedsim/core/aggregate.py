"""Example-weighted means: the aggregation of FedSGD and FedAvg."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_k (n_k / m) x_k with m = sum_k n_k, accumulated in float64 in the given order."""
    if len(tensors) == 0 or len(tensors) != len(weights):
        raise ValueError(f"weighted_mean: need as many weights as tensors (>0), got {len(tensors)} and {len(weights)}")
    total = float(sum(weights))
    if not total > 0 or any(w < 0 for w in weights):
        raise ValueError(f"weighted_mean: weights must be >= 0 with a positive sum, got {list(weights)}")
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for t, w in zip(tensors, weights, strict=True):
        acc.add_(t.to(torch.float64), alpha=w / total)
    return acc.to(tensors[0].dtype)
