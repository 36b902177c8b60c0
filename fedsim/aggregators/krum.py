"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017; Flower's ``aggregate_krum``).

With f assumed attackers among n clients, client i's score is
s_i = sum_{j in N_i} ||x_i - x_j||^2, N_i its k = n - f - 2 nearest other clients (squared
L2 distance). Krum returns the x_i of the lowest score; Multi-Krum the mean of the m
lowest-scored, weighted by their ``num-examples`` as Flower's (the paper's mean is
unweighted). Both need n > 2f + 2 (so k >= f + 1), and Multi-Krum m <= n. ``krum_scores``
clamps k to 1..n-1 as Flower does (``max(1, n - f - 2)``); only Bulyan's later selections,
on fewer vectors, reach that bound. Exactly equal scores (with k = 1 two mutually nearest
clients always tie) are ordered by the vectors' values (lexicographically, then by weight),
so a rule depends on the set of clients, never on their order; Flower takes the first in
its list.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cmp_to_key

import torch

from fedsim.core.aggregate import weighted_mean


def min_clients(f: int) -> int:
    """The fewest clients Krum and Multi-Krum accept for f attackers: n > 2f + 2."""
    return 2 * f + 3


# values of pairwise differences per block (2 MB of float64): a block of n(n-1)/2 pairs x
# DISTANCE_CACHE / (n(n-1)/2) coordinates stays in cache, where an n x d difference per client
# streamed 2 GB through memory per round for 15 clients of a 582k-parameter CNN (5x slower)
DISTANCE_CACHE = 262_144


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """D_{ij} = ||x_i - x_j||^2 (n x n), each from the difference (no ||a||^2 + ||b||^2 - 2ab
    cancellation), summed over blocks of coordinates in order (``DISTANCE_CACHE``); each pair
    is computed once, so D is exactly symmetric, with a zero diagonal."""
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    width = max(16, DISTANCE_CACHE // max(1, len(i)))
    upper = torch.zeros(len(i), dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[1], width):
        block = x[:, start : start + width]
        diff = block[i] - block[j]
        upper += diff.mul_(diff).sum(dim=1)
    out = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    out[i, j] = upper
    out[j, i] = upper
    return out


def krum_scores(distances: torch.Tensor, f: int) -> torch.Tensor:
    """s_i = the sum of the k = clamp(n - f - 2, 1, n - 1) smallest D_{ij}, j != i."""
    n = distances.shape[0]
    k = min(max(1, n - f - 2), n - 1)
    others = distances + torch.diag(torch.full((n,), math.inf, dtype=distances.dtype, device=distances.device))
    return others.sort(dim=1).values[:, :k].sum(dim=1)


def ranking(scores: torch.Tensor, x: torch.Tensor, weights: Sequence[float] | None = None, rows: Sequence[int] | None = None) -> list[int]:
    """The positions of ``scores`` by score, lowest first; exact ties by the vectors' values
    (lexicographic: position p's vector is x[rows[p]], or x[p] without ``rows``), then by
    weight, then by position (vectors and weights both equal: interchangeable)."""
    s = scores.tolist()
    row = list(rows) if rows is not None else list(range(len(s)))

    def compare(i: int, j: int) -> int:
        if s[i] != s[j]:
            return -1 if s[i] < s[j] else 1
        a, b = x[row[i]], x[row[j]]
        differ = torch.nonzero(a != b)
        if differ.numel():
            c = int(differ[0, 0])
            return -1 if bool(a[c] < b[c]) else 1
        wi, wj = (weights[i], weights[j]) if weights is not None else (0.0, 0.0)
        return -1 if (wi, i) < (wj, j) else 1

    return sorted(range(len(s)), key=cmp_to_key(compare))


def _check(n: int, f: int) -> None:
    if f < 0 or n < min_clients(f):
        raise ValueError(f"krum: need n > 2f + 2 clients, got n={n}, f={f}")


def krum(x: torch.Tensor, f: int) -> torch.Tensor:
    """The row x_i of the lowest Krum score (x: n clients x d coordinates)."""
    _check(x.shape[0], f)
    return x[ranking(krum_scores(squared_distances(x), f), x)[0]].clone()


def multi_krum(x: torch.Tensor, weights: Sequence[float], f: int, m: int) -> torch.Tensor:
    """sum_{i in S} (n_i / m_S) x_i over S, the m rows of lowest Krum score, m_S = sum_{i in S}
    n_i; accumulated in client order."""
    n = x.shape[0]
    _check(n, f)
    if not 1 <= m <= n:
        raise ValueError(f"multi_krum: need 1 <= m <= n, got m={m}, n={n}")
    chosen = sorted(ranking(krum_scores(squared_distances(x), f), x, weights)[:m])
    return weighted_mean([x[i] for i in chosen], [weights[i] for i in chosen])
