"""Coordinate-wise median (Yin et al., ICML 2018; Flower's FedMedian, ``aggregate_median``).

med(x)_j = the median of x_{1,j}, ..., x_{n,j}: the middle value for odd n, the mean of the
two middle values for even n (numpy's convention, as Flower's). Unweighted: a client's
``num-examples`` does not count (as in Flower). Any n >= 1; with f < n/2 outliers each
coordinate stays within the range of the honest values.
"""

from __future__ import annotations

import torch


def median(x: torch.Tensor) -> torch.Tensor:
    """The coordinate-wise median of the rows of x (n clients x d coordinates)."""
    if x.shape[0] == 0:
        raise ValueError("median: need at least one client vector")
    return median_of_sorted(x.sort(dim=0).values)


def median_of_sorted(ordered: torch.Tensor) -> torch.Tensor:
    """The coordinate-wise median of rows already sorted per coordinate (at least one row)."""
    n = ordered.shape[0]
    if n % 2 == 1:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2
