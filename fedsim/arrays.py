"""Fast conversions between numpy arrays and Flower ``Array`` (``.npy`` bytes).

Flower's ``Array.numpy()`` runs ``np.load``, which parses the ``.npy`` header with
``ast.literal_eval`` for every array of every message; with small models and thousands
of rounds that parsing is most of the framework's cost. The bytes here are exactly what
``np.save`` writes (numpy's public ``write_array_header_1_0``, cached per dtype and
shape), so Flower reads them as usual; decoding takes the array from the end of the
buffer by its declared dtype and shape and falls back to ``Array.numpy()`` for anything
else (Fortran order, object dtypes, other serialisations).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

NUMPY_STYPE = "numpy.ndarray"


@functools.lru_cache(maxsize=4096)
def _header(dtype_str: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype_str, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def to_flwr_array(x: np.ndarray) -> Array:
    """numpy -> Array, byte-identical to ``Array(x)`` for C-ordered numeric arrays."""
    x = x if x.flags.c_contiguous else x.copy(order="C")  # ascontiguousarray would make 0-d arrays 1-d
    if x.dtype.hasobject:
        return Array(x)
    data = _header(np.lib.format.dtype_to_descr(x.dtype), tuple(x.shape)) + x.tobytes()
    return Array(dtype=str(x.dtype), shape=tuple(int(d) for d in x.shape), stype=NUMPY_STYPE, data=data)


def from_flwr_array(a: Array) -> np.ndarray:
    """Array -> numpy (read-only view of the message bytes on the fast path)."""
    try:
        dtype = np.dtype(a.dtype)
        shape = tuple(int(d) for d in a.shape)
    except (TypeError, ValueError):
        return a.numpy()
    nbytes = dtype.itemsize * math.prod(shape)
    data = a.data
    header_len = len(data) - nbytes
    if a.stype != NUMPY_STYPE or dtype.hasobject or not 10 <= header_len <= 4096 or data[:6] != b"\x93NUMPY":
        return a.numpy()
    if b"'fortran_order': False" not in data[:header_len]:
        return a.numpy()
    return np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize if dtype.itemsize else 0, offset=header_len).reshape(shape)


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """numpy arrays -> ArrayRecord, keeping key order."""
    return ArrayRecord({k: to_flwr_array(v) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> {key: numpy array} (read-only views where possible)."""
    return {k: from_flwr_array(v) for k, v in record.items()}
