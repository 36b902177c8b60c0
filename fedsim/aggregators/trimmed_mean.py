"""Coordinate-wise trimmed mean (Yin et al., ICML 2018; Flower's FedTrimmedAvg,
``aggregate_trimmed_avg``).

Per coordinate j, sort x_{1,j}, ..., x_{n,j}, cut k = floor(beta * n) values from each end
and average the n - 2k that remain (0 <= beta < 1/2, so n - 2k >= 1). Flower counts the
cut the same way (``int(proportiontocut * n)`` per side, scipy's ``trim_mean``). Unweighted
(as in Flower). With f <= k outliers each coordinate stays within the range of the honest
values; beta * n < 1 cuts nothing and is the plain unweighted mean.
"""

from __future__ import annotations

import math

import torch


def trimmed_count(n: int, beta: float) -> int:
    """k = floor(beta * n): the values cut from each end of every coordinate."""
    return math.floor(beta * n)


def trimmed_mean(x: torch.Tensor, beta: float) -> torch.Tensor:
    """The coordinate-wise beta-trimmed mean of the rows of x (n clients x d coordinates)."""
    n = x.shape[0]
    if n == 0 or not 0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean: need n >= 1 and 0 <= beta < 0.5, got n={n}, beta={beta}")
    k = trimmed_count(n, beta)
    return x.sort(dim=0).values[k:n - k].mean(dim=0)
