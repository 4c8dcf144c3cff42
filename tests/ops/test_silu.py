import numpy as np
import pytest

from onnx_graphs import GraphBuilder
from op_checks import check_all_stages
from tpusim.frontend import lower_model
from tpusim.ops._expr import X

SHAPE = (1, 4, 8, 8)


@pytest.mark.parametrize("sigmoid_first", [False, True])
def test_mul_of_x_and_its_sigmoid_is_one_silu_table(sigmoid_first):
    g = GraphBuilder(SHAPE)
    x = g.conv(g.input_name, 4, 4)
    s = g.node("Sigmoid", [x])
    y = g.node("Mul", [s, x] if sigmoid_first else [x, s])
    graph = check_all_stages(g.model(y), SHAPE, {"silu"})
    assert [layer.op for layer in graph.layers] == ["conv", "silu"]
    silu = graph.layers[1]
    assert silu.inputs == (graph.layers[0].output,) and silu.output == y
    order = (("fn", "sigmoid", (), X), X) if sigmoid_first else (X, ("fn", "sigmoid", (), X))
    assert silu.attr("expr") == ("mul",) + order  # the model's own steps, in its order


def test_sigmoid_read_elsewhere_is_not_fused():
    g = GraphBuilder(SHAPE)
    x = g.conv(g.input_name, 4, 4)
    s = g.node("Sigmoid", [x])
    y = g.node("Mul", [x, s])
    graph = lower_model(g.model([y, s]), "m.onnx")
    assert [layer.op for layer in graph.layers] == ["conv", "sigmoid", "mul"]


def test_silu_with_a_fused_relu_after_it():
    g = GraphBuilder(SHAPE)
    x = g.conv(g.input_name, 4, 4)
    y = g.node("Relu", [g.node("Mul", [x, g.node("Sigmoid", [x])])])
    graph = check_all_stages(g.model(y), SHAPE, {"silu"})
    assert [(layer.op, layer.activation.kind) for layer in graph.layers] == [("conv", "none"), ("silu", "relu")]
