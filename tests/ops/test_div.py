import numpy as np

from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages
from tpusim import ops
from tpusim.ir import Layer
from tpusim.quant.arithmetic import QParams

SHAPE = (1, 4, 8, 8)
f32 = np.float32


def test_quotient_of_two_activations_is_a_float_step():
    g = GraphBuilder(SHAPE)
    den = g.node("Add", [g.node("Sigmoid", [g.conv(g.input_name, 4, 4)]), g.const(f32(1.0))])  # in [1, 2]
    y = g.node("Div", [g.conv(g.input_name, 4, 4), den])
    graph = check_all_stages(g.model(y), SHAPE, {"div"})
    assert [layer.op for layer in graph.layers] == ["conv", "unary", "conv", "div"]


def test_division_by_constants():
    g = GraphBuilder(SHAPE)
    x = g.node("Relu", [g.conv(g.input_name, 4, 4)])
    y = g.node("Div", [x, g.const(np.array([1.0, 2.0, 4.0, 0.5], f32).reshape(1, 4, 1, 1))])
    den = g.node("Add", [g.node("Sigmoid", [g.conv(g.input_name, 4, 4)]), g.const(f32(1))])
    z = g.node("Div", [g.const(f32(1.0)), den])
    graph = check_all_stages(g.model(g.node("Add", [y, z])), SHAPE, {"affine", "unary"})
    assert [layer.op for layer in graph.layers] == ["conv", "affine", "conv", "unary", "add"]
    np.testing.assert_array_equal(graph.layers[1].weight, [1.0, 0.5, 0.25, 2.0])


def test_div_kernel_on_exact_values():
    shape = (1, 1, 1, 4)
    layer = Layer(name="d", op="div", inputs=("a", "b"), output="y", input_shapes=(shape, shape), output_shape=shape)
    qp = QParams(np.array(0.5), np.array(0), -127, 127)
    ql = ops.op("div").quantize(layer, (qp, qp), qp, CONFIG.quant, None)
    a = np.array([[[[12, -12, 5, 0]]]], np.int8)       # 6, -6, 2.5, 0
    b = np.array([[[[4, 8, 0, 0]]]], np.int8)          # 2, 4, 0, 0
    y, _ = ops.op("div").execute(ql, [a, b], None)
    np.testing.assert_array_equal(y, [[[[6, -3, 127, 0]]]])   # 3, -1.5, +inf saturates, 0/0 is zero
