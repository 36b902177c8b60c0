"""The networks fedsim knows by name (``MODELS``, one entry each), and a user's own.

Every built-in model takes float32 input ``[batch, *input_shape]`` and returns logits
``[batch, num_classes]``. ``model_entry`` also takes a user's model by import path
(``"mytask.task:Net"``): an ``nn.Module`` class or factory, called with ``num_classes``
when it takes that argument, with none otherwise (Flower's templates define
``class Net(nn.Module)`` with a zero-argument constructor); its input shape is found by
a forward pass (``fedsim.plan``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedsim.errors import ConfigError
from fedsim.models.cnn import cifar_cnn, fv_mnist_cnn, mnist_cnn
from fedsim.models.mlp import digits_logreg, digits_mlp, mnist_2nn, mnist_logreg
from fedsim.models.resnet import resnet20, resnet56
from fedsim.plugins import is_import_path, load_attr

__all__ = ["MODELS", "ModelEntry", "build_model", "count_parameters", "model_entry"]


@dataclass(frozen=True)
class ModelEntry:
    """A model: its name, ``build(num_classes)`` and the shape of one input example (None:
    not declared, as for a user's model)."""

    name: str
    build: Callable[[int], nn.Module]
    input_shape: tuple[int, ...] | None = None


MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry("digits-logreg", digits_logreg, (1, 8, 8)),
        ModelEntry("digits-mlp", digits_mlp, (1, 8, 8)),
        ModelEntry("mnist-logreg", mnist_logreg, (1, 28, 28)),
        ModelEntry("mnist-2nn", mnist_2nn, (1, 28, 28)),
        ModelEntry("mnist-cnn", mnist_cnn, (1, 28, 28)),
        ModelEntry("fv-mnist-cnn", fv_mnist_cnn, (1, 28, 28)),
        ModelEntry("cifar-cnn", cifar_cnn, (3, 24, 24)),
        ModelEntry("resnet20", resnet20, (3, 32, 32)),
        ModelEntry("resnet56", resnet56, (3, 32, 32)),
    )
}


def model_entry(name: str) -> ModelEntry:
    """The entry of a built-in ``name`` or of a user's ``"module:attr"``; ConfigError
    (one line) for an unknown name or an import that fails."""
    if name in MODELS:
        return MODELS[name]
    if not is_import_path(name):
        raise ConfigError(f"model={name!r}: choose 'auto', one of {sorted(MODELS)}, or a model of yours as 'package.module:attr'")
    return ModelEntry(name, _user_factory(name, load_attr(name, "model")))


def _user_factory(name: str, obj: object) -> Callable[[int], nn.Module]:
    """``build(num_classes)`` for a user's class or factory: passes ``num_classes`` when the
    signature takes it, nothing otherwise; what it returns must be an ``nn.Module``."""
    if not callable(obj):
        raise ConfigError(f"model={name!r} is a {type(obj).__name__}, not an nn.Module class or a function returning one")
    try:
        takes = "num_classes" in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        takes = False

    def build(num_classes: int) -> nn.Module:
        made = obj(num_classes=num_classes) if takes else obj()
        if not isinstance(made, nn.Module):
            raise ConfigError(f"model={name!r} returned a {type(made).__name__}, not a torch.nn.Module")
        return made

    return build


def build_model(name: str | ModelEntry, num_classes: int = 10, seed: int | None = None) -> nn.Module:
    """The model ``name`` (or entry) with ``num_classes`` outputs, built on the CPU.

    With ``seed`` the initial weights depend on ``seed`` alone and torch's global RNG
    state is left exactly as it was; without it, initialisation draws from the global RNG.
    """
    if isinstance(name, str) and name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    entry = MODELS[name] if isinstance(name, str) else name
    if seed is None:
        return entry.build(num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return entry.build(num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter entries (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
