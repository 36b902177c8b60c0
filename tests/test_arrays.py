"""The fast .npy codec and load_into: same bytes and values as Flower's own path; byte-exact
decoding of untrusted arrays."""

import io
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from fedsim.arrays import decode_exact, from_flwr_array, load_into, to_flwr_array
from fedsim.models import build_model

dtypes = st.sampled_from([np.float32, np.float64, np.int64, np.int8, np.uint8, np.float16, ">f4"])


@settings(max_examples=150, deadline=None)
@given(dtypes.flatmap(lambda d: arrays(d, array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))))
def test_encode_is_byte_identical_to_flower_and_decodes_back(x):
    ours, theirs = to_flwr_array(x), Array(x)
    assert (ours.data, ours.dtype, ours.shape, ours.stype) == (theirs.data, theirs.dtype, theirs.shape, theirs.stype)
    for a in (ours, theirs):
        y = from_flwr_array(a)
        assert y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_array_equal(y, x)


def test_decode_falls_back_for_fortran_order():
    x = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    np.testing.assert_array_equal(from_flwr_array(Array(x)), x)


def test_load_into_equals_load_state_dict_and_is_strict():
    src = build_model("resnet20", seed=1)
    record = ArrayRecord(src.state_dict())
    a, b = build_model("resnet20", seed=2), build_model("resnet20", seed=2)
    load_into(a, record)
    b.load_state_dict(record.to_torch_state_dict())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    del record["fc.bias"]
    with pytest.raises(RuntimeError, match=r"fc\.bias"):
        load_into(a, record)


def test_staged_load_equals_load_state_dict_and_reuses_its_buffer():
    """The GPU path (a host staging buffer, then non-blocking copies; pinned on CUDA) run on
    the CPU without pinning: same values as load_state_dict for float and int64 (BatchNorm's
    counter) tensors, one buffer per model reused from the second load on."""
    from fedsim.arrays import _STAGES, _state_views, load_staged

    a = build_model("resnet20", seed=2)
    for seed in (1, 3):
        src = build_model("resnet20", seed=seed)
        src.state_dict()["bn1.num_batches_tracked"].fill_(seed)
        load_staged(a, _state_views(a), ArrayRecord(src.state_dict()), pin=False)
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), src.state_dict().items(), strict=True):
            assert ka == kb and va.dtype == vb.dtype and torch.equal(va, vb), ka
        buffer = _STAGES[a].buffer
        if seed == 1:
            first = buffer
    assert buffer is first and _STAGES[a].done is None  # reused; no CUDA event without CUDA
    with pytest.raises(ValueError):  # a wrong shape under the right key is refused, as by load_state_dict
        wrong = dict(src.state_dict())
        wrong["fc.bias"] = torch.zeros(3)
        load_staged(a, _state_views(a), ArrayRecord(wrong), pin=False)


X = np.arange(6, dtype=np.float32).reshape(2, 3)
GOOD = to_flwr_array(X)


def _declared(data: bytes, dtype: str = "float32", shape: tuple = (2, 3)) -> Array:
    return Array(dtype=dtype, shape=shape, stype=GOOD.stype, data=data)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (_declared(GOOD.data[:-3]), "data bytes"),  # a few bytes short
        (_declared(GOOD.data + b"\0\0\0\0"), "data bytes"),  # a few bytes long: np.load would ignore them
        (_declared(Array(X.astype(np.float64)).data), "header says dtype float64"),
        (_declared(Array(X.reshape(3, 2)).data), "shape (3, 2)"),
        (_declared(Array(X).data, dtype="int32"), "declares dtype int32"),
        (_declared(GOOD.data.replace(b"(2, 3)", b"(9**9)")), None),  # a header np.load cannot parse
        (_declared(np.lib.format.magic(1, 0) + b"junk"), None),
        (_declared(np.lib.format.magic(3, 0) + GOOD.data[8:]), "version"),
        (Array(dtype="float32", shape=(2, 3), stype="torch.raw", data=GOOD.data), "stype"),
        (_declared(b"not npy at all"), "magic"),
    ],
)
def test_decode_exact_rejects_bytes_that_differ_from_the_declared_array(bad, reason):
    with pytest.raises(ValueError, match=None if reason is None else re.escape(reason)):
        decode_exact(bad)


def test_decode_never_reads_shifted_bytes():
    """The fast path used to take header_len = len(data) - nbytes: a long or short payload
    was decoded from shifted bytes. Now such bytes go to np.load, which reads by the header."""
    long = _declared(GOOD.data + b"\xff\xff\xff\xff")
    np.testing.assert_array_equal(from_flwr_array(long), X)
    with pytest.raises(ValueError):
        from_flwr_array(_declared(GOOD.data[:-4]))


def test_decode_exact_refuses_a_huge_claimed_shape_without_allocating():
    huge = io.BytesIO()
    np.lib.format.write_array_header_1_0(huge, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    with pytest.raises(ValueError, match="data bytes"):
        decode_exact(Array(dtype="float32", shape=(10**12,), stype=GOOD.stype, data=huge.getvalue() + b"\0" * 8))


@settings(max_examples=100, deadline=None)
@given(dtypes.flatmap(lambda d: arrays(d, array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))), st.booleans())
def test_decode_exact_accepts_what_flower_and_we_write(x, fortran):
    x = np.asfortranarray(x) if fortran else x
    for a in (to_flwr_array(x), Array(x)):
        y = decode_exact(a)
        assert y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_array_equal(y, x)
