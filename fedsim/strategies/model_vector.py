"""The trainable parameters of a state_dict as one flat vector x in R^N, and back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import warnings
import weakref

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedsim.arrays import from_flwr_array


def to_state(arrays: ArrayRecord, copy: bool = True) -> dict[str, torch.Tensor]:
    """ArrayRecord -> {key: tensor} (decodes every array once).

    ``copy=False`` gives tensors that share the message's read-only bytes: only for
    reading (e.g. ``load_state_dict``, which copies them into the model).
    """
    if copy:
        return {k: torch.from_numpy(from_flwr_array(v).copy()) for k, v in arrays.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {k: torch.from_numpy(from_flwr_array(v)) for k, v in arrays.items()}


def load_into(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """model.load_state_dict(arrays), copying straight into the model's tensors.

    Same keys and shapes are required, as with load_state_dict(strict=True); skips its
    per-call module walk, which dominates with small models.
    """
    targets = _state_views(model)
    if targets.keys() != arrays.keys():
        model.load_state_dict(to_state(arrays, copy=False))  # strict: raises naming the keys
        return
    if all(t.device.type == "cpu" for t in targets.values()):  # numpy copy: no tensor wrapping per array
        for key, target in targets.items():
            np.copyto(target.numpy(), from_flwr_array(arrays[key]).reshape(target.shape))
        return
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for key, target in targets.items():
            target.copy_(torch.from_numpy(from_flwr_array(arrays[key])).reshape(target.shape))


_VIEWS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


def _state_views(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict tensors (views sharing the model's storage), cached."""
    views = _VIEWS.get(model)
    if views is None:
        views = _VIEWS[model] = dict(model.state_dict(keep_vars=False))
    return views


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
