"""Bulyan (El Mhamdi, Guerraoui and Rouault, ICML 2018; Flower's ``aggregate_bulyan`` with
Krum as its selection rule).

With f assumed attackers among n >= 4f + 3 clients: select theta = n - 2f clients by
repeated Krum (each time the lowest Krum score among those not yet selected, with f kept
and k = clamp(r - f - 2, 1, r - 1) neighbours among the r remaining, as Flower's; exact
ties by the vectors' values, ``fedsim.aggregators.krum.ranking``), then per coordinate j
average the beta = theta - 2f selected values closest to the selected values' median
(numpy's median convention; a tie in distance goes to the smaller value). Unweighted (as
in Flower). With f = 0 it is the plain unweighted mean.
"""

from __future__ import annotations

import torch

from fedsim.aggregators.krum import krum_scores, ranking, squared_distances
from fedsim.aggregators.median import median_of_sorted


def min_clients(f: int) -> int:
    """The fewest clients Bulyan accepts for f attackers: n >= 4f + 3."""
    return 4 * f + 3


def bulyan_selection(x: torch.Tensor, f: int) -> list[int]:
    """The theta = n - 2f rows chosen by repeated Krum, in the order chosen."""
    distances = squared_distances(x)
    remaining = list(range(x.shape[0]))
    chosen: list[int] = []
    for _ in range(x.shape[0] - 2 * f):
        sub = distances[remaining][:, remaining]
        chosen.append(remaining.pop(ranking(krum_scores(sub, f), x, rows=remaining)[0]))
    return chosen


def bulyan(x: torch.Tensor, f: int) -> torch.Tensor:
    """Per coordinate, the mean of the beta = n - 4f selected values closest to their median
    (x: n clients x d coordinates)."""
    n = x.shape[0]
    if f < 0 or n < min_clients(f):
        raise ValueError(f"bulyan: need n >= 4f + 3 clients, got n={n}, f={f}")
    ordered = x[bulyan_selection(x, f)].sort(dim=0).values  # per coordinate, smallest first
    beta = ordered.shape[0] - 2 * f
    nearest = (ordered - median_of_sorted(ordered)).abs().argsort(dim=0, stable=True)[:beta]
    return ordered.gather(0, nearest).mean(dim=0)
