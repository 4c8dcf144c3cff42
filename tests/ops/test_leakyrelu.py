import numpy as np

from onnx_graphs import GraphBuilder
from op_checks import check_all_stages
from tpusim import ops

SHAPE = (1, 4, 8, 8)
f32 = np.float32


def test_leakyrelu_op_and_default_alpha():
    g = GraphBuilder(SHAPE)
    x = g.conv(g.input_name, 4, 4)
    y = g.node("Add", [g.node("LeakyRelu", [x], alpha=0.2), g.node("LeakyRelu", [g.conv(g.input_name, 4, 4)])])
    graph = check_all_stages(g.model(y), SHAPE, {"leakyrelu"})
    assert [layer.op for layer in graph.layers] == ["conv", "leakyrelu", "conv", "leakyrelu", "add"]
    assert graph.layers[1].attr("alpha") == float(f32(0.2)) and graph.layers[3].attr("alpha") == float(f32(0.01))


def test_max_of_x_and_scaled_x_is_one_table():
    # TF's LeakyRelu export: Max(x, alpha * x), a function of one tensor.
    g = GraphBuilder(SHAPE)
    x = g.conv(g.input_name, 4, 4)
    y = g.node("Max", [x, g.node("Mul", [x, g.const(f32(0.1))])])
    graph = check_all_stages(g.model(y), SHAPE, {"unary"})
    assert [layer.op for layer in graph.layers] == ["conv", "unary"]
    probe = np.linspace(-3, 3, 61, dtype=np.float32)
    np.testing.assert_array_equal(ops.op("unary").values(graph.layers[1], probe), np.maximum(probe, probe * f32(0.1)))
