import numpy as np
import pytest

from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages
from tpusim import ops
from tpusim.errors import ModelError
from tpusim.frontend import lower_model
from tpusim.ir import Layer
from tpusim.quant.arithmetic import QParams

SHAPE = (1, 4, 8, 8)
f32 = np.float32
SCALE = np.array([1.5, -0.5, 2.0, 0.7], f32)
SHIFT = np.array([0.1, 0.2, -0.3, 0.4], f32)


@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1)])
def test_mul_and_add_of_per_channel_constants_are_one_affine_layer(shape):
    g = GraphBuilder(SHAPE)
    x = g.node("Relu", [g.conv(g.input_name, 4, 4)])
    y = g.node("Add", [g.node("Mul", [g.const(SCALE.reshape(shape)), x]), g.const(SHIFT.reshape(shape))])
    y = g.node("Div", [g.node("Sub", [y, g.const(f32(1.0))]), g.const(f32(2.0))])  # scalars fold in too
    graph = check_all_stages(g.model(y), SHAPE, {"affine"})
    assert [(layer.op, layer.axis) for layer in graph.layers] == [("conv", 1), ("affine", 1)]
    np.testing.assert_allclose(graph.layers[1].weight, SCALE / 2)
    np.testing.assert_allclose(graph.layers[1].bias, (SHIFT - 1) / 2)


def test_affine_along_the_last_axis_of_a_gemm():
    g = GraphBuilder((1, 8))
    h = g.node("Relu", [g.node("MatMul", [g.input_name, g.weight((8, 6))])])
    y = g.node("Mul", [h, g.const(np.linspace(-1, 1, 6).astype(f32))])
    graph = check_all_stages(g.model(y), (1, 8), {"affine"})
    assert [(layer.op, layer.axis) for layer in graph.layers] == [("gemm", 1), ("affine", 1)]


def test_mul_by_a_full_tensor_constant_is_refused():
    g = GraphBuilder(SHAPE)
    y = g.node("Mul", [g.conv(g.input_name, 4, 4), g.const(np.ones((1, 4, 6, 6), f32))])
    with pytest.raises(ModelError, match="neither a scalar nor a per-channel vector"):
        lower_model(g.model(y), "m.onnx")


@pytest.mark.parametrize("weights", ["per-tensor", "per-channel"])
def test_affine_kernel_is_exact_for_integer_scales(weights):
    # Scales that int8 holds exactly (amax 127 per tensor gives s_a = 1) and s_x / s_y = 1/8: the
    # accumulator (q - z) a + b / (s_x s_a) is exact and the requantization a rounding shift by 3.
    import dataclasses

    scale = np.array([127.0, -64.0, 32.0, 1.0] if weights == "per-tensor" else [127.0, -127.0, 127.0, 127.0], f32)
    layer = Layer(name="a", op="affine", inputs=("x",), output="y", input_shapes=((1, 4, 2, 3),),
                  output_shape=(1, 4, 2, 3), weight=scale, bias=np.array([1.0, -2.0, 0.5, 3.0], f32), axis=1)
    qx, qy = QParams(np.array(0.125), np.array(7), 0, 255), QParams(np.array(1.0), np.array(0), -127, 127)
    quant = dataclasses.replace(CONFIG.quant, weights=weights)
    ql = ops.op("affine").quantize(layer, (qx,), qy, quant, None)
    np.testing.assert_array_equal(ql.weight_q, scale.astype(np.int8))
    np.testing.assert_array_equal(ql.bias_q, [8, -16, 4, 24])
    q = np.random.default_rng(4).integers(0, 256, (1, 4, 2, 3)).astype(np.uint8)
    y, _ = ops.op("affine").execute(ql, [q], None)
    per_channel = (scale.astype(np.int64).reshape(4, 1, 1), np.array([8, -16, 4, 24]).reshape(4, 1, 1))
    acc = (q.astype(np.int64) - 7) * per_channel[0] + per_channel[1]
    np.testing.assert_array_equal(y, np.clip(np.sign(acc) * ((np.abs(acc) + 4) // 8), -127, 127))


def _channels_last_memory(q):
    return np.ascontiguousarray(q.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("weights", ["per-tensor", "per-channel"])
@pytest.mark.parametrize("shape, axis, layout", [
    ((2, 5, 3, 4), 1, "nchw"),
    ((2, 5, 3, 4), 1, "channels-last"),  # a conv's output: the kernel runs along the channels
    ((3, 7), 1, "nchw"),                 # a GEMM's output, channels last
    ((2, 6, 9), 1, "nchw"),
    ((2, 3, 6), 2, "nchw"),              # a transformer's hidden axis
    ((2, 5, 3, 4), 1, "strided"),        # memory not dense in any order: a copy
])
@pytest.mark.parametrize("signed_input", [False, True])
def test_affine_kernel_is_its_numpy_oracle(weights, shape, axis, layout, signed_input):
    import dataclasses

    from tpusim.ops.affine import affine_reference

    rng = np.random.default_rng(sum(shape) + axis)
    channels = shape[axis]
    scale = rng.uniform(-3, 3, channels).astype(f32)
    layer = Layer(name="a", op="affine", inputs=("x",), output="y", input_shapes=(shape,), output_shape=shape,
                  weight=scale, bias=rng.uniform(-2, 2, channels).astype(f32), axis=axis)
    qx = QParams(np.array(f32(0.03)), np.array(0 if signed_input else 9), -128 if signed_input else 0,
                 127 if signed_input else 255)
    qy = QParams(np.array(f32(0.05)), np.array(120), 0, 255)
    ql = ops.op("affine").quantize(layer, (qx,), qy, dataclasses.replace(CONFIG.quant, weights=weights), None)
    info = np.iinfo(np.int8 if signed_input else np.uint8)
    q = rng.integers(info.min, info.max + 1, shape).astype(info.dtype)
    if layout == "channels-last":
        q = _channels_last_memory(q)
    elif layout == "strided":
        q = np.repeat(q, 2, axis=-1)[..., ::2]
    y, _ = ops.op("affine").execute(ql, [q], None)
    np.testing.assert_array_equal(y, affine_reference(ql, q))
    laid_out_as = np.empty_like(q) if layout != "strided" else np.empty(shape, np.uint8)  # a copy is C-contiguous
    assert y.dtype == np.uint8 and y.strides == laid_out_as.strides
    # Accumulators past the int32 range saturate before the requantization, as the oracle's do: a multiplier
    # that puts the int32 extremes just inside a rounding step tells a saturated accumulator from an exact one.
    from tpusim.quant.qlayer import Requant

    big = dataclasses.replace(ql, acc_bias=np.where(np.arange(channels) % 2, 2**31 - 5, -(2**31) + 5).astype(np.int32),
                              requant=Requant.of(np.full(channels, 100.4999 / (2**31 - 1))))
    np.testing.assert_array_equal(ops.op("affine").execute(big, [q], None)[0], affine_reference(big, q))
