"""What FedSGD and FedAvg share: the run's aggregator (``fedsim.aggregators``) over one float
vector per client, and its run-config keys.

FedSGD aggregates the clients' gradients (x^{t+1} = x^t - eta * agg(g_1..g_n)), FedAvg their
models (x^{t+1} = agg(x_1..x_n); every rule is translation-equivariant, so this is
x^t + agg of the updates x_k - x^t). ``mean`` (the default) keeps both exactly as they were.
The conditions on n (Krum and Multi-Krum n > 2f + 2, Bulyan n >= 4f + 3) are checked twice:
before a run against the clients sampled per round (``config_problem``, a one-line
ConfigError), and in every round against the valid replies (``replies_problem``: the
strategy keeps the global model and logs one WARNING line).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, TypeVar

import numpy as np
import torch

from fedsim.aggregators import AGGREGATORS, Aggregator, Settings
from fedsim.algorithms.base import Algorithm, Option
from fedsim.arrays import read_only_tensors
from fedsim.attacks import alie_arrays
from fedsim.config import RunConfig
from fedsim.core.aggregate import weighted_mean
from fedsim.protocol import Reply

AGGREGATOR = Option(
    "aggregator", "mean", lambda v: v in AGGREGATORS, f"choose one of {list(AGGREGATORS)}",
    "how FedSGD and FedAvg combine the clients' vectors (fedsim.aggregators)",
)
TRIM_FRACTION = Option(
    "trim-fraction", 0.1, lambda v: math.isfinite(v) and 0 <= v < 0.5, "must be a number in [0, 0.5)",
    "beta of aggregator='trimmed-mean': floor(beta * n) values cut from each end of every coordinate",
)
BYZANTINE_F = Option(
    "byzantine-f", 1, lambda v: v >= 0, "must be an integer >= 0",
    "f: the attackers Krum, Multi-Krum and Bulyan assume",
)
KRUM_M = Option(
    "krum-m", 0, lambda v: v >= 0, "must be an integer >= 0 (0: n - f of each round's n valid replies)",
    "m of aggregator='multi-krum': the lowest-scored clients averaged",
)
OPTIONS = (AGGREGATOR, TRIM_FRACTION, BYZANTINE_F, KRUM_M)


@dataclass(frozen=True)
class Aggregation:
    """The step size and the aggregator with its settings (``trim-fraction``, ``byzantine-f``, ``krum-m``)."""

    lr: float
    aggregator: str
    trim_fraction: float
    byzantine_f: int
    krum_m: int

    @property
    def rule(self) -> Aggregator:
        return AGGREGATORS[self.aggregator]

    @property
    def settings(self) -> Settings:
        return Settings(self.trim_fraction, self.byzantine_f, self.krum_m)


HA = TypeVar("HA", bound=Aggregation)


Arrays = dict[str, np.ndarray]  # the payload of both: named real-valued arrays (gradients, a state_dict)


class Aggregating(Algorithm[HA, Arrays]):
    """An algorithm whose server rule aggregates one float vector per client with ``aggregator``."""

    options: ClassVar[tuple[Option, ...]] = OPTIONS

    def lie(self, honest: list[Reply[Arrays]], z: float) -> Arrays:
        """ALIE: mu - z sigma of the honest payloads (FedSGD's gradients, FedAvg's models:
        x + mu - z sigma of their updates x_k - x), per coordinate; integer entries rounded
        (fedsim.attacks)."""
        return alie_arrays([r.payload for r in honest], z)

    def aggregate(self, x: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
        """agg(x) of the rows of x (n clients x d), on the algorithm's device, in x's dtype."""
        return self.hp.rule.apply(x.to(self.device), weights, self.hp.settings)

    def aggregate_arrays(self, payloads: Sequence[Arrays], keys: Sequence[str], weights: Sequence[float]) -> list[torch.Tensor]:
        """agg over the clients of each entry ``keys[j]`` (flattened), in float64 on the
        algorithm's device. The mean streams every client's entry into one float64
        accumulator (sum_i (n_i / m) x_i in client order, no n x d copy: a round's cost is
        one pass over the replies); a coordinate-wise rule sees each entry's n x d_j
        float64 matrix, a whole-vector rule (Krum, Bulyan) the n x d matrix of all entries."""
        rule = self.hp.rule
        if rule.streams:
            return [weighted_mean([t.reshape(-1).to(self.device) for t in read_only_tensors([p[k] for p in payloads])], weights, torch.float64)
                    for k in keys]
        stacked = [torch.from_numpy(np.stack([p[k].astype(np.float64).reshape(-1) for p in payloads])) for k in keys]
        if rule.coordinate_wise:
            return [self.aggregate(x, weights) for x in stacked]
        return list(self.aggregate(torch.cat(stacked, dim=1), weights).split([x.shape[1] for x in stacked]))

    def describe(self) -> str:
        rule = self.hp.rule
        if rule.name == "mean":
            return ""
        keys = self._read()
        weights = "weighted by num-examples" if rule.weighted else "unweighted"
        return f"aggregator {rule.name} ({keys + ', ' if keys else ''}{weights}; needs {rule.condition or 'n >= 1'})"

    def _read(self) -> str:
        """The settings its rule reads, as ``key=value, ...``."""
        return ", ".join(f"{k}={getattr(self.hp, k.replace('-', '_'))}" for k in self.hp.rule.reads)

    def replies_problem(self, n: int) -> str | None:
        need = self.hp.rule.min_clients(self.hp.settings)
        if n >= need:
            return None
        return f"aggregator={self.hp.aggregator!r} with {self._read()} needs {self.hp.rule.condition} (n >= {need}) and has n = {n}"

    @classmethod
    def config_warning(cls, cfg: RunConfig, attackers: int) -> str | None:
        hp = cls.hyperparams(cfg)
        if "byzantine-f" not in hp.rule.reads or attackers <= hp.byzantine_f:
            return None
        return (f"{attackers} attackers but aggregator={hp.aggregator!r} assumes at most byzantine-f={hp.byzantine_f}: "
                f"its robustness guarantee does not hold for this run (raise byzantine-f to {attackers} if the rule's "
                f"condition allows it; a stress test beyond f may mean it)")

    @classmethod
    def config_problem(cls, cfg: RunConfig) -> str | None:
        hp = cls.hyperparams(cfg)
        n, need = cfg.clients_per_round, hp.rule.min_clients(hp.settings)
        if n >= need:
            return None
        sampled = f"only {n} clients are sampled per round (num-nodes={cfg.num_nodes}, fraction-train={cfg.fraction_train})"
        if hp.aggregator == "multi-krum" and hp.krum_m > n:
            return f"krum-m={hp.krum_m}: aggregator='multi-krum' needs n >= krum-m, but {sampled}; use krum-m <= {n} (0: n - f)"
        fits = [f for f in range(hp.byzantine_f) if hp.rule.min_clients(replace(hp.settings, byzantine_f=f)) <= n]
        fix = f"lower byzantine-f to {fits[-1]}" if fits else "choose another aggregator"
        return (f"byzantine-f={hp.byzantine_f}: aggregator={hp.aggregator!r} needs {hp.rule.condition} (n >= {need}), "
                f"but {sampled}; sample at least {need} clients per round or {fix}")
