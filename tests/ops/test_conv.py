import gc
import weakref

import numpy as np
import pytest

from op_checks import CONFIG
from tpusim import ops
from tpusim.ir import Activation, ConvAttrs, Layer
from tpusim.ops import conv as conv_module
from tpusim.ops.base import ExecOptions
from tpusim.quant.arithmetic import QParams


def _conv_qlayer(c_in, c_out, kernel, strides, pads, groups, seed):
    rng = np.random.default_rng(seed)
    x_shape = (1, c_in, 9, 8)
    attrs = ConvAttrs(kernel=kernel, strides=strides, pads=pads, dilations=(1, 1), groups=groups)
    from tpusim.frontend.context import conv_output_hw

    h_out, w_out = conv_output_hw(9, 8, attrs)
    layer = Layer(name="c", op="conv", inputs=("x",), output="y", input_shapes=(x_shape,),
                  output_shape=(1, c_out, h_out, w_out), activation=Activation("relu", 0.0, float("inf")),
                  weight=rng.normal(0, 0.2, (c_out, c_in // groups, *kernel)).astype(np.float32),
                  bias=rng.normal(0, 0.5, c_out).astype(np.float32), conv=attrs)
    x_qp, y_qp = QParams(np.array(0.046875), np.array(7), 0, 255), QParams(np.array(0.0703125), np.array(3), 0, 255)
    ql = ops.op("conv").quantize(layer, (x_qp,), y_qp, CONFIG.quant, None)
    return ql, rng.integers(0, 256, x_shape).astype(np.uint8)


@pytest.mark.parametrize("c_in, c_out, kernel, strides, pads, groups", [
    (3, 64, (3, 3), (2, 2), (1, 1, 1, 1), 1),    # a stem: few NCHW channels, K padded to whole blocks
    (64, 64, (1, 1), (1, 1), (0, 0, 0, 0), 1),   # the kernel's input itself as columns
    (16, 8, (3, 3), (1, 1), (1, 1, 1, 1), 2),    # grouped, thin: the 4 x 4 tile and portable paths
])
def test_the_prepared_int8_path_equals_exact_blas_on_every_call(c_in, c_out, kernel, strides, pads, groups):
    ql, x = _conv_qlayer(c_in, c_out, kernel, strides, pads, groups, seed=c_in + c_out)
    conv = ops.op("conv")
    want, want_wrapped = conv.execute(ql, [x], ExecOptions(32, "exact-blas"))
    for source in (x, x, np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)):
        got, wrapped = conv.execute(ql, [source], ExecOptions(32, "int8-gemm"))
        np.testing.assert_array_equal(got, want)
        assert wrapped == want_wrapped
    assert np.count_nonzero(want == ql.out_qmin) and np.count_nonzero(want > ql.out_qmin)  # the ReLU clamps some


def _depthwise_qlayer(channels, hw, kernel, strides, pads, dilations, signed, seed):
    from tpusim.frontend.context import conv_output_hw

    rng = np.random.default_rng(seed)
    x_shape = (2, channels, *hw)
    attrs = ConvAttrs(kernel=kernel, strides=strides, pads=pads, dilations=dilations, groups=channels)
    h_out, w_out = conv_output_hw(*hw, attrs)
    layer = Layer(name="dw", op="conv", inputs=("x",), output="y", input_shapes=(x_shape,),
                  output_shape=(2, channels, h_out, w_out), activation=Activation("relu", 0.0, float("inf")),
                  weight=rng.normal(0, 0.5, (channels, 1, *kernel)).astype(np.float32),
                  bias=rng.normal(0, 0.5, channels).astype(np.float32), conv=attrs)
    x_qp = QParams(np.array(0.046875), np.array(0), -128, 127) if signed else \
        QParams(np.array(0.046875), np.array(7), 0, 255)
    y_qp = QParams(np.array(0.0703125), np.array(3), 0, 255)
    ql = ops.op("conv").quantize(layer, (x_qp,), y_qp, CONFIG.quant, None)
    x = rng.integers(-128, 128, x_shape).astype(np.int8) if signed else rng.integers(0, 256, x_shape).astype(np.uint8)
    return ql, x


@pytest.mark.parametrize("channels, hw, kernel, strides, pads, dilations", [
    (32, (9, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),     # MobileNet's
    (96, (12, 12), (3, 3), (2, 2), (0, 1, 1, 0), (1, 1)),   # strided, TensorFlow's uneven SAME padding
    (8, (11, 10), (5, 5), (2, 1), (2, 2, 2, 2), (2, 1)),    # 5 x 5, dilated
    (17, (7, 7), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),     # channels no vector width divides
])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("acc_bits", [32, 16, 12])
def test_the_depthwise_kernel_equals_exact_blas_wraps_included(channels, hw, kernel, strides, pads, dilations, signed,
                                                                acc_bits):
    ql, x = _depthwise_qlayer(channels, hw, kernel, strides, pads, dilations, signed, seed=channels)
    assert conv_module._depthwise(ql.layer)  # the depthwise kernel's, not the GEMM's
    conv = ops.op("conv")
    want, want_wrapped = conv.execute(ql, [x], ExecOptions(acc_bits, "exact-blas"))
    for source in (x, np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)):
        got, wrapped = conv.execute(ql, [source], ExecOptions(acc_bits, "int8-gemm"))
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        assert wrapped == want_wrapped
    if acc_bits < 16:
        assert want_wrapped > 0  # the narrow accumulator wraps some sums


@pytest.mark.parametrize("depthwise", [False, True])
def test_a_prepared_conv_does_not_keep_its_layer_alive(depthwise):
    ql, x = _depthwise_qlayer(16, (6, 6), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), False, seed=3) if depthwise else \
        _conv_qlayer(64, 64, (3, 3), (1, 1), (1, 1, 1, 1), 1, seed=3)
    ops.op("conv").execute(ql, [x], ExecOptions(32, "int8-gemm"))
    alive = weakref.ref(ql)
    del ql
    gc.collect()
    assert alive() is None
