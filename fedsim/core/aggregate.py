"""Example-weighted means: the aggregation of FedSGD and FedAvg, and of federated
evaluation's per-client figures; and the finiteness check every model passes before it
is committed (the strategy's new global model, a checkpoint's arrays)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

MEAN_BLOCK = 32_768  # coordinates per pass of weighted_mean: 256 KB of float64 accumulator


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float], dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum_k (n_k / m) x_k with m = sum_k n_k, accumulated in float64 in the given order;
    returned in ``dtype`` (default: the tensors')."""
    if len(tensors) == 0 or len(tensors) != len(weights):
        raise ValueError(f"weighted_mean: need as many weights as tensors (>0), got {len(tensors)} and {len(weights)}")
    total = float(sum(weights))
    if not total > 0 or any(w < 0 for w in weights):
        raise ValueError(f"weighted_mean: weights must be >= 0 with a positive sum, got {list(weights)}")
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    flat, rows = acc.view(-1), [t.reshape(-1) for t in tensors]
    alphas = [w / total for w in weights]
    # Block by block of coordinates, every row into the block: the float64 block stays in
    # cache across the rows (a whole accumulator would be reread from memory once per row).
    # Each coordinate still sums the same terms in the same order: the same bits. Each
    # float64 += (w / m) * t casts t on the fly: the same bits as casting t first (exact).
    for start in range(0, flat.numel(), MEAN_BLOCK):
        block = flat[start:start + MEAN_BLOCK]
        for t, alpha in zip(rows, alphas, strict=True):
            block.add_(t[start:start + MEAN_BLOCK], alpha=alpha)
    return acc.to(dtype or tensors[0].dtype)


def evaluation_figures(num_examples: Sequence[int], losses: Sequence[float], metrics: dict[str, Sequence[float]]) -> dict[str, float]:
    """Federated evaluation's figures over the clients k that replied, n_k their held-out
    examples: ``loss`` and each metric m as sum_k (n_k / sum n) m_k; for ``accuracy`` also
    its unweighted mean over clients, 10th percentile (linear interpolation) and minimum;
    ``clients`` the number of replies. Empty input: ``{"clients": 0}``."""
    if len(num_examples) == 0:
        return {"clients": 0.0}
    w = np.asarray(num_examples, dtype=np.float64)
    out = {"clients": float(len(w)), "loss": float(np.average(np.asarray(losses, dtype=np.float64), weights=w))}
    for name, values in metrics.items():
        v = np.asarray(values, dtype=np.float64)
        out[name] = float(np.average(v, weights=w))
        if name == "accuracy":
            out["accuracy_client_mean"] = float(v.mean())
            out["accuracy_p10"] = float(np.percentile(v, 10))
            out["accuracy_min"] = float(v.min())
    return out


def non_finite_keys(arrays: Mapping[str, np.ndarray | torch.Tensor]) -> list[str]:
    """The keys (in order) of the float entries holding a NaN or an infinity; integer
    entries are finite by construction. Empty: every x_i is finite."""
    out = []
    for key, value in arrays.items():
        if isinstance(value, torch.Tensor):
            bad = value.is_floating_point() and not bool(torch.isfinite(value).all())
        else:
            bad = np.issubdtype(value.dtype, np.floating) and not bool(np.isfinite(value).all())
        if bad:
            out.append(key)
    return out


def payload_norm(payload: object) -> float:
    """||payload||_2 over its float content: every float array, tensor and number (bools
    and integer arrays, e.g. packed signs, count 0), through mappings, tuples and lists;
    sqrt(sum x^2) in float64 (inf if that overflows, NaN if a value is NaN)."""
    return math.sqrt(_square_sum(payload))


def _square_sum(payload: object) -> float:
    if isinstance(payload, Mapping):
        return sum((_square_sum(v) for v in payload.values()), 0.0)
    if isinstance(payload, (tuple, list)):
        return sum((_square_sum(v) for v in payload), 0.0)
    if isinstance(payload, torch.Tensor):
        payload = payload.detach().double().cpu().numpy() if payload.is_floating_point() else None
    if isinstance(payload, np.ndarray) and np.issubdtype(payload.dtype, np.floating):
        with np.errstate(over="ignore", invalid="ignore"):
            return float(np.square(payload, dtype=np.float64).sum())
    if isinstance(payload, float):
        return payload * payload
    return 0.0
