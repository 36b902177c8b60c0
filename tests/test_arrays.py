"""The fast .npy codec and load_into: same bytes and values as Flower's own path."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from fedsim.arrays import from_flwr_array, to_flwr_array
from fedsim.models import build_model
from fedsim.strategies.model_vector import load_into

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
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    del record["fc.bias"]
    with pytest.raises(RuntimeError, match="fc.bias"):
        load_into(a, record)
