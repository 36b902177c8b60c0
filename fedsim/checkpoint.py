"""Checkpoints: what a run needs to continue after it was killed, bit for bit.

``checkpoint.pt`` in the run's folder holds the last evaluated round, the run config,
the global model and the server's state, namespaced: ``strategy`` (node-sampling RNG,
what clients reported, identity bindings) and ``algorithm`` (e.g. the LLR vote's
agreement counts). Checkpoints written before the two were namespaced (one flat
``strategy`` dict) are read too. Clients' random streams derive from seed, partition and
round, so a resumed run continues bit for bit; the one exception is EF-signSGD, whose
clients keep a residual in their node state, which no checkpoint holds (its residuals
restart at zero). It is written atomically after every evaluated round (``eval-every``)
and deleted when the run finishes. A checkpoint is untrusted input, checked as strictly as
a client's reply: a damaged one (unreadable, missing or mistyped entries; arrays whose
names, shapes or dtypes differ from the model's, never cast; arrays holding NaN or
infinities) is moved aside as ``checkpoint.pt.damaged`` and the run starts from round 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log

from fedsim.config import RunConfig, same_experiment
from fedsim.core.aggregate import non_finite_keys
from fedsim.run_folder import CHECKPOINT, RunFolder, set_aside

__all__ = ["CHECKPOINT", "Checkpoint", "load_checkpoint", "restore_strategy", "save_checkpoint"]


@dataclass(frozen=True)
class Checkpoint:
    """The state after ``round`` rounds; ``strategy`` is ``{"strategy": ..., "algorithm": ...}``
    (what ``FedsimStrategy.state_dict`` returns)."""

    round: int
    arrays: ArrayRecord
    strategy: dict[str, Any]
    seconds: float


def save_checkpoint(
    folder: Path, server_round: int, cfg: RunConfig, arrays: ArrayRecord, strategy_state: dict[str, Any], seconds: float
) -> None:
    """Write ``folder/checkpoint.pt`` (via a temporary file and a rename: never half-written);
    ``strategy_state`` is ``FedsimStrategy.state_dict()``."""
    run = RunFolder(folder)
    state = {
        "round": server_round,
        "config": cfg.to_mapping(),
        "arrays": arrays.to_torch_state_dict(),
        "strategy": strategy_state["strategy"],
        "algorithm": strategy_state["algorithm"],
        "seconds": seconds,
    }
    torch.save(state, run.checkpoint_tmp)
    os.replace(run.checkpoint_tmp, run.checkpoint)


def load_checkpoint(folder: Path, cfg: RunConfig, expected: ArrayRecord | None = None) -> Checkpoint | None:
    """The checkpoint in ``folder`` if there is one for this experiment, else None. A
    checkpoint of another experiment is ignored, with a warning; a damaged one (unreadable,
    missing or mistyped entries, arrays unlike ``expected``'s names, shapes and dtypes or
    not finite, a folder of that name) is set aside as ``checkpoint.pt.damaged``, with a
    warning."""
    path = RunFolder(folder).checkpoint
    if not os.path.lexists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        problem = _problem(state, expected)
    except Exception as err:
        problem = f"unreadable ({type(err).__name__}: {err})"
    if problem is not None:
        _discard(path, problem)
        return None
    if not same_experiment(state["config"], cfg):
        log(WARNING, "fedsim: %s belongs to another run config; starting from round 0", path)
        return None
    try:
        return Checkpoint(int(state["round"]), ArrayRecord(state["arrays"]), _server_state(state), float(state["seconds"]))
    except Exception as err:
        _discard(path, f"its arrays cannot be read ({type(err).__name__}: {err})")
        return None


# The strategy's own keys in checkpoints written before the namespacing (the rest of that
# flat dict was the algorithm's state).
LEGACY_STRATEGY_KEYS = ("rng", "reported_batch_sizes", "reported_devices", "num_examples", "node_partitions")


def _server_state(state: dict[str, Any]) -> dict[str, Any]:
    """``{"strategy": ..., "algorithm": ...}`` of a checkpoint; a checkpoint written before
    the two were namespaced holds both in one flat ``strategy`` dict."""
    if "algorithm" in state:
        return {"strategy": state["strategy"], "algorithm": state["algorithm"]}
    flat = state["strategy"]
    return {
        "strategy": {k: v for k, v in flat.items() if k in LEGACY_STRATEGY_KEYS},
        "algorithm": {k: v for k, v in flat.items() if k not in LEGACY_STRATEGY_KEYS},
    }


def restore_strategy(strategy: Any, checkpoint: Checkpoint, folder: Path) -> bool:
    """Load ``checkpoint``'s strategy state into ``strategy``. If that fails, put the
    strategy back as it was, set the checkpoint aside with a warning and return False."""
    fresh = strategy.state_dict()
    try:
        strategy.load_state_dict(checkpoint.strategy)
    except Exception as err:
        strategy.load_state_dict(fresh)
        _discard(RunFolder(folder).checkpoint, f"its strategy state does not fit ({type(err).__name__}: {err})")
        return False
    return True


def _problem(state: Any, expected: ArrayRecord | None) -> str | None:
    """What is wrong with a loaded checkpoint, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a checkpoint"
    kinds: dict[str, type | tuple[type, ...]] = {"round": int, "config": dict, "arrays": dict, "strategy": dict, "seconds": (int, float)}
    missing = sorted(set(kinds) - set(state))
    if missing:
        return f"missing {', '.join(missing)}"
    wrong = sorted(k for k, kind in kinds.items() if not isinstance(state[k], kind) or isinstance(state[k], bool))
    if wrong:
        return f"wrong type for {', '.join(wrong)}"
    if "algorithm" in state and not isinstance(state["algorithm"], dict):
        return "wrong type for algorithm"
    if state["round"] < 0 or not all(isinstance(v, torch.Tensor) for v in state["arrays"].values()):
        return "bad round or arrays"
    if expected is not None:
        mismatch = _arrays_mismatch(state["arrays"], expected.to_torch_state_dict())
        if mismatch is not None:
            return f"its arrays do not match the model ({mismatch})"
    bad = non_finite_keys(state["arrays"])
    if bad:
        return f"its arrays {bad} hold NaN or infinite values"
    return None


def _arrays_mismatch(have: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> str | None:
    """How a checkpoint's arrays differ from the model's state_dict, as a reply's would
    (fedsim.protocol.checked_arrays): the same keys, shapes and exactly the same dtypes
    (a float64 array for a float32 model is refused, never cast); None if they fit."""
    if set(have) != set(want):
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        return f"names: missing {missing}, unexpected {extra}"
    for key, ref in want.items():
        if tuple(have[key].shape) != tuple(ref.shape):
            return f"shapes: {key!r} is {tuple(have[key].shape)}, the model's is {tuple(ref.shape)}"
        if have[key].dtype != ref.dtype:
            return f"dtypes: {key!r} is {have[key].dtype}, the model's is {ref.dtype}; a checkpoint is not cast"
    return None


def _discard(path: Path, problem: str) -> None:
    try:
        aside = set_aside(path)
    except OSError as err:
        log(WARNING, "fedsim: damaged checkpoint %s: %s; cannot move it aside (%s); starting from round 0", path, problem, err)
        return
    log(WARNING, "fedsim: damaged checkpoint %s: %s; moved to %s, starting from round 0", path, problem, aside.name)
