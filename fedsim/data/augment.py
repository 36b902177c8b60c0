"""CIFAR training augmentation on a batch already on its device."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding ``pad`` (same size out) and random horizontal flip.

    ``x``: [B, C, H, W]. One ``gather`` for the whole batch: each image gets its own offsets
    (uniform in 0..2*pad) and flip (p = 1/2), drawn from ``generator`` on its device, so
    the result is a function of ``x`` and the generator's state. ``pad=0, flip=False``
    returns ``x`` itself. Zero padding is zero in normalised units, i.e. the mean colour.
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects [B, C, H, W], got shape {tuple(x.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad == 0 and not flip:
        return x
    b, c, h, w = x.shape
    dev = generator.device
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [B, H] rows of the padded image
    cols = torch.arange(w, device=x.device).expand(b, w)
    if flip:
        flipped = torch.rand(b, generator=generator, device=dev).to(x.device) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    cols = dx[:, None] + cols  # [B, W]
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    flat = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, flat).reshape(b, c, h, w)
