"""signSGD with majority vote (Bernstein et al. 2018/2019).

Client: s_m = sign(g_m) of one minibatch gradient, packed at 1 bit per coordinate; what
an exactly zero coordinate becomes is the ``zero-sign`` setting (fedsim.core.signs:
``plus`` sends +1, ``random`` a fair coin from the client's seeded stream, ``abstain``
sends 0 in a ternary code and the client does not vote there). Server: U = sign(sum_m
s_m) in {-1, 0, +1}^N (a tie is 0: no step) and x^{t+1} = x^t - delta * U on the
trainable parameters, delta being the run config's ``lr``. ``vote`` is the one step that
the LLR-weighted vote replaces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Message

from fedsim.algorithms.base import Algorithm, ClientStep, Option, Upload, descend
from fedsim.attacks import SIGN_ATTACKS
from fedsim.clients.tasks import flat_gradient
from fedsim.config import RunConfig
from fedsim.core.signs import ZERO_SIGNS, decode_ternary, encode_ternary, fill_zeros, pack_signs, packed_size, unpack_signs
from fedsim.core.votes import majority_vote
from fedsim.protocol import PACKED, SIGNS, BadReply, packed_signs, ternary_signs


@dataclass(frozen=True)
class SignStep:
    """delta: the server's step size (the run config's ``lr``); the ``zero-sign`` convention."""

    lr: float
    zero_sign: str


ZERO_SIGN = Option(
    "zero-sign", "plus", lambda v: v in ZERO_SIGNS, f"choose one of {list(ZERO_SIGNS)}",
    "what a sign vote's client sends for an exactly zero gradient coordinate",
)


class SignMajorityVote(Algorithm[SignStep]):
    """signSGD-MV: U = sign(sum_m s_m)."""

    name = "sign-mv"
    record = SIGNS
    options = (ZERO_SIGN,)
    attacks = SIGN_ATTACKS

    @classmethod
    def hyperparams(cls, cfg: RunConfig) -> SignStep:
        return SignStep(cfg.lr, str(cfg.option("zero-sign")))

    @classmethod
    def client_step(cls, hp: SignStep, step: ClientStep) -> Upload:
        vec, loss, _ = flat_gradient(step.model, step.data, step.batch_size, step.generator)
        vec = step.attack.gradient(vec)
        if hp.zero_sign == "abstain":
            arrays = encode_ternary(vec)
        else:
            arrays = {PACKED: pack_signs(fill_zeros(vec, hp.zero_sign, step.generator))}
        return Upload(step.attack.signs(arrays, vec.numel(), step.generator), loss)

    def parse(self, msg: Message) -> torch.Tensor:
        """The reply's signs as int8 {-1, +1}^N ({-1, 0, +1}^N under zero-sign "abstain")."""
        n = self.model.num_params
        if self.hp.zero_sign != "abstain":
            return unpack_signs(packed_signs(msg, packed_size(n)), n)
        try:
            return decode_ternary(ternary_signs(msg, n), n)
        except ValueError as err:
            raise BadReply(f"ternary signs: {err}") from None

    def vote(self, client_ids: list[int], signs: torch.Tensor) -> torch.Tensor:
        """The aggregated sign U from the clients' signs [M, N]."""
        return majority_vote(signs)

    def server_rule(self, server_round: int, current: ArrayRecord, replies: list) -> ArrayRecord:
        signs = torch.stack([r.payload for r in replies])
        u = self.vote([r.metrics.partition_id for r in replies], signs)  # partition ids: stable across runs, unlike node ids
        return descend(current, self.model.param_keys, u, self.hp.lr)
