"""Small convolutional networks from the FedAvg and signSGD-FV papers."""

from __future__ import annotations

from torch import nn


def _conv_block(c_in: int, c_out: int, padding: int, pool: nn.Module) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 5, padding=padding), nn.ReLU(), pool]


def mnist_cnn(num_classes: int = 10) -> nn.Sequential:
    """FedAvg paper MNIST CNN (1x28x28), 1,663,370 parameters.

    conv5x5(1->32, same) -> ReLU -> maxpool2 -> conv5x5(32->64, same) -> ReLU -> maxpool2
    -> FC(7*7*64 -> 512) -> ReLU -> FC(512 -> num_classes).
    """
    return nn.Sequential(
        *_conv_block(1, 32, 2, nn.MaxPool2d(2)),
        *_conv_block(32, 64, 2, nn.MaxPool2d(2)),
        nn.Flatten(),
        nn.Linear(7 * 7 * 64, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def fv_mnist_cnn(num_classes: int = 10) -> nn.Sequential:
    """signSGD-FV authors' MNIST CNN (1x28x28), 582,026 parameters.

    conv5x5(1->32, valid) -> ReLU -> maxpool2 -> conv5x5(32->64, valid) -> ReLU -> maxpool2
    -> FC(4*4*64 -> 512) -> ReLU -> FC(512 -> num_classes).
    """
    return nn.Sequential(
        *_conv_block(1, 32, 0, nn.MaxPool2d(2)),
        *_conv_block(32, 64, 0, nn.MaxPool2d(2)),
        nn.Flatten(),
        nn.Linear(4 * 4 * 64, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def cifar_cnn(num_classes: int = 10) -> nn.Sequential:
    """TensorFlow-tutorial CNN used by the FedAvg paper for CIFAR-10 24x24 crops (3x24x24), 1,068,298 parameters.

    conv5x5(3->64, same) -> ReLU -> maxpool(3, stride 2, pad 1) -> conv5x5(64->64, same) -> ReLU
    -> maxpool(3, stride 2, pad 1) -> FC(6*6*64 -> 384) -> ReLU -> FC(384 -> 192) -> ReLU
    -> FC(192 -> num_classes). The tutorial's local response normalisation layers are left out.
    """
    return nn.Sequential(
        *_conv_block(3, 64, 2, nn.MaxPool2d(3, stride=2, padding=1)),
        *_conv_block(64, 64, 2, nn.MaxPool2d(3, stride=2, padding=1)),
        nn.Flatten(),
        nn.Linear(6 * 6 * 64, 384),
        nn.ReLU(),
        nn.Linear(384, 192),
        nn.ReLU(),
        nn.Linear(192, num_classes),
    )
