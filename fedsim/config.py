"""The run config: Flower's flat key/value run config, parsed and coerced (a leaf module).

The keys and defaults live in pyproject.toml's ``[tool.flwr.app.config]``; README.md
documents each. ``RunConfig`` holds the common keys as fields and the algorithms' own
keys (``llr-*``, ``local-epochs``, ...) as ``options``; which option keys exist is not known
here: ``RunConfig.from_mapping(values, options=...)`` is given them by its caller
(``fedsim.validation.load_config`` passes the algorithm registry's). Checks that need a
registry (strategy, dataset and model names, attacks) or the data are made above this
module, by ``fedsim.validation`` and ``fedsim.plan``.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedsim.errors import ConfigError

MAX_SEED = 2**32 - 1  # flwr-datasets/datasets shuffles take 32-bit seeds
# The largest batch size a train reply may report (fedsim.protocol checks replies against
# it): no minibatch has more rows than an int32 index can count. batch-size and every
# batch-sizes entry are capped here, so that a config cannot make every reply invalid.
MAX_BATCH_SIZE = 2**31 - 1
# Keys that say where results and reports go, not what the experiment is: two runs that
# differ only in these are the same experiment (config_differences ignores them).
OUTPUT_KEYS = ("results-dir", "tensorboard", "mlflow", "callbacks")
# What a key meant in runs made before it existed, where that is not its default today: a
# stored config.json without the key compares as this value (zero-sign: every sign vote sent
# a zero coordinate as +1 until the key came, and "plus" was its default until issue #25).
FORMER_DEFAULTS: dict[str, Any] = {"zero-sign": "plus"}
DOWNLINKS = ("model", "signs")  # what train messages carry: the model, or a sign vote's votes (fedsim.algorithms.downlink)

__all__ = [
    "MAX_BATCH_SIZE", "MAX_SEED", "OUTPUT_KEYS", "ConfigError", "Option", "RunConfig", "config_differences", "parse_override",
    "read_experiment", "read_toml", "same_experiment",
]


@dataclass(frozen=True)
class Option:
    """A run-config key an algorithm reads: its default (which fixes its type), the rule a
    value must meet (``valid``; ``rule`` says it in words for the error message) and the
    hyperparameter field it fills (``field``; default: the key in snake case)."""

    key: str
    default: bool | int | float | str
    valid: Callable[[Any], bool]
    rule: str
    help: str = ""
    field: str = ""

    @property
    def field_name(self) -> str:
        return self.field or self.key.replace("-", "_")


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
    batch_size: int = 10
    batch_sizes: str = ""
    batch_mode: int = 0
    lr: float = 0.1
    eval_every: int = 1
    num_nodes: int = 10
    node_wait: float = 60.0
    stop_at_accuracy: float = 0.0
    min_replies: int = 1
    round_timeout: float = 3600.0
    max_bad_rounds: int = 20
    node_partitions: str = ""
    downlink: str = "model"
    device: str = "auto"
    attackers: int = 0
    attacker_ids: str = ""
    attack: str = "sign-flip"
    attack_scale: float = 10.0
    attack_noise: float = 1.0
    attack_prob: float = 0.5
    image_column: str = "image"
    label_column: str = "label"
    normalize: str = "auto"
    loss: str = ""
    metrics: str = ""
    eval_fraction: float = 0.0
    local_test_fraction: float = 0.2
    num_classes: int = 0
    input_shape: str = ""
    server_test: str = ""
    results_dir: str = ""
    tensorboard: str = ""
    mlflow: str = ""
    callbacks: str = ""
    # every declared option's value, sorted by key: (key, value) pairs
    options: tuple[tuple[str, Any], ...] = ()
    # the declared options (key -> Option): what the defaults and rules of ``options`` are
    declared: Mapping[str, Option] = field(default_factory=dict, compare=False, hash=False, repr=False)
    # the option keys the run's strategy reads (None: all); the others are not part of its experiment
    used: frozenset[str] | None = field(default=None, compare=False, hash=False, repr=False)

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], options: Mapping[str, Option] | None = None, used: frozenset[str] | None = None
    ) -> RunConfig:
        """Build from a Flower run config (kebab-case keys), with ``options`` the keys the
        algorithms declare (key -> Option) and ``used`` those the run's strategy reads; an
        unknown key, a value of the wrong type or out of range is a ConfigError naming it."""
        declared = dict(options or {})
        known = _common_keys()
        unknown = sorted(set(values) - set(known) - set(declared))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {unknown}; valid keys: {sorted([*known, *declared])} (see README.md)"
            )
        kwargs = {known[k]: _coerce(k, v, type(getattr(_DEFAULT, known[k]))) for k, v in values.items() if k in known}
        chosen = {k: _coerce(k, values[k], type(o.default)) if k in values else o.default for k, o in declared.items()}
        cfg = cls(**kwargs, options=tuple(sorted(chosen.items())), declared=declared, used=used)
        cfg.check_values()
        return cfg

    def option(self, key: str) -> Any:
        """The value of an algorithm's own key (its default where not set)."""
        for k, v in self.options:
            if k == key:
                return v
        raise KeyError(f"{key!r} is not an option of a registered algorithm")

    def to_mapping(self) -> dict[str, Any]:
        """Back to Flower's kebab-case run config (every key, the algorithms' included)."""
        common = {key: getattr(self, name) for key, name in _common_keys().items()}
        return {**common, **dict(self.options)}

    def defaults(self) -> dict[str, Any]:
        """The run config of every key at its default (the options this config declares)."""
        return RunConfig.from_mapping({}, self.declared).to_mapping()

    def check_values(self) -> None:
        """Raise ConfigError naming the first value out of its range (checks that need no
        registry and no data)."""
        for ok, message in self._checks():
            if not ok:
                raise ConfigError(message)

    @property
    def clients_per_round(self) -> int:
        """max(1, round(C * K)): the clients sampled per round of num-nodes K (the strategy's rule)."""
        return max(1, round(self.fraction_train * self.num_nodes)) if math.isfinite(self.fraction_train) else 1

    def _checks(self) -> list[tuple[bool, str]]:
        per_round = self.clients_per_round
        bound = node_partitions_problem(self.node_partitions, self.num_nodes)
        named = attacker_ids_problem(self.attacker_ids, self.num_nodes, self.attackers)
        return [
            (0 <= self.seed <= MAX_SEED, f"seed={self.seed}: must be an integer in 0..{MAX_SEED}"),
            (self.num_nodes >= 1, f"num-nodes={self.num_nodes}: must be >= 1"),
            (_finite(self.node_wait) and self.node_wait >= 0, f"node-wait={self.node_wait}: must be a finite number of seconds >= 0"),
            (self.num_server_rounds >= 1, f"num-server-rounds={self.num_server_rounds}: must be >= 1"),
            (0.0 < self.fraction_train <= 1.0, f"fraction-train={self.fraction_train}: must be in (0, 1]"),
            (self.batch_size >= 0, f"batch-size={self.batch_size}: must be >= 0 (0 = the whole local set)"),
            (self.batch_size <= MAX_BATCH_SIZE, batch_size_cap_message(f"batch-size={self.batch_size}")),
            (self.batch_mode in (0, 1, 2, 3, 4), f"batch-mode={self.batch_mode}: must be 0 (off) or 1-4"),
            (self.batch_mode < 2 or self.num_nodes >= 2, f"batch-mode={self.batch_mode} mixes small and large batches: it needs num-nodes >= 2, got {self.num_nodes}"),
            (_finite(self.lr) and self.lr > 0, f"lr={self.lr}: must be a finite number > 0"),
            (self.eval_every >= 1, f"eval-every={self.eval_every}: must be >= 1"),
            (0.0 <= self.stop_at_accuracy <= 1.0, f"stop-at-accuracy={self.stop_at_accuracy}: must be in [0, 1] (0 = off)"),
            (self.min_replies >= 1, f"min-replies={self.min_replies}: must be >= 1"),
            (self.min_replies <= per_round, f"min-replies={self.min_replies}: only {per_round} clients are sampled per round "
             f"(num-nodes={self.num_nodes}, fraction-train={self.fraction_train}); use min-replies <= {per_round}"),
            (_finite(self.round_timeout) and self.round_timeout > 0, f"round-timeout={self.round_timeout}: must be a finite number of seconds > 0"),
            (self.max_bad_rounds >= 1, f"max-bad-rounds={self.max_bad_rounds}: must be an integer >= 1 (consecutive rounds the model may stay unchanged before the run stops)"),
            (not (self.batch_sizes and self.batch_mode), "set batch-sizes or batch-mode, not both"),
            (self.downlink in DOWNLINKS, f"downlink={self.downlink!r}: choose 'model' (the server sends the global model) or 'signs' (a sign vote's server sends its votes)"),
            (bound is None, str(bound)),
            (0 <= self.attackers <= self.num_nodes, f"attackers={self.attackers}: must be in 0..num-nodes ({self.num_nodes})"),
            (named is None, str(named)),
            (_finite(self.attack_scale) and self.attack_scale > 0, f"attack-scale={self.attack_scale}: must be a finite number > 0"),
            (_finite(self.attack_noise) and self.attack_noise >= 0, f"attack-noise={self.attack_noise}: must be a finite number >= 0"),
            (0.0 < self.attack_prob <= 1.0, f"attack-prob={self.attack_prob}: must be in (0, 1] (the probability that stochastic flips a coordinate)"),
            (_normalization_ok(self.normalize),
             f"normalize={self.normalize!r}: choose 'auto' (the training set's mean and std), 'none', or 'MEAN/STD' per channel or feature, e.g. '0.2860/0.3530'"),
            (self.num_classes >= 0, f"num-classes={self.num_classes}: must be >= 0 (0 = from the data)"),
            (_shape_ok(self.input_shape), f"input-shape={self.input_shape!r}: expected positive integers separated by commas, e.g. '1,28,28' or '30' ('' = from the data)"),
            (0.0 <= self.eval_fraction <= 1.0, f"eval-fraction={self.eval_fraction}: must be in [0, 1] (0 = no federated evaluation)"),
            (0.0 < self.local_test_fraction < 1.0, f"local-test-fraction={self.local_test_fraction}: must be in (0, 1)"),
            *((o.valid(self.option(k)), f"{k}={self.option(k)!r}: {o.rule}") for k, o in self.declared.items()),
        ]


def _natural(text: str) -> bool:
    """``text`` is a non-negative integer in ASCII digits (what ``int`` reads as written)."""
    return text.isascii() and text.isdigit()


def node_partition_map(text: str) -> dict[int, int]:
    """``node-partitions``: ``"NODE:PARTITION,NODE:PARTITION,..."`` -> {node id: partition id}
    ("" -> {}); ValueError for text that is not such pairs (``node_partitions_problem`` says why)."""
    pairs = [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]
    out: dict[int, int] = {}
    for pair in pairs:
        node, sep, pid = pair.partition(":")
        if not sep or not _natural(node.strip()) or not _natural(pid.strip()):
            raise ValueError(f"{pair!r} is not NODE:PARTITION (two non-negative integers)")
        out[int(node)] = int(pid)
    if len(out) != len(pairs):
        raise ValueError("a node id is given twice")
    return out


def node_partitions_problem(text: str, num_nodes: int) -> str | None:
    """Why ``node-partitions`` is unusable (None: it is fine): pairs, each partition once, in 0..num-nodes-1."""
    how = ("give 'NODE:PARTITION,...' with each node id (as `flwr supernode register` printed it) and each partition "
           f"id in 0..{num_nodes - 1} at most once, e.g. '11021394607732558363:0,7225216816040098346:1'")
    try:
        mapping = node_partition_map(text)
    except ValueError as err:
        return f"node-partitions={text!r}: {err}; {how}"
    pids = list(mapping.values())
    if len(set(pids)) != len(pids):
        return f"node-partitions={text!r}: a partition id is given to two nodes; {how}"
    if any(p >= num_nodes for p in pids):
        return f"node-partitions={text!r}: partition id {max(pids)} is not below num-nodes={num_nodes}; {how}"
    return None


def parse_attacker_ids(text: str) -> tuple[int, ...]:
    """``attacker-ids``: ``"0,3,7"`` -> (0, 3, 7), sorted ("" -> ()); ValueError for an entry
    that is not a non-negative integer or an id given twice."""
    entries = [p.strip() for p in text.split(",") if p.strip()]
    bad = [e for e in entries if not _natural(e)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a partition id (a non-negative integer)")
    ids = [int(e) for e in entries]
    if len(set(ids)) != len(ids):
        raise ValueError(f"partition id {next(i for i in ids if ids.count(i) > 1)} is given twice")
    return tuple(sorted(ids))


def attacker_ids_problem(text: str, num_nodes: int, attackers: int) -> str | None:
    """Why ``attacker-ids`` is unusable with ``num-nodes`` and ``attackers`` (None: fine):
    distinct ids in 0..num-nodes-1, and ``attackers`` either 0 or their number."""
    how = f"give distinct partition ids in 0..{num_nodes - 1}, comma-separated, e.g. '0,3,7' ('' = the seeded draw of attackers)"
    try:
        ids = parse_attacker_ids(text)
    except ValueError as err:
        return f"attacker-ids={text!r}: {err}; {how}"
    if ids and ids[-1] >= num_nodes:
        return f"attacker-ids={text!r}: partition id {ids[-1]} is not below num-nodes={num_nodes}; {how}"
    if ids and attackers not in (0, len(ids)):
        return (f"attacker-ids={text!r} names {len(ids)} attackers but attackers={attackers}: set attackers = 0 (or {len(ids)}), "
                "or attacker-ids = '' for a seeded draw of attackers")
    return None


def batch_size_cap_message(setting: str) -> str:
    """The error for a batch size above MAX_BATCH_SIZE; ``setting`` names the key and value."""
    return (
        f"{setting}: a batch size must be at most {MAX_BATCH_SIZE}, the largest batch size a client's reply may report "
        "(every reply of that client would be rejected); use a smaller batch size, or 0 for the whole local set"
    )


def _common_keys() -> dict[str, str]:
    """Run-config key -> RunConfig field name, for the common keys."""
    return _COMMON_KEYS


def same_experiment(stored: Mapping[str, Any], cfg: RunConfig) -> bool:
    """Whether a run config stored with a run (its ``config.json``) describes the same
    experiment as ``cfg`` (``config_differences`` is empty)."""
    return not config_differences(stored, cfg)


def config_differences(stored: Mapping[str, Any], cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (stored value, cfg's value)}`` where a stored run config (a ``config.json``)
    and ``cfg`` differ. A key added to fedsim after the run was made counts as what it meant
    then (``FORMER_DEFAULTS``, else its default); where the results and reports go
    (``OUTPUT_KEYS``) and the options of other algorithms than the run's strategy are not
    part of the experiment. A key only one side has shows ``None`` on the other."""
    defaults = {**cfg.defaults(), **FORMER_DEFAULTS}
    old = {**{k: v for k, v in defaults.items() if k not in stored}, **stored}
    new = json.loads(json.dumps(cfg.to_mapping()))
    unused = [k for k in cfg.declared if cfg.used is not None and k not in cfg.used]
    for key in (*OUTPUT_KEYS, *unused):
        old.pop(key, None)
        new.pop(key, None)
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k, ...) != new.get(k, ...)}


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict; ConfigError naming the file (and the line) when it is
    missing, not a file, unreadable or not valid TOML."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a file; give the path of a .toml file")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{what} {path} is not valid TOML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {path} cannot be read: {err}") from None


def read_experiment(path: str | Path) -> dict[str, Any]:
    """A run config as a flat dict (nested tables are flattened with dots, as Flower does):
    a run-config TOML, or a Flower app (its folder or its ``pyproject.toml``), whose
    ``[tool.flwr.app.config]`` is read."""
    path = Path(path)
    if path.is_dir():
        if not (path / "pyproject.toml").is_file():
            raise ConfigError(f"experiment file {path} is not a file but a folder without a pyproject.toml; give a run-config TOML or a Flower app's folder")
        path = path / "pyproject.toml"
    data = read_toml(path, "experiment file")
    if path.name == "pyproject.toml" or "tool" in data:
        app = data.get("tool", {}).get("flwr", {}).get("app", {})
        if not isinstance(app.get("config"), dict):
            raise ConfigError(f"{path} has no [tool.flwr.app.config] table; a Flower app keeps its run config there")
        return _flatten(app["config"])
    return _flatten(data)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value``: the value is read as a TOML value (``0.1``, ``true``, ``"x"``), else a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set lr=0.01")
    key, raw = (s.strip() for s in text.split("=", 1))
    if not key:
        raise ConfigError(f"--set {text!r}: the key is empty; expected key=value, e.g. --set lr=0.01")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


_DEFAULT = RunConfig()
_COMMON_KEYS = {f.name.replace("_", "-"): f.name for f in fields(RunConfig) if f.name not in ("options", "declared", "used")}


def _finite(x: float) -> bool:
    return math.isfinite(x)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` -> (1, 28, 28); "" -> ()."""
    return tuple(int(p) for p in text.replace(" ", "").split(",") if p)


def _shape_ok(text: str) -> bool:
    try:
        return all(d > 0 for d in parse_shape(text))
    except ValueError:
        return False


def parse_normalization(text: str) -> tuple[list[float], list[float]] | None:
    """``"MEAN/STD"`` (comma-separated lists of equal length, std > 0) -> (means, stds);
    None for "auto" and "none". ValueError for anything else."""
    if text in ("auto", "none"):
        return None
    mean, sep, std = text.partition("/")
    means, stds = [float(v) for v in mean.split(",")], [float(v) for v in std.split(",")]
    if not sep or len(means) != len(stds) or not all(math.isfinite(v) for v in means) or not all(math.isfinite(s) and s > 0 for s in stds):
        raise ValueError(text)
    return means, stds


def _normalization_ok(text: str) -> bool:
    try:
        parse_normalization(text)
    except ValueError:
        return False
    return True


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
