"""The registry of federated algorithms: the one list of names that the run config's
validation, the ServerApp and the ClientApp read.

An algorithm is one module holding its client step, its server rule and its typed
hyperparameters (``fedsim.algorithms.base.Algorithm``); adding one is that module plus
one line below.
"""

from __future__ import annotations

from typing import Any

from fedsim.algorithms.base import Algorithm, ClientStep, Option, Upload
from fedsim.algorithms.ef_sign import EFSignSGD
from fedsim.algorithms.fedavg import FedAvg
from fedsim.algorithms.fedsgd import FedSGD
from fedsim.algorithms.llr_vote import LLRWeightedVote
from fedsim.algorithms.sign_fd import SignFederatedDefense
from fedsim.algorithms.sign_mv import SignMajorityVote

REGISTRY: dict[str, type[Algorithm[Any, Any]]] = {
    cls.name: cls
    for cls in (
        FedSGD,
        FedAvg,
        SignMajorityVote,
        LLRWeightedVote,
        EFSignSGD,
        SignFederatedDefense,
    )
}


def options() -> dict[str, Option]:
    """Every registered algorithm's run-config keys (key -> Option)."""
    out: dict[str, Option] = {}
    for cls in REGISTRY.values():
        for option in cls.all_options():
            known = out.setdefault(option.key, option)
            if known is not option:
                raise RuntimeError(f"run-config key {option.key!r} is declared by two algorithms; declare it once")
    return out


__all__ = ["REGISTRY", "Algorithm", "ClientStep", "EFSignSGD", "FedAvg", "FedSGD", "LLRWeightedVote", "Option", "SignFederatedDefense", "SignMajorityVote", "Upload", "options"]
