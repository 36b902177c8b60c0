"""What an algorithm is in fedsim: its client step and its server rule, side by side.

An algorithm module defines one ``Algorithm`` subclass and is listed once in
``fedsim.algorithms.REGISTRY``. The ClientApp calls its ``client_step``; the generic
Flower strategy (``fedsim.strategies.FedsimStrategy``) samples clients, checks the
replies' bookkeeping and identity, and calls its ``parse`` (one untrusted reply -> a
checked payload of type ``P``) and ``server_rule`` (the checked payloads -> the next
global model). Its hyperparameters (type ``H``, a frozen dataclass named by ``params``)
are built from the run config: ``lr`` and one field per ``Option``; a subclass declares
only its own new options (``all_options`` collects them along the class hierarchy). A new
option also needs a line in pyproject.toml's ``[tool.flwr.app.config]``, because Flower
drops run-config keys that are not declared there (a test keeps the two equal).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from torch import nn

from fedsim.arrays import to_array_record, to_state
from fedsim.attacks import HONEST, Attack
from fedsim.clients.tasks import LocalData
from fedsim.config import Option, RunConfig
from fedsim.core.blocks import BlockMap, sequential_blocks
from fedsim.core.model_vector import flatten, unflatten_into
from fedsim.objective import CLASSIFICATION, Objective
from fedsim.protocol import ModelSpec, Reply

H = TypeVar("H")
P = TypeVar("P")

__all__ = ["Algorithm", "ClientStep", "Option", "Upload", "descend"]


@dataclass
class ClientStep:
    """What a client has for one train message."""

    model: nn.Module  # holds the global model's weights
    data: LocalData
    batch_size: int
    generator: torch.Generator  # this client's seeded stream for this round
    param_names: list[str]  # trainable parameters, in model.parameters() order
    state: RecordDict  # the node's own state: kept across its rounds (Flower's context.state)
    server_round: int
    attack: Attack = HONEST  # what this client does to its upload if it is an attacker (fedsim.attacks)
    objective: Objective = CLASSIFICATION  # the task's loss (fedsim.objective)


@dataclass
class Upload:
    """A client's reply payload: the arrays of the algorithm's record, and its train loss."""

    arrays: Mapping[str, np.ndarray]
    loss: float


def descend(current: ArrayRecord, keys: tuple[str, ...], direction: torch.Tensor, lr: float = 1.0) -> ArrayRecord:
    """x^{t+1} = x^t - lr * direction, x the trainable entries ``keys`` flattened in order
    (fedsim.core.model_vector); the other entries of the state are kept."""
    state = to_state(current)
    x = flatten(state, keys)
    unflatten_into(state, keys, x - lr * direction.to(x.device, x.dtype))
    return to_array_record({k: v.numpy() for k, v in state.items()})


class Algorithm(ABC, Generic[H, P]):
    """One federated algorithm. ``hp`` are its typed hyperparameters, ``model`` what the
    server knows of the model, ``device`` where server-side state and math live,
    ``max_clients`` the most partitions (clients) whose state the server may keep,
    ``map_blocks`` how its server math runs blocks of coordinates (fedsim.core.blocks)."""

    name: ClassVar[str]  # the run config's ``strategy`` value
    record: ClassVar[str]  # the ArrayRecord its replies carry (fedsim.protocol)
    params: ClassVar[type]  # the hyperparameter dataclass H
    options: ClassVar[tuple[Option, ...]] = ()  # run-config keys this class adds to its parents'
    sends_buffers: ClassVar[bool] = True  # float buffers (BatchNorm statistics) travel beside the payload
    attacks: ClassVar[tuple[str, ...]] = ()  # the fedsim.attacks kinds its uploads can carry ("lie": via ``lie``)
    downlinks: ClassVar[tuple[str, ...]] = ("model",)  # the run config's downlink values it works with

    def __init__(
        self, hp: H, model: ModelSpec, device: torch.device | str = "cpu", max_clients: int | None = None,
        map_blocks: BlockMap = sequential_blocks,
    ) -> None:
        self.hp = hp
        self.model = model
        self.device = torch.device(device)
        self.max_clients = max_clients
        self.map_blocks = map_blocks

    # --- hyperparameters ---------------------------------------------------------------

    @classmethod
    def all_options(cls) -> tuple[Option, ...]:
        """Its run-config keys: its own ``options`` after those of the classes it extends."""
        out: list[Option] = []
        for klass in reversed(cls.__mro__):
            out += [o for o in vars(klass).get("options", ()) if o not in out]
        return tuple(out)

    @classmethod
    def hyperparams(cls, cfg: RunConfig) -> H:
        """``params`` built from the run config: ``lr`` and each option's value by its field."""
        values = {"lr": cfg.lr, **{o.field_name: cfg.option(o.key) for o in cls.all_options()}}
        return cls.params(**{f.name: values[f.name] for f in fields(cls.params)})

    @classmethod
    def config_problem(cls, cfg: RunConfig) -> str | None:
        """Why the run config cannot work for it beyond each key's own rule, in one line naming
        the key, value, condition and fix (None: it can); checked before a run."""
        return None

    @classmethod
    def config_warning(cls, cfg: RunConfig, attackers: int) -> str | None:
        """A setting that runs but voids what the algorithm promises, in one line (None:
        nothing to say); logged as a WARNING when the run starts. ``attackers``: how many
        the run has."""
        return None

    @classmethod
    def state_bytes_per_client(cls, cfg: RunConfig, num_params: int) -> int:
        """Bytes of server-side state per client it has heard from (0: none kept per client)."""
        return 0

    # --- client half ---------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def client_step(cls, hp: H, step: ClientStep) -> Upload:
        """What a client computes from the global model and uploads."""

    # --- server half ---------------------------------------------------------------------

    @abstractmethod
    def parse(self, msg: Message) -> P:
        """Decode and check the payload of one reply; raise BadReply if unusable."""

    def replies_problem(self, n: int) -> str | None:
        """Why n valid replies are too few for ``server_rule`` (None: enough); the strategy
        then keeps the global model."""
        return None

    @abstractmethod
    def server_rule(self, server_round: int, current: ArrayRecord, replies: list[Reply[P]]) -> ArrayRecord:
        """The new global model from the current one and this round's checked replies
        (sorted by partition id)."""

    @abstractmethod
    def sample_upload(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Arrays an honest client could send in its record for this model (random
        values): what tests build valid replies from."""

    def lie(self, honest: list[Reply[P]], z: float) -> P:
        """The payload ALIE's colluding attackers send this round, from the round's honest
        replies (fedsim.attacks: mu - z sigma of their payloads); the strategy puts it in
        the attackers' replies when the run's ``attack`` is "lie". Only an algorithm that
        lists "lie" in ``attacks`` has one."""
        raise NotImplementedError(f"{self.name} has no lie attack")

    def state_dict(self) -> dict[str, Any]:
        """Server-side state a checkpoint must keep (lists, dicts, numbers, tensors)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict``'s result."""

    def report(self) -> dict[str, Any]:
        """What summary.json records of the server-side state at the end of a run."""
        return {}

    def describe(self) -> str:
        """One log line of settings beyond the common ones."""
        return ""


def random_floats(spec: Mapping[str, tuple[tuple[int, ...], np.dtype]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Standard-normal arrays of the spec's shapes; integer entries get small integers."""
    out = {}
    for key, (shape, dtype) in spec.items():
        if np.issubdtype(dtype, np.floating):
            out[key] = rng.standard_normal(shape).astype(dtype)
        else:
            out[key] = rng.integers(0, 50, size=shape).astype(dtype)
    return out

