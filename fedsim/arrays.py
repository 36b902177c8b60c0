"""Fast conversions between numpy arrays and Flower ``Array`` (``.npy`` bytes).

Flower's ``Array.numpy()`` runs ``np.load``, which parses the ``.npy`` header with
``ast.literal_eval`` for every array of every message; with small models and thousands
of rounds that parsing is most of the framework's cost. The bytes here are exactly what
``np.save`` writes (numpy's public ``write_array_header_1_0``, cached per dtype and
shape), so Flower reads them as usual. Decoding takes the fast path only when the bytes
are exactly that header followed by exactly the declared dtype and shape's data; anything
else (Fortran order, object dtypes, other serialisations, corrupt lengths) goes to
``Array.numpy()``, or to ``decode_exact`` where the bytes come from an untrusted client.
"""

from __future__ import annotations

import functools
import io
import math
import operator
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

NUMPY_STYPE = "numpy.ndarray"
_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=4096)
def _header_of(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    return _header(str(np.lib.format.dtype_to_descr(dtype)), tuple(int(d) for d in shape))


@functools.lru_cache(maxsize=4096)
def _header(dtype_str: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype_str, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@functools.lru_cache(maxsize=4096)
def _layout(dtype_str: str, shape: tuple[int, ...]) -> tuple[np.dtype, tuple[int, ...], bytes, int, int] | None:
    """(dtype, shape, header, element count, total length) of what ``to_flwr_array`` writes
    for this declared dtype and shape; None where the fast path does not apply."""
    try:
        dtype = np.dtype(dtype_str)
        dims = tuple(operator.index(d) for d in shape)
        if dtype.hasobject or dtype.itemsize == 0 or any(d < 0 for d in dims):
            return None
        header = _header_of(dtype, dims)
    except (TypeError, ValueError):
        return None
    count = math.prod(dims)
    return dtype, dims, header, count, len(header) + dtype.itemsize * count


def _fast_view(a: Array) -> np.ndarray | None:
    """A read-only view of the data if ``a`` holds exactly the bytes ``to_flwr_array`` writes
    for its declared dtype and shape (header byte for byte, data length exact), else None."""
    try:
        layout = _layout(a.dtype, tuple(a.shape))
    except TypeError:  # an unhashable dtype or shape entry
        return None
    if layout is None or a.stype != NUMPY_STYPE:
        return None
    dtype, shape, header, count, size = layout
    data = a.data
    if len(data) != size or data[: len(header)] != header:
        return None
    return np.frombuffer(data, dtype=dtype, count=count, offset=len(header)).reshape(shape)


def to_flwr_array(x: np.ndarray) -> Array:
    """numpy -> Array, byte-identical to ``Array(x)`` for C-ordered numeric arrays."""
    x = x if x.flags.c_contiguous else x.copy(order="C")  # ascontiguousarray would make 0-d arrays 1-d
    if x.dtype.hasobject:
        return Array(x)
    data = b"".join((_header_of(x.dtype, x.shape), x.data))  # one copy of the data (header + tobytes() made two)
    return Array(dtype=str(x.dtype), shape=tuple(int(d) for d in x.shape), stype=NUMPY_STYPE, data=data)


def from_flwr_array(a: Array) -> np.ndarray:
    """Array -> numpy (read-only view of the message bytes on the fast path)."""
    view = _fast_view(a)
    return a.numpy() if view is None else view


def decode_exact(a: Array) -> np.ndarray:
    """Array -> numpy for untrusted bytes; ValueError unless the ``.npy`` header's dtype and
    shape equal the Array's declared ones and the data fills the rest of the bytes exactly.

    Off the fast path the header is parsed and the length checked before any data is
    read, so a header claiming a huge shape allocates nothing."""
    view = _fast_view(a)
    if view is not None:
        return view
    if a.stype != NUMPY_STYPE:
        raise ValueError(f"stype is {a.stype!r}, expected {NUMPY_STYPE!r}")
    data = bytes(a.data)
    if data[:6] != _MAGIC:
        raise ValueError("the bytes are not .npy (no magic string)")
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    declared_dtype, declared_shape = np.dtype(a.dtype), tuple(operator.index(d) for d in a.shape)
    if dtype.hasobject or dtype.itemsize == 0:
        raise ValueError(f"dtype {dtype} cannot be decoded without pickle")
    if dtype != declared_dtype or tuple(shape) != declared_shape:
        raise ValueError(
            f"the .npy header says dtype {dtype} and shape {tuple(shape)}, "
            f"the Array declares dtype {declared_dtype} and shape {declared_shape}"
        )
    offset, count = f.tell(), math.prod(shape)
    if len(data) != offset + dtype.itemsize * count:
        raise ValueError(
            f"{len(data) - offset} data bytes, expected {dtype.itemsize * count} for dtype {dtype} and shape {tuple(shape)}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """numpy arrays -> ArrayRecord, keeping key order. Filled entry by entry:
    ``ArrayRecord(dict)`` would build every Array a second time."""
    record = ArrayRecord()
    for k, v in arrays.items():
        record[k] = to_flwr_array(v)
    return record


def to_state(arrays: ArrayRecord, copy: bool = True) -> dict[str, torch.Tensor]:
    """ArrayRecord -> {key: tensor} (decodes every array once).

    ``copy=False`` gives tensors that share the message's read-only bytes: only for
    reading (e.g. ``load_state_dict``, which copies them into the model).
    """
    if copy:
        return {k: torch.from_numpy(from_flwr_array(v).copy()) for k, v in arrays.items()}
    return dict(zip(arrays.keys(), read_only_tensors([from_flwr_array(v) for v in arrays.values()]), strict=True))


def read_only_tensors(arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """Tensors sharing the arrays' memory, no copy; where an array is read-only (a
    message's bytes) its tensor must only be read (torch has no read-only tensors)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return [torch.from_numpy(a) for a in arrays]


def load_into(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """model.load_state_dict(arrays), copying straight into the model's tensors.

    Same keys and shapes are required, as with load_state_dict(strict=True); skips its
    per-call module walk, which dominates with small models.
    """
    targets = _state_views(model)
    if targets.keys() != arrays.keys():
        model.load_state_dict(to_state(arrays, copy=False))  # strict: raises naming the keys
        return
    if all(t.device.type == "cpu" for t in targets.values()):  # numpy copy: no tensor wrapping per array
        for key, target in targets.items():
            np.copyto(target.numpy(), from_flwr_array(arrays[key]).reshape(target.shape))
        return
    load_staged(model, targets, arrays, pin=torch.cuda.is_available())


_ALIGN = 64  # bytes: every array starts on a boundary any dtype can be viewed at


@dataclass
class _Stage:
    """A model's host staging buffer (pinned where CUDA is) and the event that marks the end
    of the last copies out of it (None: no copy in flight)."""

    buffer: torch.Tensor
    done: torch.cuda.Event | None = None


_STAGES: weakref.WeakKeyDictionary[torch.nn.Module, _Stage] = weakref.WeakKeyDictionary()


def load_staged(model: torch.nn.Module, targets: Mapping[str, torch.Tensor], arrays: ArrayRecord, pin: bool) -> None:
    """Copy ``arrays`` into the device tensors ``targets`` through one host staging buffer per
    model: the message bytes go into the buffer (numpy), then each tensor is copied from it
    with ``non_blocking=True``, which for a page-locked (``pin``) buffer is an asynchronous DMA
    on the current stream (ordered before any kernel that uses the weights). The next call for
    the same model first waits for those copies to end before it overwrites the buffer."""
    sizes = {k: t.numel() * t.element_size() for k, t in targets.items()}
    slots = {k: -(-n // _ALIGN) * _ALIGN for k, n in sizes.items()}  # each array's share of the buffer, aligned
    need = sum(slots.values())
    stage = _STAGES.get(model)
    if stage is None or stage.buffer.numel() < need:
        stage = _STAGES[model] = _Stage(torch.empty(need, dtype=torch.uint8, pin_memory=pin))
    elif stage.done is not None:
        stage.done.synchronize()  # the previous copies out of the buffer have ended
    offset = 0
    with torch.no_grad():
        for key, target in targets.items():
            part = stage.buffer[offset : offset + sizes[key]].view(target.dtype).view(target.shape)
            np.copyto(part.numpy(), from_flwr_array(arrays[key]).reshape(target.shape))
            target.copy_(part, non_blocking=True)
            offset += slots[key]
    if pin and any(t.device.type == "cuda" for t in targets.values()):
        stage.done = torch.cuda.Event()
        stage.done.record()


_VIEWS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def _state_views(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict tensors (views sharing the model's storage), cached."""
    views = _VIEWS.get(model)
    if views is None:
        views = _VIEWS[model] = dict(model.state_dict(keep_vars=False))
    return views
