"""Fully connected networks: multinomial logistic regression, the digits MLP and the
FedAvg paper's MNIST 2NN."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class MLP(nn.Sequential):
    """Flatten -> [Linear -> ReLU] per hidden width -> Linear(num_classes)."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


def digits_mlp(num_classes: int = 10) -> MLP:
    """sklearn digits (1x8x8): 64-64-num_classes with ReLU (4,810 parameters for 10 classes)."""
    return MLP(64, [64], num_classes)


def mnist_2nn(num_classes: int = 10) -> MLP:
    """FedAvg paper 2NN on MNIST (1x28x28): 784-200-200-num_classes with ReLU (199,210 parameters)."""
    return MLP(28 * 28, [200, 200], num_classes)


def digits_logreg(num_classes: int = 10) -> MLP:
    """Multinomial logistic regression on sklearn digits: 64-num_classes (650 parameters for
    10 classes); about the least compute a client can do, for measuring framework cost."""
    return MLP(64, [], num_classes)


def mnist_logreg(num_classes: int = 10) -> MLP:
    """Multinomial logistic regression on MNIST, a common FL baseline: 784-num_classes (7,850 parameters)."""
    return MLP(28 * 28, [], num_classes)
