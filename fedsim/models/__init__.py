"""The papers' networks, selected by name.

Every model takes float32 input ``[batch, C, H, W]`` with ``(C, H, W) = MODEL_INPUT_SHAPES[name]``
and returns logits ``[batch, num_classes]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedsim.models.cnn import cifar_cnn, fv_mnist_cnn, mnist_cnn
from fedsim.models.mlp import digits_logreg, digits_mlp, mnist_2nn, mnist_logreg
from fedsim.models.resnet import resnet20, resnet56

__all__ = ["MODELS", "MODEL_INPUT_SHAPES", "build_model", "count_parameters"]

MODELS: dict[str, Callable[[int], nn.Module]] = {
    "digits-logreg": digits_logreg,
    "digits-mlp": digits_mlp,
    "mnist-logreg": mnist_logreg,
    "mnist-2nn": mnist_2nn,
    "mnist-cnn": mnist_cnn,
    "fv-mnist-cnn": fv_mnist_cnn,
    "cifar-cnn": cifar_cnn,
    "resnet20": resnet20,
    "resnet56": resnet56,
}

MODEL_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits-logreg": (1, 8, 8),
    "digits-mlp": (1, 8, 8),
    "mnist-logreg": (1, 28, 28),
    "mnist-2nn": (1, 28, 28),
    "mnist-cnn": (1, 28, 28),
    "fv-mnist-cnn": (1, 28, 28),
    "cifar-cnn": (3, 24, 24),
    "resnet20": (3, 32, 32),
    "resnet56": (3, 32, 32),
}


def build_model(name: str, num_classes: int = 10, seed: int | None = None) -> nn.Module:
    """The model ``name`` with ``num_classes`` outputs, built on the CPU.

    With ``seed`` the initial weights depend on ``seed`` alone and torch's global RNG
    state is left exactly as it was; without it, initialisation draws from the global RNG.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    factory = MODELS[name]
    if seed is None:
        return factory(num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return factory(num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter entries (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
