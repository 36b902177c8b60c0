"""signSGD with majority vote (Bernstein et al. 2018/2019): U = sign(sum_m s_m) in
{-1, 0, +1}^N (a tie is 0: no step), x^{t+1} = x^t - delta * U. The client step and
the code of the signs are every sign vote's (fedsim.algorithms.sign_vote).
"""

from __future__ import annotations

import torch

from fedsim.algorithms.sign_vote import SignStep, SignVote
from fedsim.core.votes import majority_vote


class SignMajorityVote(SignVote[SignStep]):
    """signSGD-MV: U = sign(sum_m s_m)."""

    name = "sign-mv"
    params = SignStep

    def vote(self, client_ids: list[int], signs: torch.Tensor) -> torch.Tensor:
        return majority_vote(signs)
