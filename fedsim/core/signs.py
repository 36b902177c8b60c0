"""Sign codecs: the uploads of signSGD-MV and signSGD-FV.

1-bit code (``pack_signs``): coordinate i of the flattened tensor is bit ``7 - i % 8`` of
byte ``i // 8`` (numpy's big-endian ``packbits`` order); bit 1 means +1, bit 0 means -1.
The padding bits of the last byte are 0 and ignored on decode. A 1-bit code cannot carry
0, so what a zero coordinate becomes is the ``zero-sign`` convention (``ZERO_SIGNS``):

- ``plus``: +1, the convention of the signSGD-MV authors' code (fedsim's default so far);
- ``random``: a fair coin from the client's seeded stream (unbiased, still 1 bit);
- ``abstain``: 0, the coordinate abstains from the vote (``torch.sign``, as in the
  signSGD-FV authors' code). That is a ternary code (``encode_ternary``): the 1-bit signs
  plus either a 1-bit nonzero mask (2 bits per coordinate) or the sorted uint32 indices
  of the zeros, whichever is smaller for the message.

Base-3 code (``pack_trits``): values in {-1, 0, +1}, 5 per byte (1.6 bits per coordinate),
what the signs downlink sends for a vote with many ties (fedsim.algorithms.downlink).
"""

from __future__ import annotations

import numpy as np
import torch

ZERO_SIGNS = ("plus", "random", "abstain")


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


def fill_zeros(t: torch.Tensor, zero_sign: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """The tensor whose 1-bit code carries sign(t) under ``zero_sign`` "plus" or "random":
    t itself for "plus" (zero is sent as +1), t with each exact zero replaced by a fair
    +-1 drawn from ``generator`` for "random" (one draw per zero, in coordinate order)."""
    if zero_sign == "plus":
        return t
    if zero_sign != "random":
        raise ValueError(f"fill_zeros: zero_sign must be 'plus' or 'random', got {zero_sign!r}")
    flat = t.detach().reshape(-1)
    zeros = (flat == 0).nonzero().reshape(-1)
    if zeros.numel() == 0:
        return t
    coins = torch.randint(0, 2, (zeros.numel(),), generator=generator, device=flat.device).to(flat.dtype).mul_(2).sub_(1)
    out = flat.clone()
    out[zeros] = coins
    return out.reshape(t.shape)


PACKED = "packed"  # the 1-bit signs
NONZERO = "nonzero"  # ternary code, dense form: the 1-bit nonzero mask
ZEROS = "zeros"  # ternary code, sparse form: sorted uint32 indices of the zeros


def encode_ternary(t: torch.Tensor) -> dict[str, np.ndarray]:
    """sign(t) in {-1, 0, +1} as ``{PACKED: 1-bit signs (zero as +1), NONZERO: 1-bit mask}``
    (2 bits per coordinate) or ``{PACKED: ..., ZEROS: uint32 indices}`` when the zeros'
    indices take fewer bytes than the mask (4 Z < ceil(N / 8))."""
    flat = t.detach().reshape(-1)
    packed = pack_signs(flat)
    zeros = (flat == 0).nonzero().reshape(-1).cpu().numpy().astype(np.uint32)
    if 4 * zeros.size < packed_size(flat.numel()):
        return {PACKED: packed, ZEROS: zeros}
    return {PACKED: packed, NONZERO: np.packbits((flat != 0).cpu().numpy())}


def decode_ternary(arrays: dict[str, np.ndarray], n: int) -> torch.Tensor:
    """The int8 tensor of n values in {-1, 0, +1} that ``encode_ternary`` encoded. The arrays
    must already be checked for dtype and size (``packed``/``nonzero`` ceil(n / 8) uint8,
    ``zeros`` 1-D uint32); ValueError if the zero indices are not strictly increasing and < n."""
    signs = unpack_signs(arrays[PACKED], n)
    if NONZERO in arrays:
        return signs * torch.from_numpy(np.unpackbits(arrays[NONZERO], count=n).astype(np.int8))
    zeros = np.asarray(arrays[ZEROS])
    if zeros.size and (zeros[-1] >= n or (zeros.size > 1 and not (np.diff(zeros.astype(np.int64)) > 0).all())):
        raise ValueError(f"zero indices must be strictly increasing and below {n}")
    signs[torch.from_numpy(zeros.astype(np.int64))] = 0
    return signs


TRITS = "trits"  # ternary code, base-3 form: 5 values in {-1, 0, +1} per byte
_TRIT_WEIGHTS = np.array([81, 27, 9, 3, 1], np.uint8)  # the first of a byte's 5 coordinates is its most significant digit
_TRIT_TABLE = ((np.arange(243)[:, None] // _TRIT_WEIGHTS.astype(np.int64)) % 3 - 1).astype(np.int8)  # byte -> its 5 values


def trits_size(n: int) -> int:
    """Bytes needed for ``n`` values in {-1, 0, +1} at 5 per byte: ceil(n / 5)."""
    return (n + 4) // 5


def pack_trits(t: torch.Tensor) -> np.ndarray:
    """sign(t) in {-1, 0, +1} in base 3, 5 coordinates per byte (log2(3) = 1.58 bits of the
    1.6 a byte gives them): byte j = sum_k (s_{5j+k} + 1) * 3^(4-k) in [0, 242], the padding
    coordinates of the last byte as 0. ValueError on NaN."""
    flat = t.detach().reshape(-1).cpu()
    if flat.is_floating_point() and bool(torch.isnan(flat).any()):
        raise ValueError("pack_trits: the tensor holds NaN, which has no sign")
    digits = np.ones(trits_size(flat.numel()) * 5, np.uint8)
    digits[: flat.numel()] = (torch.sign(flat).to(torch.int8) + 1).numpy()
    return (digits.reshape(-1, 5) * _TRIT_WEIGHTS).sum(axis=1, dtype=np.uint8)


def unpack_trits(packed: np.ndarray, n: int) -> torch.Tensor:
    """The int8 tensor of ``n`` values in {-1, 0, +1} that ``pack_trits`` packed; ValueError
    unless ``packed`` is ceil(n / 5) uint8 values, each below 243."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.shape != (trits_size(n),):
        raise ValueError(f"unpack_trits: {n} values need {trits_size(n)} uint8 bytes, got dtype {packed.dtype} and shape {packed.shape}")
    if packed.size and int(packed.max()) >= 243:
        raise ValueError(f"unpack_trits: byte value {int(packed.max())} is not 5 base-3 digits (at most 242)")
    return torch.from_numpy(_TRIT_TABLE[packed].reshape(-1)[:n].copy())
