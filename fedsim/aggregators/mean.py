"""The plain mean: fedsim's default aggregator, FedSGD's and FedAvg's rule since the start.

mean(x) = sum_i (n_i / m) x_i with m = sum_i n_i: weighted by the clients' ``num-examples``
(``fedsim.core.aggregate.weighted_mean``, float64 accumulation in client order). It has no
condition on the number of replies and no robustness: one client can move it anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsim.core.aggregate import weighted_mean


def mean(x: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """sum_i (n_i / m) x_i over the rows of x (n clients x d coordinates), m = sum_i n_i."""
    return weighted_mean(list(x.unbind(0)), weights)
