"""1-bit sign codec: the upload of signSGD-MV and signSGD-FV.

Bit layout: coordinate i of the flattened tensor is bit ``7 - i % 8`` of byte ``i // 8``
(numpy's big-endian ``packbits`` order); bit 1 means +1, bit 0 means -1. The padding bits
of the last byte are 0 and ignored on decode. A 1-bit code cannot carry 0, so a zero
coordinate is sent as +1, the convention of the signSGD-MV authors' code.
"""

from __future__ import annotations

import numpy as np
import torch


def packed_size(n: int) -> int:
    """Bytes needed for ``n`` signs: ceil(n / 8)."""
    return (n + 7) // 8


def pack_signs(t: torch.Tensor) -> np.ndarray:
    """Pack sign(t) into a uint8 array of ceil(t.numel() / 8) bytes (zero -> +1).

    Raises ValueError on NaN, which has no sign. A CUDA tensor is packed on its device
    (``pack_on_device``): 8x fewer bytes cross to the host, in one copy with the NaN flag.
    """
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        packed = pack_on_device(flat).cpu().numpy()  # the one device -> host copy (and sync)
        if packed[-1]:
            raise ValueError(_NAN_MESSAGE)
        return packed[:-1]
    if flat.is_floating_point() and bool(torch.isnan(flat).any()):
        raise ValueError(_NAN_MESSAGE)
    return np.packbits((flat >= 0).numpy())


_NAN_MESSAGE = "pack_signs: the tensor holds NaN, which has no sign; check the gradient"
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # bit 7 - i % 8 of byte i // 8: numpy's packbits order


def pack_on_device(flat: torch.Tensor) -> torch.Tensor:
    """The packed bytes of sign(flat) computed on flat's device, as pack_signs lays them
    out, followed by one flag byte (1 if flat holds NaN): ceil(n / 8) + 1 uint8 values."""
    n = flat.numel()
    bits = torch.zeros(packed_size(n) * 8, dtype=torch.uint8, device=flat.device)
    bits[:n] = flat >= 0
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    packed = (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
    nan = torch.isnan(flat).any() if flat.is_floating_point() else torch.zeros((), dtype=torch.bool, device=flat.device)
    return torch.cat([packed, nan.to(torch.uint8).reshape(1)])


def unpack_signs(packed: np.ndarray, n: int) -> torch.Tensor:
    """Decode ``n`` signs from ``packed`` (as written by pack_signs) into an int8 tensor of +-1."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError(
            f"unpack_signs: expected a 1-D uint8 array, got dtype {packed.dtype} and shape {packed.shape}"
        )
    if packed.size != packed_size(n):
        raise ValueError(
            f"unpack_signs: {n} signs need {packed_size(n)} bytes, got {packed.size}"
        )
    bits = np.unpackbits(packed, count=n)
    return torch.from_numpy(bits.astype(np.int8) * 2 - 1)
