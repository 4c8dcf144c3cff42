import numpy as np

from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages
from tpusim import ops
from tpusim.ir import Layer
from tpusim.quant.arithmetic import QParams

SHAPE = (1, 4, 8, 8)
f32 = np.float32


def test_difference_of_two_activations_with_broadcasting():
    g = GraphBuilder(SHAPE)
    x = g.conv(g.input_name, 4, 4, pads=[1, 1, 1, 1])
    y = g.node("Sub", [x, g.node("GlobalAveragePool", [g.conv(g.input_name, 4, 4)])])  # x minus a per-channel mean
    graph = check_all_stages(g.model(y), SHAPE, {"sub"})
    assert [layer.op for layer in graph.layers] == ["conv", "conv", "global_avgpool", "sub"]


def test_x_minus_constant_folds_and_constant_minus_x_is_affine():
    c = np.array([1.0, -2.0, 0.5, 3.0], f32).reshape(4, 1, 1)
    g = GraphBuilder(SHAPE)
    y = g.node("Sub", [g.conv(g.input_name, 4, 4, bias=False), g.const(c)])
    graph = check_all_stages(g.model(y), SHAPE, {"conv"})
    assert [layer.op for layer in graph.layers] == ["conv"]
    np.testing.assert_array_equal(graph.layers[0].bias, -c.reshape(-1))

    g = GraphBuilder(SHAPE)
    y = g.node("Sub", [g.const(c), g.conv(g.input_name, 4, 4)])
    graph = check_all_stages(g.model(y), SHAPE, {"affine"})
    assert [layer.op for layer in graph.layers] == ["conv", "affine"]
    np.testing.assert_array_equal(graph.layers[1].weight, -np.ones(4, f32))
    np.testing.assert_array_equal(graph.layers[1].bias, c.reshape(-1))


def test_sub_kernel_is_exact_on_one_grid():
    shape = (1, 2, 2, 3)
    layer = Layer(name="s", op="sub", inputs=("a", "b"), output="y", input_shapes=(shape, shape), output_shape=shape)
    qp = QParams(np.array(0.25), np.array(0), -127, 127)
    ql = ops.op("sub").quantize(layer, (qp, qp), qp, CONFIG.quant, None)
    rng = np.random.default_rng(3)
    a, b = (rng.integers(-127, 128, shape).astype(np.int8) for _ in range(2))
    y, _ = ops.op("sub").execute(ql, [a, b], None)
    np.testing.assert_array_equal(y, np.clip(a.astype(int) - b.astype(int), -127, 127))
