import dataclasses

import numpy as np
import pytest

from tpusim import ops, tensor_ops
from tpusim.frontend.context import pool_output_hw
from tpusim.ir import Layer, PoolAttrs
from tpusim.ops.pool import integer_avgpool, integer_avgpool_reference, integer_maxpool
from tpusim.quant.arithmetic import QParams


def channels_last_memory(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def is_channels_last_memory(x):
    return x.transpose(0, 2, 3, 1).flags.c_contiguous


POOLS = [  # shape, kernel, strides, pads, ceil_mode
    ((1, 8, 18, 18), (3, 3), (2, 2), (1, 1, 1, 1), False),   # the ResNet stem's pool
    ((2, 3, 9, 11), (2, 3), (2, 2), (0, 1, 0, 1), True),     # ceil mode: windows overhang the bottom/right
    ((1, 2, 5, 5), (3, 3), (3, 3), (1, 1, 1, 1), True),
    ((1, 4, 6, 6), (2, 2), (2, 2), (0, 0, 0, 0), False),
    ((2, 24, 7, 7), (3, 3), (1, 1), (1, 1, 1, 1), True),     # GoogLeNet's and Inception's branch pools
    ((1, 5, 9, 7), (3, 2), (1, 2), (2, 0, 1, 1), True),      # uneven strides and pads, ceil overhang
    ((1, 3, 4, 5), (2, 2), (1, 1), (2, 2, 2, 2), False),     # pads past the kernel: windows with no element
]


@pytest.mark.parametrize("shape, kernel, strides, pads, ceil_mode", POOLS)
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
        # Channels-last memory whatever the input's, so a conv after it needs no transpose.
        assert is_channels_last_memory(got)


def test_a_window_in_the_padding_alone_clamps_the_lowest_value():
    # ceil mode keeps a last window that starts on the last row; with pads it holds real elements,
    # and a 1-pixel input padded by 1 on each side still has its element in every 2x2 window.
    x = np.array([[[[5]]]], np.uint8)
    pool = PoolAttrs(kernel=(2, 2), strides=(1, 1), pads=(1, 1, 1, 1), ceil_mode=False, count_include_pad=False)
    np.testing.assert_array_equal(integer_maxpool(x, pool, 7, 255), np.full((1, 1, 2, 2), 7, np.uint8))
    np.testing.assert_array_equal(integer_maxpool(x, pool, 0, 255), np.full((1, 1, 2, 2), 5, np.uint8))
    # Pads wider than the kernel leave windows with no element at all: they clamp the lowest value too.
    pool = PoolAttrs(kernel=(2, 2), strides=(1, 1), pads=(2, 2, 2, 2), ceil_mode=False, count_include_pad=False)
    got = integer_maxpool(x, pool, 7, 255)
    assert got[0, 0, 0, 0] == 7 and got[0, 0, 1, 1] == 7 and got[0, 0, 2, 2] == 7


def avgpool_qlayer(shape, pool, grid, out_bounds=None):
    """An AveragePool's QLayer on int8 or uint8 grids as the quantizer makes it; out_bounds tightens its output
    bounds as a fused activation would."""
    (qmin, qmax), x_zero, y_zero = grid
    layer = Layer(name="pool", op="avgpool", inputs=("x",), output="y", input_shapes=(shape,),
                  output_shape=(*shape[:2], *pool_output_hw(shape[2], shape[3], pool)), pool=pool)
    x_qp = QParams(np.array(0.0625), np.array(x_zero), qmin, qmax)
    y_qp = QParams(np.array(0.046875), np.array(y_zero), qmin, qmax)
    ql = ops.op("avgpool").quantize(layer, (x_qp,), y_qp, None, None)
    return ql if out_bounds is None else dataclasses.replace(ql, out_qmin=out_bounds[0], out_qmax=out_bounds[1])


@pytest.mark.parametrize("shape, kernel, strides, pads, ceil_mode", POOLS)
@pytest.mark.parametrize("count_include_pad", [False, True])
@pytest.mark.parametrize("grid", [((0, 255), 131, 7), ((-128, 127), -7, 3)], ids=["uint8", "int8"])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_integer_avgpool_equals_the_numpy_window_sums_rescaled_count_by_count(shape, kernel, strides, pads, ceil_mode,
                                                                             count_include_pad, grid, layout):
    pool = PoolAttrs(kernel=kernel, strides=strides, pads=pads, ceil_mode=ceil_mode,
                     count_include_pad=count_include_pad)
    (qmin, qmax), _, y_zero = grid
    x = np.random.default_rng(sum(shape)).integers(qmin, qmax + 1, shape).astype(np.uint8 if qmin == 0 else np.int8)
    source = x if layout == "nchw" else channels_last_memory(x)
    for out_bounds in (None, (y_zero, qmax - 20)):  # as a fused ReLU (and a clip) tighten them
        ql = avgpool_qlayer(shape, pool, grid, out_bounds)
        want = integer_avgpool_reference(ql, x)
        got = integer_avgpool(ql, source)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert is_channels_last_memory(got)


def test_avgpool_execute_of_a_concat_output_and_of_a_conv_output_agree():
    # Inception's branch pool: 3x3, stride 1, pad 1, on what a concat (NCHW) and a conv (channels-last) return.
    shape, pool = (2, 40, 8, 8), PoolAttrs((3, 3), (1, 1), (1, 1, 1, 1), ceil_mode=False, count_include_pad=True)
    ql = avgpool_qlayer(shape, pool, ((0, 255), 128, 0))
    x = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
    want = integer_avgpool_reference(ql, x)
    for source in (x, channels_last_memory(x)):
        got, wrapped = ops.op("avgpool").execute(ql, [source], None)
        assert wrapped == 0
        np.testing.assert_array_equal(got, want)
