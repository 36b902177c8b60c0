"""What the sign votes share (signSGD-MV, the LLR vote, signSGD-FD): the client step, the
reply's code and the server step; each vote differs only in how it aggregates the signs.

Client: s_m = sign(g_m) of one minibatch gradient, packed at 1 bit per coordinate; what
an exactly zero coordinate becomes is the ``zero-sign`` setting (fedsim.core.signs:
``plus`` sends +1, ``random`` a fair coin from the client's seeded stream, ``abstain``
sends 0 in a ternary code and the client does not vote there). Server: U = vote(signs) in
{-1, 0, +1}^N and x^{t+1} = x^t - delta * U on the trainable parameters, delta being the
run config's ``lr``. A client is its partition id (stable across runs and resumes, unlike
node ids).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from fedsim.algorithms.base import Algorithm, ClientStep, Option, Upload, descend
from fedsim.attacks import SIGN_ATTACKS, alie_signs
from fedsim.clients.tasks import flat_gradient
from fedsim.core.signs import ZERO_SIGNS, decode_ternary, encode_ternary, fill_zeros, pack_signs, packed_size, unpack_signs
from fedsim.protocol import PACKED, SIGNS, BadReply, ModelSpec, Reply, packed_signs, ternary_signs


@dataclass(frozen=True)
class SignStep:
    """delta: the server's step size (the run config's ``lr``); the ``zero-sign`` convention."""

    lr: float
    zero_sign: str


HS = TypeVar("HS", bound=SignStep)

# "random" since issue #25 (the attack and batch-mode-3 results, docs/results/attacks_mnist.md);
# "plus" before: runs made with it pin it (experiments/*.toml), and fedsim.config.FORMER_DEFAULTS
# reads a stored config without the key as "plus".
ZERO_SIGN = Option(
    "zero-sign", "random", lambda v: v in ZERO_SIGNS, f"choose one of {list(ZERO_SIGNS)}",
    "what a sign vote's client sends for an exactly zero gradient coordinate",
)


class SignVote(Algorithm[HS, torch.Tensor]):
    """A sign vote: packed signs up, U = ``vote`` down, x -= delta * U."""

    record = SIGNS
    options: ClassVar[tuple[Option, ...]] = (ZERO_SIGN,)
    attacks = (*SIGN_ATTACKS, "lie")
    downlinks = ("model", "signs")  # x -= delta * U: a node holding x rebuilds the new x from U (fedsim.algorithms.downlink)

    @classmethod
    def client_step(cls, hp: HS, step: ClientStep) -> Upload:
        vec, loss, _ = flat_gradient(step.model, step.data, step.batch_size, step.generator, step.objective)
        vec = step.attack.gradient(vec)
        if hp.zero_sign == "abstain":
            arrays = encode_ternary(vec)
        else:
            arrays = {PACKED: pack_signs(fill_zeros(vec, hp.zero_sign, step.generator))}
        return Upload(step.attack.signs(arrays, vec.numel(), step.generator), loss)

    def lie(self, honest: list[Reply[torch.Tensor]], z: float) -> torch.Tensor:
        """ALIE on signs: sign(mu - z sigma) of the honest signs (what the server has of the
        honest clients), 0 sent as +1 unless zero-sign is "abstain" (fedsim.attacks)."""
        return alie_signs(torch.stack([r.payload for r in honest]), z, self.hp.zero_sign == "abstain")

    def parse(self, msg: Message) -> torch.Tensor:
        """The reply's signs as int8 {-1, +1}^N ({-1, 0, +1}^N under zero-sign "abstain")."""
        n = self.model.num_params
        if self.hp.zero_sign != "abstain":
            return unpack_signs(packed_signs(msg, packed_size(n)), n)
        try:
            return decode_ternary(ternary_signs(msg, n), n)
        except ValueError as err:
            raise BadReply(f"ternary signs: {err}") from None

    def sample_upload(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        signs = torch.from_numpy(rng.choice([-1.0, 1.0], size=self.model.num_params).astype(np.float32))
        return encode_ternary(signs) if self.hp.zero_sign == "abstain" else {PACKED: pack_signs(signs)}

    @abstractmethod
    def vote(self, client_ids: list[int], signs: torch.Tensor) -> torch.Tensor:
        """The aggregated sign U [N] from the clients' signs [M, N]."""

    def server_rule(self, server_round: int, current: ArrayRecord, replies: list[Reply[torch.Tensor]]) -> ArrayRecord:
        signs = torch.stack([r.payload for r in replies])
        u = self.vote([r.client for r in replies], signs)
        return descend(current, self.model.param_keys, u, self.hp.lr)


class Estimator(Protocol):
    """What a weighted vote keeps between rounds (fedsim.core.votes, fedsim.core.fd)."""

    def vote(self, client_ids: Sequence[Hashable], signs: torch.Tensor) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class WeightedSignVote(SignVote[HS]):
    """A sign vote whose weights an estimator learns online from past votes; its state is
    the estimator's, saved under ``state_key`` in checkpoints."""

    state_key: ClassVar[str]

    def __init__(self, hp: HS, model: ModelSpec, device: torch.device | str = "cpu", max_clients: int | None = None, **kw: Any) -> None:
        """``device``: where the M x N counts live and the vote runs (the training device);
        ``max_clients``: the most partitions that may hold counts."""
        super().__init__(hp, model, device, max_clients, **kw)
        self.estimator = self.build_estimator()

    @abstractmethod
    def build_estimator(self) -> Estimator:
        """The estimator for ``self.hp`` over the model's N coordinates."""

    def vote(self, client_ids: list[int], signs: torch.Tensor) -> torch.Tensor:
        return self.estimator.vote(client_ids, signs)

    def state_dict(self) -> dict[str, Any]:
        return {self.state_key: self.estimator.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.estimator.load_state_dict(state[self.state_key])
