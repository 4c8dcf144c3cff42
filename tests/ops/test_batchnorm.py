import numpy as np

from onnx_graphs import GraphBuilder
from op_checks import check_all_stages

SHAPE = (1, 4, 8, 8)


def test_batchnorm_after_a_conv_still_folds():
    g = GraphBuilder(SHAPE)
    graph = check_all_stages(g.model(g.batchnorm(g.conv(g.input_name, 4, 4), 4)), SHAPE, {"conv"})
    assert [layer.op for layer in graph.layers] == ["conv"]


def test_stand_alone_batchnorm_is_a_per_channel_affine_layer():
    g = GraphBuilder(SHAPE)
    x = g.node("Relu", [g.conv(g.input_name, 4, 4)])      # BN after the ReLU: nothing to fold into
    graph = check_all_stages(g.model(g.batchnorm(x, 4)), SHAPE, {"affine"})
    assert [layer.op for layer in graph.layers] == ["conv", "affine"]


def test_batchnorm_on_the_graph_input_and_after_an_affine_layer():
    g = GraphBuilder(SHAPE)
    scale = g.const(np.array([2.0, 1.0, 0.5, -1.0], np.float32).reshape(4, 1, 1))
    y = g.batchnorm(g.node("Mul", [g.input_name, scale]), 4)
    graph = check_all_stages(g.model(y), SHAPE, {"affine"})
    assert [layer.op for layer in graph.layers] == ["affine"]
