"""What an algorithm is in fedsim: its client step and its server rule, side by side.

An algorithm module defines one ``Algorithm`` subclass and is listed once in
``fedsim.algorithms.REGISTRY``. The ClientApp calls its ``client_step``; the generic
Flower strategy (``fedsim.strategies.FedsimStrategy``) samples clients, checks the
replies' bookkeeping and identity, and calls its ``parse`` (one untrusted reply -> a
checked payload) and ``server_rule`` (the checked payloads -> the next global model).
Run-config keys of its own are ``options``: the config reads them from the registry (a
new key also needs a line in pyproject.toml's ``[tool.flwr.app.config]``, because Flower
drops run-config keys that are not declared there; a test keeps the two equal).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from torch import nn

from fedsim.attacks import HONEST, Attack
from fedsim.arrays import to_array_record, to_state
from fedsim.clients.tasks import LocalData
from fedsim.core.model_vector import flatten, unflatten_into
from fedsim.protocol import ModelSpec

if TYPE_CHECKING:
    from fedsim.config import RunConfig
    from fedsim.strategies.base import Reply

H = TypeVar("H")


@dataclass(frozen=True)
class Option:
    """A run-config key an algorithm reads: its default (which fixes its type) and the
    rule a value must meet (``valid``; ``rule`` says it in words for the error message)."""

    key: str
    default: bool | int | float | str
    valid: Callable[[Any], bool]
    rule: str
    help: str = ""


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


class Algorithm(ABC, Generic[H]):
    """One federated algorithm. ``hp`` are its typed hyperparameters, ``model`` what the
    server knows of the model, ``device`` where server-side state and math live,
    ``max_clients`` the most partitions (clients) whose state the server may keep."""

    name: ClassVar[str]  # the run config's ``strategy`` value
    record: ClassVar[str]  # the ArrayRecord its replies carry (fedsim.protocol)
    options: ClassVar[tuple[Option, ...]] = ()
    sends_buffers: ClassVar[bool] = True  # float buffers (BatchNorm statistics) travel beside the payload
    attacks: ClassVar[tuple[str, ...]] = ()  # the fedsim.attacks kinds its client step applies

    def __init__(self, hp: H, model: ModelSpec, device: torch.device | str = "cpu", max_clients: int | None = None) -> None:
        self.hp = hp
        self.model = model
        self.device = torch.device(device)
        self.max_clients = max_clients

    # --- hyperparameters ---------------------------------------------------------------

    @classmethod
    @abstractmethod
    def hyperparams(cls, cfg: RunConfig) -> H:
        """This algorithm's hyperparameters from the run config."""

    # --- client half ---------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def client_step(cls, hp: H, step: ClientStep) -> Upload:
        """What a client computes from the global model and uploads."""

    # --- server half ---------------------------------------------------------------------

    @abstractmethod
    def parse(self, msg: Message) -> Any:
        """Decode and check the payload of one reply; raise BadReply if unusable."""

    @abstractmethod
    def server_rule(self, server_round: int, current: ArrayRecord, replies: list[Reply]) -> ArrayRecord:
        """The new global model from the current one and this round's checked replies
        (sorted by partition id)."""

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
