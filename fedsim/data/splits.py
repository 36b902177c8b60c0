"""The loaded dataset: train/test tensors, normalised."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True, eq=False, repr=False)
class DatasetSplits:
    """Train and test tensors of one dataset, shared read-only by every caller in a process.

    ``x_*``: float32 [n, ...] (images [n, C, H, W], feature vectors [n, d]), normalised;
    ``y_*``: int64 [n] class ids in ``0..num_classes-1``, or float32 [n] / [n, k] regression
    targets (``num_classes`` is then k). ``columns``: other per-example values of the
    training set (e.g. a writer id for ``natural:<column>`` partitions); ``info``: what
    loading it did (its source, how the test set was made, normalisation), for summary.json.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    columns: dict[str, np.ndarray] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for x, y in ((self.x_train, self.y_train), (self.x_test, self.y_test)):
            labels_ok = (y.dtype == torch.int64 and y.dim() == 1) or (y.dtype == torch.float32 and y.dim() in (1, 2))
            if x.dim() < 2 or x.dtype != torch.float32 or not labels_ok or y.shape[:1] != x.shape[:1]:
                raise ValueError(f"{self.name}: bad split x {tuple(x.shape)} {x.dtype}, y {tuple(y.shape)} {y.dtype}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"{self.name}: train and test examples differ in shape")

    @property
    def classification(self) -> bool:
        """Whether the labels are class ids (else regression targets)."""
        return self.y_train.dtype == torch.int64

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example: (C, H, W) for images, (d,) for feature vectors."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"DatasetSplits(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [n, C, H, W] -> float32 ``(x / 255 - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return images.to(torch.float32).div_(255.0).sub_(m).div_(s).contiguous()
