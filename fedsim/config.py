"""The run config: Flower's flat key/value run config, parsed and validated once.

The keys and defaults live in pyproject.toml's ``[tool.flwr.app.config]``; README.md
documents each. Server and client both read the run config through ``RunConfig``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

STRATEGIES = ("fedsgd", "fedavg", "sign-mv", "llr-vote")
DEFAULT_MODELS = {
    "digits": "digits-mlp",
    "mnist": "mnist-cnn",
    "fashion-mnist": "mnist-cnn",
    "cifar10": "resnet20",
}


class ConfigError(ValueError):
    """A run-config value is missing or invalid; the message says which and what to do."""


@dataclass(frozen=True)
class RunConfig:
    """Typed view of the run config (field ``foo_bar`` is run-config key ``foo-bar``)."""

    strategy: str = "fedavg"
    num_server_rounds: int = 20
    seed: int = 0
    dataset: str = "digits"
    data_dir: str = ""
    partitioning: str = "iid"
    model: str = "auto"
    fraction_train: float = 1.0
    local_epochs: int = 1
    batch_size: int = 10
    batch_sizes: str = ""
    batch_mode: int = 0
    lr: float = 0.1
    eval_every: int = 1
    llr_eps: float = 1e-5
    llr_max: float = 10.0
    llr_warmup: int = 100
    llr_forgetting: float = 1.0
    num_nodes: int = 10
    node_wait: float = 60.0
    stop_at_accuracy: float = 0.0
    min_replies: int = 1
    round_timeout: float = 3600.0
    results_dir: str = ""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from a Flower run config (kebab-case keys); unknown keys are an error."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {unknown}; valid keys: {sorted(known)} (see README.md)"
            )
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            f = known[key]
            kwargs[f.name] = _coerce(key, value, type(getattr(cls(), f.name)))
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    @staticmethod
    def cached(values: Mapping[str, Any]) -> RunConfig:
        """from_mapping, memoised on the values (a client parses the same config per message)."""
        return _cached_config(tuple(sorted(values.items())))

    def to_mapping(self) -> dict[str, Any]:
        """Back to Flower's kebab-case run config."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @property
    def model_name(self) -> str:
        """The model to train: ``model``, or the dataset's default when it is "auto"."""
        return DEFAULT_MODELS.get(self.dataset, "") if self.model == "auto" else self.model

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid value."""
        checks = [
            (self.strategy in STRATEGIES, f"strategy={self.strategy!r}: choose one of {list(STRATEGIES)}"),
            (self.num_nodes >= 1, f"num-nodes={self.num_nodes}: must be >= 1"),
            (self.node_wait >= 0, f"node-wait={self.node_wait}: must be >= 0 seconds"),
            (self.num_server_rounds >= 1, f"num-server-rounds={self.num_server_rounds}: must be >= 1"),
            (0.0 < self.fraction_train <= 1.0, f"fraction-train={self.fraction_train}: must be in (0, 1]"),
            (self.local_epochs >= 1, f"local-epochs={self.local_epochs}: must be >= 1"),
            (self.batch_size >= 0, f"batch-size={self.batch_size}: must be >= 0 (0 = the whole local set)"),
            (self.batch_mode in (0, 1, 2, 3, 4), f"batch-mode={self.batch_mode}: must be 0 (off) or 1-4"),
            (self.lr > 0, f"lr={self.lr}: must be > 0"),
            (self.eval_every >= 1, f"eval-every={self.eval_every}: must be >= 1"),
            (0.0 <= self.stop_at_accuracy <= 1.0, f"stop-at-accuracy={self.stop_at_accuracy}: must be in [0, 1] (0 = off)"),
            (0.0 < self.llr_forgetting <= 1.0, f"llr-forgetting={self.llr_forgetting}: must be in (0, 1]"),
            (self.llr_warmup >= 0, f"llr-warmup={self.llr_warmup}: must be >= 0"),
            (self.llr_eps > 0 and self.llr_max > 0, "llr-eps and llr-max must be > 0"),
            (bool(self.model_name), f"model='auto' has no default for dataset={self.dataset!r}; set model"),
            (not (self.batch_sizes and self.batch_mode), "set batch-sizes or batch-mode, not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def same_experiment(stored: Mapping[str, Any], cfg: RunConfig) -> bool:
    """Whether a run config stored with a run (its ``config.json``) describes the same
    experiment as ``cfg``. A key added to fedsim after the run was made counts as its
    default; where the results live (``results-dir``) is not part of the experiment."""
    defaults = RunConfig().to_mapping()
    old = {**{k: v for k, v in defaults.items() if k not in stored}, **stored}
    new = json.loads(json.dumps(cfg.to_mapping()))
    old.pop("results-dir", None)
    new.pop("results-dir", None)
    return old == new


@functools.lru_cache(maxsize=64)
def _cached_config(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return RunConfig.from_mapping(dict(items))


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        return bool(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"run-config key {key!r}: expected {kind.__name__}, got {value!r}")
