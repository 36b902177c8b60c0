"""CIFAR training augmentation on a batch already on its device."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True, size: int | None = None
) -> torch.Tensor:
    """Random ``size`` x ``size`` crop (default: the input size) of the image zero-padded by
    ``pad``, and a random horizontal flip.

    ``x``: [B, C, H, W]. One ``gather`` for the whole batch: each image gets its own offsets
    (uniform in 0..H+2*pad-size) and flip (p = 1/2), drawn from ``generator`` on its device, so
    the result is a function of ``x`` and the generator's state. ``pad=0, flip=False``
    returns ``x`` itself. Zero padding is zero in normalised units, i.e. the mean colour.
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects [B, C, H, W], got shape {tuple(x.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    b, c, h_in, w_in = x.shape
    h = w = size if size is not None else h_in
    if size is not None and not (0 < size <= min(h_in, w_in) + 2 * pad):
        raise ValueError(f"crop size {size} does not fit a {h_in}x{w_in} image padded by {pad}")
    if pad == 0 and not flip and (h, w) == (h_in, w_in):
        return x
    dev = generator.device
    dy = torch.randint(0, h_in + 2 * pad - h + 1, (b,), generator=generator, device=dev).to(x.device)
    dx = torch.randint(0, w_in + 2 * pad - w + 1, (b,), generator=generator, device=dev).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [B, h] rows of the padded image
    cols = torch.arange(w, device=x.device).expand(b, w)
    if flip:
        flipped = torch.rand(b, generator=generator, device=dev).to(x.device) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    cols = dx[:, None] + cols  # [B, W]
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    flat = (rows[:, :, None] * (w_in + 2 * pad) + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, flat).reshape(b, c, h, w)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` window of each image of [B, C, H, W] (evaluation crop)."""
    h, w = x.shape[-2:]
    if size > min(h, w):
        raise ValueError(f"crop size {size} does not fit a {h}x{w} image")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]
