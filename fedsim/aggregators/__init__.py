"""Aggregators: how FedSGD and FedAvg combine the round's n client vectors (gradients, or
models) into one, as pure functions over a stacked tensor x (n clients x d coordinates).

One module each: ``mean`` (the default: example-weighted), ``median`` and ``trimmed_mean``
(coordinate-wise, unweighted), ``krum`` (Krum, and Multi-Krum weighted by num-examples) and
``bulyan`` (unweighted). ``AGGREGATORS`` is the registry (the run config's ``aggregator``
values): each entry's function, the condition it puts on n given f assumed attackers, the
run-config keys it reads and whether num-examples weight it. Every rule is
translation-equivariant, agg(x_i + c) = agg(x_i) + c, so aggregating models x_k is the same
as aggregating updates x_k - x and adding x. Math only: no Flower, no run config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedsim.aggregators import bulyan, krum
from fedsim.aggregators.mean import mean
from fedsim.aggregators.median import median
from fedsim.aggregators.trimmed_mean import trimmed_mean


@dataclass(frozen=True)
class Settings:
    """What the rules read: beta (``trim-fraction``), f (``byzantine-f``) and m (``krum-m``;
    0: n - f of the round's n clients)."""

    trim_fraction: float = 0.1
    byzantine_f: int = 1
    krum_m: int = 0

    def multi_krum_m(self, n: int) -> int:
        """m for n clients: ``krum_m``, or n - f where it is 0."""
        return self.krum_m or n - self.byzantine_f


Rule = Callable[[torch.Tensor, Sequence[float], Settings], torch.Tensor]


@dataclass(frozen=True)
class Aggregator:
    """One registry entry: ``fn(x, weights, settings)``, the condition on n in words and as
    the fewest clients (``min_clients(settings)``), the keys it reads, whether it weights."""

    name: str
    fn: Rule
    condition: str  # on n, the replies used in a round ("": any n >= 1)
    min_clients: Callable[[Settings], int]
    reads: tuple[str, ...]  # run-config keys beyond ``aggregator``
    weighted: bool  # whether a client's num-examples weight it
    coordinate_wise: bool  # each coordinate from that coordinate's values alone (applicable key by key)
    streams: bool = False  # fn is the weighted mean: callers may stream the rows into it (Aggregating.aggregate_arrays), no n x d matrix

    def apply(self, x: torch.Tensor, weights: Sequence[float], settings: Settings) -> torch.Tensor:
        """The aggregate of the rows of x, computed in float64 on x's device, in x's dtype;
        ValueError if n is below ``min_clients``."""
        n = x.shape[0]
        if n < max(1, self.min_clients(settings)):
            raise ValueError(f"aggregator {self.name!r} needs {self.condition} (f={settings.byzantine_f}), got n={n}")
        return self.fn(x if self.streams else x.to(torch.float64), weights, settings).to(x.dtype)


def _multi_krum_min(s: Settings) -> int:
    return max(krum.min_clients(s.byzantine_f), s.krum_m)


AGGREGATORS: dict[str, Aggregator] = {a.name: a for a in (
    Aggregator("mean", lambda x, w, s: mean(x, w), "", lambda s: 1, (), True, True, streams=True),
    Aggregator("median", lambda x, w, s: median(x), "", lambda s: 1, (), False, True),
    Aggregator("trimmed-mean", lambda x, w, s: trimmed_mean(x, s.trim_fraction), "", lambda s: 1, ("trim-fraction",), False, True),
    Aggregator("krum", lambda x, w, s: krum.krum(x, s.byzantine_f), "n > 2f + 2", lambda s: krum.min_clients(s.byzantine_f),
               ("byzantine-f",), False, False),
    Aggregator("multi-krum", lambda x, w, s: krum.multi_krum(x, w, s.byzantine_f, s.multi_krum_m(x.shape[0])),
               "n > 2f + 2 and n >= krum-m", _multi_krum_min, ("byzantine-f", "krum-m"), True, False),
    Aggregator("bulyan", lambda x, w, s: bulyan.bulyan(x, s.byzantine_f), "n >= 4f + 3", lambda s: bulyan.min_clients(s.byzantine_f),
               ("byzantine-f",), False, False),
)}

__all__ = ["AGGREGATORS", "Aggregator", "Rule", "Settings"]
