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
