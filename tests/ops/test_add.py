import numpy as np

from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages
from tpusim import ops
from tpusim.ir import Layer
from tpusim.quant.arithmetic import QParams

SHAPE = (1, 4, 8, 8)
f32 = np.float32


def test_broadcast_add_of_two_activations():
    g = GraphBuilder(SHAPE)
    x = g.conv(g.input_name, 4, 4, pads=[1, 1, 1, 1])
    y = g.node("Add", [g.node("GlobalAveragePool", [x]), x])
    graph = check_all_stages(g.model(y), SHAPE, {"add"})
    assert [layer.op for layer in graph.layers] == ["conv", "global_avgpool", "add"]
    assert graph.layers[-1].output_shape == (1, 4, 8, 8)


def test_constant_after_conv_still_folds_into_its_bias():
    g = GraphBuilder(SHAPE)
    shift = np.array([0.5, -1.0, 0.25, 2.0], f32)
    y = g.node("Add", [g.const(shift.reshape(1, 4, 1, 1)), g.conv(g.input_name, 4, 4, bias=False)])
    graph = check_all_stages(g.model(y), SHAPE, {"conv"})
    assert [layer.op for layer in graph.layers] == ["conv"]
    np.testing.assert_array_equal(graph.layers[0].bias, shift)


def test_last_axis_constant_against_nchw_is_not_a_conv_bias():
    # [C] broadcasts along W, not along the conv's channels: an affine layer along axis 3.
    g = GraphBuilder((1, 4, 4, 4))
    y = g.node("Add", [g.conv(g.input_name, 4, 4, pads=[1, 1, 1, 1]), g.const(np.arange(4, dtype=f32))])
    graph = check_all_stages(g.model(y), (1, 4, 4, 4), {"affine"})
    assert [(layer.op, layer.axis) for layer in graph.layers][1] == ("affine", 3)


def test_scalar_after_a_clamped_conv_is_a_table_and_x_plus_f_of_x_one_table():
    g = GraphBuilder(SHAPE)
    x = g.node("Relu", [g.conv(g.input_name, 4, 4)])
    y = g.node("Add", [x, g.node("Sigmoid", [g.node("Add", [x, g.const(f32(-1.0))])])])
    graph = check_all_stages(g.model(y), SHAPE, {"unary"})
    assert [layer.op for layer in graph.layers] == ["conv", "unary"]


def test_add_kernel_is_exact_on_one_grid():
    shape = (1, 2, 2, 3)
    layer = Layer(name="a", op="add", inputs=("a", "b"), output="y", input_shapes=(shape, (1, 2, 1, 1)),
                  output_shape=shape)
    qp = QParams(np.array(0.125), np.array(100), 0, 255)
    ql = ops.op("add").quantize(layer, (qp, qp), qp, CONFIG.quant, None)
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 256, shape).astype(np.uint8), rng.integers(0, 256, (1, 2, 1, 1)).astype(np.uint8)
    y, _ = ops.op("add").execute(ql, [a, b], None)
    np.testing.assert_array_equal(y, np.clip(a.astype(int) + b.astype(int) - 100, 0, 255))
