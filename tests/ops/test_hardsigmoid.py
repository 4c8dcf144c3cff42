import numpy as np
import pytest

from onnx_graphs import GraphBuilder
from op_checks import check_all_stages

SHAPE = (1, 4, 8, 8)
f32 = np.float32


@pytest.mark.parametrize("alpha, beta", [(0.2, 0.5), (1 / 6, 0.5), (0.3, 0.1)])
def test_hardsigmoid_op(alpha, beta):
    g = GraphBuilder(SHAPE)
    y = g.node("HardSigmoid", [g.conv(g.input_name, 4, 4)], alpha=alpha, beta=beta)
    graph = check_all_stages(g.model(y), SHAPE, {"hardsigmoid"})
    assert [layer.op for layer in graph.layers] == ["conv", "hardsigmoid"]
    assert graph.layers[1].attrs == (("alpha", float(f32(alpha))), ("beta", float(f32(beta))))


def _relu6_of_x_plus_3_over_6(g, x):
    relu6 = g.node("Clip", [g.node("Add", [x, g.const(f32(3))]), g.const(f32(0)), g.const(f32(6))])
    return g.node("Div", [relu6, g.const(f32(6))])


def test_relu6_of_x_plus_3_over_6_is_recognised():
    g = GraphBuilder(SHAPE)
    x = g.node("MaxPool", [g.input_name], kernel_shape=[2, 2], strides=[2, 2])
    graph = check_all_stages(g.model(_relu6_of_x_plus_3_over_6(g, x)), SHAPE, {"hardsigmoid"})
    assert [layer.op for layer in graph.layers] == ["maxpool", "hardsigmoid"]
    assert graph.layers[1].attr("alpha") == float(f32(1 / 6)) and graph.layers[1].attr("expr") is not None


def test_after_a_conv_the_shift_folds_into_its_bias_and_the_clamp_into_its_output():
    g = GraphBuilder(SHAPE)
    graph = check_all_stages(g.model(_relu6_of_x_plus_3_over_6(g, g.conv(g.input_name, 4, 4))), SHAPE, {"unary"})
    assert [(layer.op, layer.activation.label) for layer in graph.layers] == [("conv", "relu6"), ("unary", "none")]
