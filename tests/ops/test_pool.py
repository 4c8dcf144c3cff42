import numpy as np
import pytest

from tpusim import tensor_ops
from tpusim.ir import PoolAttrs
from tpusim.ops.pool import integer_maxpool


def channels_last_memory(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("shape, kernel, strides, pads, ceil_mode", [
    ((1, 8, 18, 18), (3, 3), (2, 2), (1, 1, 1, 1), False),   # the ResNet stem's pool
    ((2, 3, 9, 11), (2, 3), (2, 2), (0, 1, 0, 1), True),     # ceil mode: windows overhang the bottom/right
    ((1, 2, 5, 5), (3, 3), (3, 3), (1, 1, 1, 1), True),
    ((1, 4, 6, 6), (2, 2), (2, 2), (0, 0, 0, 0), False),
])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_integer_maxpool_equals_the_padded_numpy_pool_then_clamp(shape, kernel, strides, pads, ceil_mode, dtype,
                                                                  layout):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(info.min, info.max + 1, shape).astype(dtype)
    pool = PoolAttrs(kernel=kernel, strides=strides, pads=pads, ceil_mode=ceil_mode, count_include_pad=False)
    source = x if layout == "nchw" else channels_last_memory(x)
    for qmin, qmax in ((int(info.min), int(info.max)), (int(info.min) + 40, int(info.max) - 30)):
        want = np.clip(tensor_ops.maxpool(x, pool), qmin, qmax).astype(dtype)
        got = integer_maxpool(source, pool, qmin, qmax)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        # The output keeps the input's memory order, so a conv after it still needs no transpose.
        assert (got.transpose(0, 2, 3, 1) if layout == "channels-last" else got).flags.c_contiguous


def test_a_window_in_the_padding_alone_clamps_the_lowest_value():
    # ceil mode keeps a last window that starts on the last row; with pads it holds real elements,
    # and a 1-pixel input padded by 1 on each side still has its element in every 2x2 window.
    x = np.array([[[[5]]]], np.uint8)
    pool = PoolAttrs(kernel=(2, 2), strides=(1, 1), pads=(1, 1, 1, 1), ceil_mode=False, count_include_pad=False)
    np.testing.assert_array_equal(integer_maxpool(x, pool, 7, 255), np.full((1, 1, 2, 2), 7, np.uint8))
    np.testing.assert_array_equal(integer_maxpool(x, pool, 0, 255), np.full((1, 1, 2, 2), 5, np.uint8))
