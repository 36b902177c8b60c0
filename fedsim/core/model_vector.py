"""The trainable parameters of a state_dict as one flat vector x in R^N, and back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def flatten(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    """x = concat(state[k].reshape(-1) for k in keys)."""
    return torch.cat([state[k].reshape(-1) for k in keys])


def unflatten_into(state: dict[str, torch.Tensor], keys: Sequence[str], vector: torch.Tensor) -> None:
    """Write ``vector`` back into ``state[k]`` for k in keys (inverse of flatten), in place."""
    offset = 0
    for k in keys:
        n = state[k].numel()
        state[k] = vector[offset : offset + n].reshape(state[k].shape).to(state[k].dtype)
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the keys hold {offset}")
